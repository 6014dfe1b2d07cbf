"""The abstract base of every sampler, the typed batch it plans, and the fair-share arithmetic.

A sampler plans an epoch as a pure function of (seed, epoch): the global batch sequence is
dealt round-robin to ranks (global batch j goes to rank j % world_size), every rank gets the
same number of batches, and the shortfall is filled by wrapping around (declared padding).
The base class does the rank arithmetic once for every kind; a sampler only plans global batches.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from cellfeed.server.errors import CellfeedError


@dataclass(frozen=True)
class PlannedBatch:
    """One planned batch: `items` (positions into the sampler's items, in batch order), per item
    whether it is declared padding (a repeat that only evens out shares), and its global index.
    A kind may subclass it with fields of its own."""

    items: np.ndarray
    padding: np.ndarray
    global_index: int


class Sampler(ABC):
    """Plans which items make up each batch of an epoch, for any rank and world size."""

    @abstractmethod
    def num_batches(self, world_size: int) -> int:
        """Batches per rank per epoch; identical on every rank and in every epoch."""

    @abstractmethod
    def plan(self, epoch: int, world_size: int, global_index: int) -> PlannedBatch:
        """Global batch `global_index` of `epoch` when the epoch is dealt to `world_size` ranks."""

    def batch(self, epoch: int, rank: int, world_size: int, index: int) -> PlannedBatch:
        """Rank-local batch `index` of `epoch`: checked, mapped to its global batch, planned."""
        check_batch_index(index, rank, world_size, self.num_batches(world_size))
        return self.plan(epoch, world_size, global_batch(index, rank, world_size))


def batches_per_rank(num_items: int, batch_size: int, world_size: int, *, drop_last: bool = False) -> int:
    """Equal shares: ceil over the whole epoch (padding by wrap-around), or floor with drop_last."""
    if drop_last:
        return num_items // (batch_size * world_size)
    return math.ceil(math.ceil(num_items / batch_size) / world_size)


def global_batch(index: int, rank: int, world_size: int) -> int:
    """Rank-local batch `index` of `rank` is global batch index * world_size + rank."""
    return index * world_size + rank


def wrap_around(positions: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions in an epoch of `count` items, wrapped to its start: (items, declared padding),
    a position past the end being padding (an item another batch also serves)."""
    positions = np.asarray(positions, dtype=np.int64)
    return positions % count, positions >= count


def check_batch_index(index: int, rank: int, world_size: int, num_batches: int) -> None:
    """Refuse a rank outside the world size or a batch outside the epoch's share per rank."""
    if not 0 <= rank < world_size:
        raise CellfeedError(f"rank {rank} is outside world size {world_size}")
    if not 0 <= index < num_batches:
        raise CellfeedError(f"batch {index} is outside this epoch's {num_batches} batches per rank")
