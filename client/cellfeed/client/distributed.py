"""Where this process sits in a data-parallel job: Lightning trainer, torch.distributed, or arguments."""

from __future__ import annotations

from typing import Any


def resolve_rank(trainer: Any | None, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) from the trainer if attached, else torch.distributed, else the arguments."""
    if trainer is not None and getattr(trainer, "world_size", 1) > 1:
        return int(trainer.global_rank), int(trainer.world_size)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    if trainer is not None and rank is None and world_size is None:
        return int(trainer.global_rank), int(trainer.world_size)
    world = 1 if world_size is None else int(world_size)
    r = 0 if rank is None else int(rank)
    if not 0 <= r < world:
        raise ValueError(f"rank {r} is outside world_size {world}")
    return r, world
