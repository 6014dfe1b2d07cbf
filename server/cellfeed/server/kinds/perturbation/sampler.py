"""Groups of S perturbed cells of one target, with S matched controls, planned per epoch.

Each epoch (seeded by seed, split and epoch) shuffles cells within every target, cuts them into
groups of S (padding only a target's last partial group, with replacement), and shuffles the
groups across a window of contiguous row blocks so that batches mix targets and cell types while
every read stays a contiguous slice. Every cell of the split is drawn at least once per epoch.

Training (`once=False`) pads the epoch's last batch by wrapping around to its first items, and
the batch count to a multiple of the world size the same way. Evaluation (`once=True`: val, test,
predict) serves every cell exactly once per pass: the last batch holds only the items left, and
a rank whose share runs out gets batches of one item that is all padding. Each item says how many
of its S cells are real (`n_real`, the first ones); the others are padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellfeed.server.kinds.perturbation.layout import FileLayout, Group
from cellfeed.server.kinds.perturbation.pairs import FixedPairs
from cellfeed.server.samplers.base import PlannedBatch, Sampler, batches_per_rank, wrap_around
from cellfeed.server.samplers.plans import EpochPlans


@dataclass(frozen=True)
class Block:
    """A contiguous run of rows [start, stop) of one file, holding whole groups."""

    file: int
    start: int
    stop: int


@dataclass
class EpochItems:
    group: np.ndarray  # [n_items] group index of each item
    rows: np.ndarray  # [n_items, S] file rows of each item's perturbed cells
    n_real: np.ndarray  # [n_items] how many of the item's rows (the first ones) are not padding


@dataclass(frozen=True)
class BlockRead:
    """Items [lo, hi) of a planned batch, whose perturbed cells all lie in `block`: one read."""

    block: Block
    lo: int
    hi: int


@dataclass(frozen=True)
class PerturbationPlannedBatch(PlannedBatch):
    """One batch: B items of S perturbed cells each, with their S control cells, ordered so that
    the items of one block are together (`reads`). `items` index the epoch's items; an item is
    padding when none of its cells is real."""

    group: np.ndarray  # [B]
    pert_rows: np.ndarray  # [B, S]
    ctrl_rows: np.ndarray  # [B, S]
    n_real: np.ndarray  # [B] real cells of each item (its first n_real rows); 0 for a padding item
    reads: tuple[BlockRead, ...]


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
        match_controls_by_exp_batch: bool,
        once: bool = False,
        drop_last: bool = False,
        max_cells_per_group: int | None = None,
        fixed_control_pairs: bool = False,
    ) -> None:
        self.groups = groups
        self.layouts = layouts
        self.S = group_size
        self.B = batch_size
        self.window_blocks = window_blocks
        self.seed = seed
        self.stream_key = stream_key
        self.match_controls_by_exp_batch = match_controls_by_exp_batch
        self.once = once
        self.drop_last = drop_last
        self.max_cells = max_cells_per_group
        self.blocks, self.block_of_group = _blocks(groups, block_size)
        self.groups_of_block: list[list[int]] = [[] for _ in self.blocks]
        for g, b in enumerate(self.block_of_group):
            self.groups_of_block[b].append(g)
        self.num_items = sum(self._items_of(len(g.rows)) for g in groups)
        self.pools = ControlPools(groups, layouts, by_exp_batch=match_controls_by_exp_batch)
        # cell-load's cache_perturbation_control_pairs: each cell's control drawn once (pairs.py)
        self.pairs = FixedPairs(groups, self.pools.pools, self.pools.pool_of_group, seed=seed, stream_key=stream_key) if fixed_control_pairs else None
        self._epochs: EpochPlans[EpochItems] = EpochPlans(self._build_items)

    def _items_of(self, n: int) -> int:
        """Items of a group of n cells: capped at max_cells (cell-load's downsample_cells), its
        partial item dropped with drop_last."""
        n = min(n, self.max_cells) if self.max_cells is not None else n
        return n // self.S if self.drop_last else math.ceil(n / self.S)

    def num_batches(self, world_size: int) -> int:
        if not self.num_items:
            return 0
        # drop_last (training): the epoch's partial last batch is dropped, as cell-load's sampler
        return batches_per_rank(self.num_items, self.B, world_size, drop_last=self.drop_last and not self.once)

    def epoch_items(self, epoch: int) -> EpochItems:
        """Every item of `epoch`: its group, rows and real cells (built once, the next ahead)."""
        return self._epochs.get(epoch)

    def plan(self, epoch: int, world_size: int, global_index: int) -> PerturbationPlannedBatch:
        epoch_items = self.epoch_items(epoch)
        j = global_index
        if self.once:
            # every item once: the last batch is short, batches past the end one padding item
            lo = j * self.B
            items = np.arange(lo, min(lo + self.B, self.num_items)) if lo < self.num_items else np.zeros(1, np.int64)
            n_real = epoch_items.n_real[items] if lo < self.num_items else np.zeros(1, np.int64)
        else:
            items, wrapped = wrap_around(np.arange(j * self.B, (j + 1) * self.B), self.num_items)
            n_real = np.where(wrapped, 0, epoch_items.n_real[items])
        group = epoch_items.group[items]
        rng = np.random.default_rng([self.seed, self.stream_key, epoch, j, 1])
        ctrl_rows = self.pools.draw(rng, group, self.S) if self.pairs is None else self.pairs.controls(group, epoch_items.rows[items])
        # items of one block together: one gather per block
        blocks = self.block_of_group[group]
        order = np.argsort(blocks, kind="stable")
        items, group, n_real, ctrl_rows, blocks = items[order], group[order], n_real[order], ctrl_rows[order], blocks[order]
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        reads = tuple(
            BlockRead(self.blocks[blocks[lo]], lo, hi)
            for lo, hi in zip(np.r_[0, bounds].tolist(), np.r_[bounds, len(blocks)].tolist())
        )
        return PerturbationPlannedBatch(
            items=items, padding=n_real == 0, global_index=j,
            group=group, pert_rows=epoch_items.rows[items], ctrl_rows=ctrl_rows, n_real=n_real, reads=reads,
        )

    def _build_items(self, epoch: int) -> EpochItems:
        rng = np.random.default_rng([self.seed, self.stream_key, epoch])
        order = rng.permutation(len(self.blocks))
        item_groups: list[np.ndarray] = []
        item_rows: list[np.ndarray] = []
        item_real: list[np.ndarray] = []
        S = self.S
        for w in range(0, len(order), self.window_blocks):
            w_groups: list[np.ndarray] = []
            w_rows: list[np.ndarray] = []
            w_real: list[np.ndarray] = []
            for b in order[w : w + self.window_blocks]:
                for g in self.groups_of_block[b]:
                    rows = rng.permutation(self.groups[g].rows)
                    if self.max_cells is not None:
                        rows = rows[: self.max_cells]  # a fresh random max_cells each epoch
                    if self.drop_last:
                        rows = rows[: len(rows) // S * S]
                        if not len(rows):
                            continue
                    n = len(rows)
                    short = (-n) % S
                    if short:
                        rows = np.concatenate([rows, rng.choice(self.groups[g].rows if self.max_cells is None else rows, short, replace=True)])
                    chunks = rows.reshape(-1, S)
                    real = np.full(len(chunks), S, dtype=np.int64)
                    real[-1] = n - (len(chunks) - 1) * S
                    w_rows.append(chunks)
                    w_groups.append(np.full(len(chunks), g, dtype=np.int32))
                    w_real.append(real)
            if not w_rows:
                continue
            perm = rng.permutation(sum(len(c) for c in w_rows))
            item_rows.append(np.concatenate(w_rows)[perm])
            item_groups.append(np.concatenate(w_groups)[perm])
            item_real.append(np.concatenate(w_real)[perm])
        if not item_rows:
            return EpochItems(group=np.zeros(0, np.int32), rows=np.zeros((0, S), np.int64), n_real=np.zeros(0, np.int64))
        return EpochItems(group=np.concatenate(item_groups), rows=np.concatenate(item_rows), n_real=np.concatenate(item_real))

    def control_fallbacks(self) -> dict[str, Any]:
        """Under experimental-batch matching: the groups whose experimental batch has no controls of
        their cell type, so that their controls come from the whole cell type (file and cell type)
        instead (the info's key "batches" lists those cell type/experimental batch pairs)."""
        fallback = self.pools.fallback
        return {
            "groups": int(fallback.sum()),
            "cells": int(sum(len(self.groups[g].rows) for g in np.flatnonzero(fallback))),
            "batches": sorted({f"{self.groups[g].cell_type}/{self.groups[g].batches[0]}" for g in np.flatnonzero(fallback)}),
        }


class ControlPools:
    """The control rows of every pool, concatenated, for vectorised draws.

    A group's pool is its file and cell type's controls; with `by_exp_batch` (every group then
    lies in one experimental batch) the controls of its file, cell type and experimental batch,
    or the cell type's when that experimental batch has none (`fallback`)."""

    def __init__(self, groups: list[Group], layouts: list[FileLayout], *, by_exp_batch: bool = False) -> None:
        keys: dict[tuple, int] = {}
        arrays: list[np.ndarray] = []
        self.pool_of_group = np.zeros(len(groups), dtype=np.int64)
        self.fallback = np.zeros(len(groups), dtype=bool)
        for g, group in enumerate(groups):
            layout = layouts[group.file]
            key: tuple = (group.file, group.cell_type)
            rows = None
            if by_exp_batch:
                exp_batch = str(group.batches[0])
                rows = layout.control_rows_by_batch.get((group.cell_type, exp_batch))
                if rows is not None and len(rows):
                    key = (group.file, group.cell_type, exp_batch)
                else:
                    rows = None
                    self.fallback[g] = True
            if key not in keys:
                keys[key] = len(arrays)
                arrays.append(rows if rows is not None else layout.control_rows[group.cell_type])
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
