"""Deterministic in-order batches for validation and prediction: the same every epoch.

Items 0..N-1 are cut into batches of B in order (the last one may be short); global batch j goes
to rank j % world_size. When the batch count does not divide by the world size, the missing
batches repeat items from the start, flagged as padding so that predictions can drop them.
"""

from __future__ import annotations

import math

import numpy as np

from cellfeed.server.samplers.base import PlannedBatch, Sampler, wrap_around


class SequentialSampler(Sampler):
    """In-order batches of `batch_size` over `num_items` items."""

    def __init__(self, num_items: int, batch_size: int) -> None:
        self.n = num_items
        self.B = batch_size

    def num_batches(self, world_size: int) -> int:
        return math.ceil(math.ceil(self.n / self.B) / world_size) if self.n else 0

    def plan(self, epoch: int, world_size: int, global_index: int) -> PlannedBatch:
        j = global_index
        real = math.ceil(self.n / self.B)
        if j < real:
            items = np.arange(j * self.B, min(self.n, (j + 1) * self.B), dtype=np.int64)
            return PlannedBatch(items=items, padding=np.zeros(len(items), dtype=bool), global_index=j)
        # past the real batches: whole batches from the start again, all padding
        items, _ = wrap_around((j - real) * self.B + np.arange(self.B), self.n)
        return PlannedBatch(items=items, padding=np.ones(self.B, dtype=bool), global_index=j)
