"""The abstract base of every sampler, and the fair-share arithmetic they all follow.

A sampler plans an epoch as a pure function of (seed, epoch): the global batch sequence is
dealt round-robin to ranks (global batch j goes to rank j % world_size), every rank gets the
same number of batches, and the shortfall is filled by wrapping around (declared padding).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

from cellfeed.server.errors import CellfeedError


class Sampler(ABC):
    """Plans which items make up each batch of an epoch, for any rank and world size."""

    @abstractmethod
    def num_batches(self, world_size: int) -> int:
        """Batches per rank per epoch; identical on every rank and in every epoch."""

    @abstractmethod
    def batch(self, epoch: int, rank: int, world_size: int, index: int) -> Any:
        """What rank-local batch `index` of `epoch` holds (the sampler's own item description)."""


def batches_per_rank(num_items: int, batch_size: int, world_size: int, *, drop_last: bool = False) -> int:
    """Equal shares: ceil over the whole epoch (padding by wrap-around), or floor with drop_last."""
    if drop_last:
        return num_items // (batch_size * world_size)
    return math.ceil(math.ceil(num_items / batch_size) / world_size)


def global_batch(index: int, rank: int, world_size: int) -> int:
    """Rank-local batch `index` of `rank` is global batch index * world_size + rank."""
    return index * world_size + rank


def check_batch_index(index: int, rank: int, world_size: int, num_batches: int) -> None:
    if not 0 <= rank < world_size:
        raise CellfeedError(f"rank {rank} is outside world size {world_size}")
    if not 0 <= index < num_batches:
        raise CellfeedError(f"batch {index} is outside this epoch's {num_batches} batches per rank")
