"""Groups of S perturbed cells of one target, with S matched controls, planned per epoch.

Each epoch (seeded by seed, split and epoch) shuffles cells within every target, cuts them into
groups of S (padding only a target's last partial group, with replacement), and shuffles the
groups across a window of contiguous row blocks so that batches mix targets and cell types while
every read stays a contiguous slice. Every cell of the split is drawn at least once per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cellfeed.server.perturbation.layout import FileLayout, Group
from cellfeed.server.samplers.base import Sampler, batches_per_rank, global_batch
from cellfeed.server.samplers.plans import EpochPlans


@dataclass(frozen=True)
class Block:
    """A contiguous run of rows [start, stop) of one file, holding whole groups."""

    file: int
    start: int
    stop: int


@dataclass
class EpochPlan:
    group: np.ndarray  # [n_items] group index of each item
    rows: np.ndarray  # [n_items, S] file rows of each item's perturbed cells


@dataclass
class PerturbationBatch:
    """One batch: B items of S perturbed cells each, with their S control cells."""

    group: np.ndarray  # [B]
    pert_rows: np.ndarray  # [B, S]
    ctrl_rows: np.ndarray  # [B, S]
    global_index: int


class PerturbationSampler(Sampler):
    """Plans the items of one split (see the module docstring for the promises it keeps)."""

    def __init__(
        self,
        groups: list[Group],
        layouts: list[FileLayout],
        *,
        group_size: int,
        batch_size: int,
        block_size: int,
        window_blocks: int,
        seed: int,
        stream_key: int,
        match_controls_by_batch: bool,
    ) -> None:
        self.groups = groups
        self.layouts = layouts
        self.S = group_size
        self.B = batch_size
        self.window_blocks = window_blocks
        self.seed = seed
        self.stream_key = stream_key
        self.match_controls_by_batch = match_controls_by_batch
        self.blocks, self.block_of_group = _blocks(groups, block_size)
        self.groups_of_block: list[list[int]] = [[] for _ in self.blocks]
        for g, b in enumerate(self.block_of_group):
            self.groups_of_block[b].append(g)
        self.num_items = sum(math.ceil(len(g.rows) / group_size) for g in groups)
        self.pools = _ControlPools(groups, layouts)
        self._plans: EpochPlans[EpochPlan] = EpochPlans(self._build_plan)

    def num_batches(self, world_size: int) -> int:
        return batches_per_rank(self.num_items, self.B, world_size) if self.num_items else 0

    def plan(self, epoch: int) -> EpochPlan:
        return self._plans.get(epoch)

    def batch(self, epoch: int, rank: int, world_size: int, index: int) -> PerturbationBatch:
        plan = self.plan(epoch)
        j = global_batch(index, rank, world_size)
        items = np.arange(j * self.B, (j + 1) * self.B) % self.num_items  # wrap-around = declared padding
        group = plan.group[items]
        pert_rows = plan.rows[items]
        rng = np.random.default_rng([self.seed, self.stream_key, epoch, j, 1])
        if self.match_controls_by_batch:
            ctrl_rows = np.stack([self._controls_by_batch(rng, self.groups[g], rows) for g, rows in zip(group, pert_rows)])
        else:
            ctrl_rows = self.pools.draw(rng, group, self.S)
        return PerturbationBatch(group=group, pert_rows=pert_rows, ctrl_rows=ctrl_rows, global_index=j)

    def _build_plan(self, epoch: int) -> EpochPlan:
        rng = np.random.default_rng([self.seed, self.stream_key, epoch])
        order = rng.permutation(len(self.blocks))
        item_groups: list[np.ndarray] = []
        item_rows: list[np.ndarray] = []
        S = self.S
        for w in range(0, len(order), self.window_blocks):
            w_groups: list[np.ndarray] = []
            w_rows: list[np.ndarray] = []
            for b in order[w : w + self.window_blocks]:
                for g in self.groups_of_block[b]:
                    rows = rng.permutation(self.groups[g].rows)
                    short = (-len(rows)) % S
                    if short:
                        rows = np.concatenate([rows, rng.choice(self.groups[g].rows, short, replace=True)])
                    chunks = rows.reshape(-1, S)
                    w_rows.append(chunks)
                    w_groups.append(np.full(len(chunks), g, dtype=np.int32))
            if not w_rows:
                continue
            perm = rng.permutation(sum(len(c) for c in w_rows))
            item_rows.append(np.concatenate(w_rows)[perm])
            item_groups.append(np.concatenate(w_groups)[perm])
        if not item_rows:
            return EpochPlan(group=np.zeros(0, np.int32), rows=np.zeros((0, S), np.int64))
        return EpochPlan(group=np.concatenate(item_groups), rows=np.concatenate(item_rows))

    def _controls_by_batch(self, rng: np.random.Generator, group: Group, pert_rows: np.ndarray) -> np.ndarray:
        """S control rows from the same file, cell type and batch (the cell type alone when the
        batch has too few)."""
        layout = self.layouts[group.file]
        pool = layout.control_rows[group.cell_type]
        out = np.empty(self.S, dtype=np.int64)
        local = np.searchsorted(group.rows, pert_rows)
        cell_batches = group.batches[local]
        for b in np.unique(cell_batches):
            where = np.flatnonzero(cell_batches == b)
            same = layout.control_rows_by_batch.get((group.cell_type, str(b)))
            source = same if same is not None and len(same) >= len(where) else pool
            out[where] = _draw(rng, source, len(where))
        return out


class _ControlPools:
    """The control rows of every (file, cell type), concatenated, for vectorised draws."""

    def __init__(self, groups: list[Group], layouts: list[FileLayout]) -> None:
        keys: dict[tuple[int, str], int] = {}
        arrays: list[np.ndarray] = []
        self.pool_of_group = np.zeros(len(groups), dtype=np.int64)
        for g, group in enumerate(groups):
            key = (group.file, group.cell_type)
            if key not in keys:
                keys[key] = len(arrays)
                arrays.append(layouts[group.file].control_rows[group.cell_type])
            self.pool_of_group[g] = keys[key]
        self.pools = arrays
        self.size = np.array([len(a) for a in arrays], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.size)[:-1]]).astype(np.int64) if arrays else np.zeros(0, np.int64)
        self.rows = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)

    def draw(self, rng: np.random.Generator, group: np.ndarray, n: int) -> np.ndarray:
        """[len(group), n] control rows, each item's n from its group's pool, without
        replacement unless the pool is smaller than n.

        Pools of at least n*n rows are drawn all at once (items that drew a row twice draw
        again: uniform without replacement, and rare at that size); smaller pools one by one.
        """
        pool = self.pool_of_group[group]
        size = self.size[pool]
        out = np.empty((len(group), n), dtype=np.int64)
        large = size >= n * n
        if large.any():
            high = size[large][:, None]
            draws = rng.integers(0, high, size=(int(large.sum()), n))
            while n > 1:
                ordered = np.sort(draws, axis=1)
                again = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
                if not again.any():
                    break
                draws[again] = rng.integers(0, high[again], size=(int(again.sum()), n))
            out[large] = self.rows[self.start[pool[large]][:, None] + draws]
        for i in np.flatnonzero(~large):
            out[i] = _draw(rng, self.pools[pool[i]], n)
        return out


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """n rows from pool, without replacement unless the pool is smaller than n."""
    return pool[rng.choice(len(pool), n, replace=len(pool) < n)]


def _blocks(groups: list[Group], block_size: int) -> tuple[list[Block], np.ndarray]:
    """Merge adjacent groups of a file into blocks of at most block_size rows (a larger group
    stays whole, as its own block)."""
    order = sorted(range(len(groups)), key=lambda g: (groups[g].file, groups[g].start))
    blocks: list[Block] = []
    block_of_group = np.zeros(len(groups), dtype=np.int64)
    for g in order:
        group = groups[g]
        last = blocks[-1] if blocks else None
        if (
            last is not None
            and last.file == group.file
            and group.start >= last.start
            and group.start <= last.stop
            and max(last.stop, group.stop) - last.start <= block_size
        ):
            blocks[-1] = Block(last.file, last.start, max(last.stop, group.stop))
        else:
            blocks.append(Block(group.file, group.start, group.stop))
        block_of_group[g] = len(blocks) - 1
    return blocks, block_of_group
