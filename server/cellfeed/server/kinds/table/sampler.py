"""Rows of a table cut into batches, shuffled by row-group windows, dealt fairly to ranks.

Shuffling is a pure function of (seed, epoch): the row groups are permuted, consecutive windows
of `window` row groups are formed, and the rows inside each window are permuted, so a batch
reads from at most two windows of row groups (coalesced reads, cache-friendly) while the order
changes every epoch. Without shuffle, rows come in file order. Global batch j goes to rank
j % world_size; with several ranks and drop_last off, the last batches are filled by wrapping to
the start of the epoch's order (declared padding, flagged in the planned batch); alone, the last
batch is simply shorter.
"""

from __future__ import annotations

import numpy as np

from cellfeed.server.samplers.base import PlannedBatch, Sampler, batches_per_rank, wrap_around
from cellfeed.server.samplers.plans import EpochPlans


class TableSampler(Sampler):
    """Plans batches of global row numbers for one split."""

    def __init__(self, group_starts: np.ndarray, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool, window: int, stream_key: int = 0) -> None:
        self.starts = np.asarray(group_starts, dtype=np.int64)
        self.num_rows = int(self.starts[-1])
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.window = max(1, window)
        self.stream_key = stream_key
        self._orders: EpochPlans[np.ndarray] = EpochPlans(self._epoch_order)

    def num_batches(self, world_size: int) -> int:
        if self.num_rows == 0:
            return 0
        return batches_per_rank(self.num_rows, self.batch_size, world_size, drop_last=self.drop_last)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch, self.stream_key])
        groups = rng.permutation(len(self.starts) - 1)
        pieces = []
        for w in range(0, len(groups), self.window):
            rows = np.concatenate([np.arange(self.starts[g], self.starts[g + 1]) for g in groups[w : w + self.window]])
            pieces.append(rows[rng.permutation(len(rows))])
        return np.concatenate(pieces)

    def plan(self, epoch: int, world_size: int, global_index: int) -> PlannedBatch:
        """Global row numbers of global batch `global_index` (`items`), in batch order; a position
        past the epoch's end wraps around to its start (declared padding)."""
        first = global_index * self.batch_size
        stop = first + self.batch_size
        if world_size == 1 and not self.drop_last:
            stop = min(stop, self.num_rows)
        positions, padding = wrap_around(np.arange(first, stop), self.num_rows)
        return PlannedBatch(items=self._orders.get(epoch)[positions], padding=padding, global_index=global_index)
