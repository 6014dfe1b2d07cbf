"""VisCy's FlexibleBatchSampler semantics, planned on the server as a pure function of (seed, epoch).

Without weighting, an epoch is a permutation of the anchors (per experiment when experiment-aware,
each batch from one experiment). With weighting (condition balance, temporal enrichment, explicit
experiment weights, leak), each batch is composed as VisCy does, but draws come from per-group
permutations that only reshuffle once used up, so coverage stays as even as the weights allow.
Temporal enrichment and condition balance apply together: the focal window is taken within each
condition's share. Global batch j goes to rank j % world_size; every rank gets the same count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cellfeed.server.errors import CellfeedError
from cellfeed.server.samplers.base import PlannedBatch, Sampler, batches_per_rank, wrap_around
from cellfeed.server.samplers.plans import EpochPlans


@dataclass(frozen=True)
class FlexibleOptions:
    """The sampling axes of VisCy's FlexibleBatchSampler, weights indexed by experiment/condition code."""

    batch_size: int
    experiment_aware: bool = True
    condition_balanced: bool = True
    leaky: float = 0.0
    temporal_enrichment: bool = False
    temporal_window_hours: float = 2.0
    temporal_global_fraction: float = 0.3
    experiment_weights: tuple[float, ...] | None = None  # per experiment code; None: proportional to size
    condition_ratio: tuple[float, ...] | None = None  # per condition code; None: equal
    seed: int = 0

    @property
    def weighted(self) -> bool:
        """Whether batches are composed by weights rather than cut from a permutation."""
        return (
            self.condition_balanced
            or self.temporal_enrichment
            or self.experiment_weights is not None
            or (self.experiment_aware and self.leaky > 0)
        )


class FlexibleBatchSampler(Sampler):
    """Plans training batches over N items with an experiment, a condition and an HPI each."""

    def __init__(
        self, experiment: np.ndarray, condition: np.ndarray, hpi: np.ndarray, options: FlexibleOptions, stream_key: int = 0
    ) -> None:
        self.options = options
        self.stream_key = stream_key
        self.n = len(experiment)
        self.experiment = experiment.astype(np.int64)
        self.condition = condition.astype(np.int64)
        self.hpi = hpi.astype(np.float64)
        self.experiments = np.unique(self.experiment)
        if options.experiment_weights is not None and self.n:
            weights = np.array([options.experiment_weights[e] for e in self.experiments], dtype=np.float64)
            if weights.sum() <= 0:
                raise CellfeedError("experiment_weights give zero weight to every experiment of this split")
        self._cells = _Cells(self.experiment, self.condition, self.hpi)
        self._plans: EpochPlans[tuple[np.ndarray, np.ndarray]] = EpochPlans(self._build_plan)

    def num_batches(self, world_size: int) -> int:
        if self.n == 0:
            return 0
        B = self.options.batch_size
        if self.options.experiment_aware and not self.options.weighted:
            total = sum(math.ceil(size / B) for size in self._cells.experiment_size.values())
            return math.ceil(total / world_size)
        return batches_per_rank(self.n, B, world_size)

    def plan(self, epoch: int, world_size: int, global_index: int) -> PlannedBatch:
        items, padding = self._plans.get(epoch, world_size)
        return PlannedBatch(items=items[global_index], padding=padding[global_index], global_index=global_index)

    def epoch_items(self, epoch: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole epoch: [batches, batch_size] item positions and padding flags (global order)."""
        return self._plans.get(epoch, world_size)

    def _build_plan(self, epoch: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.options.seed, self.stream_key, epoch])
        total = self.num_batches(world_size) * world_size
        if not self.options.weighted:
            return self._permutation_plan(rng, total)
        draws = _Draws(self._cells, rng)
        batches = [self._compose(rng, draws, e) for e in self._experiment_sequence(rng, total)]
        items = np.stack(batches) if batches else np.zeros((0, self.options.batch_size), np.int64)
        return items, np.zeros(items.shape, dtype=bool)

    def _permutation_plan(self, rng: np.random.Generator, total: int) -> tuple[np.ndarray, np.ndarray]:
        """Every item once per epoch; the last batch of each pool wraps around (declared padding)."""
        B = self.options.batch_size
        pools = (
            [np.flatnonzero(self.experiment == e) for e in self.experiments]
            if self.options.experiment_aware
            else [np.arange(self.n)]
        )
        batches, pads = [], []
        for pool in pools:
            perm = rng.permutation(pool)
            count = math.ceil(len(perm) / B)
            slots, padded = wrap_around(np.arange(count * B), len(perm))
            batches.append(perm[slots].reshape(count, B))
            pads.append(padded.reshape(count, B))
        items, padding = np.concatenate(batches), np.concatenate(pads)
        order = rng.permutation(len(items)) if self.options.experiment_aware else np.arange(len(items))
        items, padding = items[order], padding[order]
        extra = total - len(items)  # whole batches repeated so that every rank gets as many
        if extra > 0:
            wrap = np.arange(extra) % len(items)
            items = np.concatenate([items, items[wrap]])
            padding = np.concatenate([padding, np.ones((extra, B), dtype=bool)])
        return items, padding

    def _experiment_sequence(self, rng: np.random.Generator, total: int) -> list[int | None]:
        """Each batch's experiment: counts follow the weights exactly (largest remainder), order shuffled.

        VisCy drew each batch's experiment independently; fixed counts keep the same proportions
        without the luck of the draw, so weights equal to sizes still cover every experiment evenly.
        """
        if not self.options.experiment_aware:
            return [None] * total
        if self.options.experiment_weights is not None:
            weights = np.array([self.options.experiment_weights[e] for e in self.experiments], dtype=np.float64)
        else:
            weights = np.array([self._cells.experiment_size[e] for e in self.experiments], dtype=np.float64)
        counts = _largest_remainder(weights / weights.sum(), total)
        return rng.permutation(np.repeat(self.experiments, counts)).tolist()

    def _compose(self, rng: np.random.Generator, draws: "_Draws", chosen: int | None) -> np.ndarray:
        """One weighted batch: leak, condition strata, temporal focus within each stratum."""
        o, cells = self.options, self._cells
        B = o.batch_size
        if chosen is not None:
            primary = np.flatnonzero(cells.experiment == chosen)
            others = np.flatnonzero(cells.experiment != chosen)
        else:
            primary = np.arange(len(cells.experiment))
            others = primary[:0]
        n_leak = int(B * o.leaky) if (o.experiment_aware and len(others)) else 0
        parts = []
        focal = rng.choice(np.unique(cells.hpi[primary])) if o.temporal_enrichment else None
        for stratum, n in self._strata(primary, B - n_leak):
            if focal is None:
                parts.append(draws.take(stratum, n))
                continue
            near = stratum[np.abs(cells.hpi[stratum] - focal) <= o.temporal_window_hours]
            far = stratum[np.abs(cells.hpi[stratum] - focal) > o.temporal_window_hours]
            n_far = int(n * o.temporal_global_fraction)
            if len(near) == 0:
                n_far = n
            elif len(far) == 0:
                n_far = 0
            parts.append(draws.take(near, n - n_far))
            parts.append(draws.take(far, n_far))
        parts.append(draws.take(others, n_leak))
        return np.concatenate(parts)

    def _strata(self, cells_idx: np.ndarray, n: int) -> list[tuple[np.ndarray, int]]:
        """Split n draws among the conditions present in `cells_idx` (equal, or by condition_ratio)."""
        if not self.options.condition_balanced:
            return [(cells_idx, n)]
        conds = np.unique(self._cells.condition[cells_idx])
        ratio = self.options.condition_ratio
        weights = np.ones(len(conds)) if ratio is None else np.array([ratio[c] for c in conds], dtype=np.float64)
        if weights.sum() <= 0:
            weights = np.ones(len(conds))
        counts = _largest_remainder(weights / weights.sum(), n)
        return [(cells_idx[self._cells.condition[cells_idx] == c], int(k)) for c, k in zip(conds, counts)]


def _largest_remainder(fractions: np.ndarray, n: int) -> np.ndarray:
    """Integer counts summing to n, as close to fractions * n as possible."""
    exact = fractions * n
    counts = np.floor(exact).astype(np.int64)
    short = n - counts.sum()
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


class _Cells:
    """Items grouped by (experiment, condition, HPI): the units weighted draws are made from."""

    def __init__(self, experiment: np.ndarray, condition: np.ndarray, hpi: np.ndarray) -> None:
        hpi_values, hpi_code = np.unique(hpi, return_inverse=True)
        keys = np.stack([experiment, condition, hpi_code], axis=1)
        unique, cell_of_item = (
            np.unique(keys, axis=0, return_inverse=True) if len(keys) else (np.zeros((0, 3), np.int64), np.zeros(0, np.int64))
        )
        self.experiment = unique[:, 0]
        self.condition = unique[:, 1]
        self.hpi = hpi_values[unique[:, 2]] if len(unique) else np.zeros(0)
        self.members = np.argsort(cell_of_item.ravel(), kind="stable")
        self.size = np.bincount(cell_of_item.ravel(), minlength=len(unique))
        self.start = np.concatenate([[0], np.cumsum(self.size)[:-1]]).astype(np.int64)
        self.experiment_size = {int(e): int(self.size[self.experiment == e].sum()) for e in np.unique(self.experiment)}


class _Draws:
    """Draw state of one epoch: a permutation per cell, consumed in order.

    A draw from a union of cells is uniform without replacement over the items of the union not
    yet drawn in their cell's current round; only once the whole union is used up do its cells
    reshuffle. So an item is drawn twice only after every item of the union was drawn once.
    """

    def __init__(self, cells: _Cells, rng: np.random.Generator) -> None:
        self.cells = cells
        self.rng = rng
        cell_of_slot = np.repeat(np.arange(len(cells.size)), cells.size)
        self.slots = cells.members[np.lexsort((rng.random(len(cells.members)), cell_of_slot))]
        self.pos = np.zeros(len(cells.size), dtype=np.int64)

    def take(self, cells_idx: np.ndarray, n: int) -> np.ndarray:
        """n items from the union of `cells_idx`."""
        taken: dict[int, list[np.ndarray]] = {}
        size, start = self.cells.size, self.cells.start
        while n > 0 and len(cells_idx):
            remaining = size[cells_idx] - self.pos[cells_idx]
            total = int(remaining.sum())
            if total == 0:
                self._reshuffle(cells_idx, taken)
                continue
            k = min(n, total)
            alloc = remaining if k == total else self.rng.multivariate_hypergeometric(remaining, k)
            for c, a in zip(cells_idx[alloc > 0].tolist(), alloc[alloc > 0].tolist()):
                s = start[c] + self.pos[c]
                taken.setdefault(c, []).append(self.slots[s : s + a])
                self.pos[c] += a
            n -= k
        parts = [p for ps in taken.values() for p in ps]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _reshuffle(self, cells_idx: np.ndarray, taken: dict[int, list[np.ndarray]]) -> None:
        """New round for every cell of a used-up union; items already in this batch go last."""
        for c in cells_idx.tolist():
            lo, hi = self.cells.start[c], self.cells.start[c] + self.cells.size[c]
            perm = self.rng.permutation(self.slots[lo:hi])
            if c in taken:
                recent = np.isin(perm, np.concatenate(taken[c]))
                perm = np.concatenate([perm[~recent], perm[recent]])
            self.slots[lo:hi] = perm
            self.pos[c] = 0
