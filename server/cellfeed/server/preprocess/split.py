"""Train/test split: by donor when there is a donor column, else by cell; age-stratified, seeded.

A first pass counts cells per donor and age (memory grows with donors and distinct ages, not
cells); the decision then assigns whole donors, walking them in age order (shuffled, seeded, within
strata of about 1/test_size donors of similar age) and keeping the running test share at
`test_size`, so no donor is on both sides and every age range gets its share. The
cell-level decision draws exactly round(test_size x n) cells per age (largest remainder) and marks
them as the rows stream past, so any block size gives the same split.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

TRAIN, TEST, DROPPED = 0, 1, -1
DONOR_COLUMNS = ("donor_id", "donor", "subject_id", "individual")


def _pairs(donors: pa.Array | None, ages: pa.Array, keep: np.ndarray) -> Counter:
    """Cells per (donor, age) among the kept rows, counted by Arrow's group-by."""
    columns = {"donor": donors.cast(pa.string()) if donors is not None else pa.nulls(len(ages), pa.string()), "age": ages}
    table = pa.table(columns).filter(pa.array(keep))
    grouped = table.group_by(["donor", "age"]).aggregate([([], "count_all")])
    return Counter({(d, a): n for d, a, n in zip(*(grouped[c].to_pylist() for c in ("donor", "age", "count_all")))})


class SplitCounter:
    """Pass one: cells per (donor, age); rows with a null age are counted as dropped if asked."""

    def __init__(self, by_donor: bool, drop_null_age: bool = True) -> None:
        self.by_donor = by_donor
        self.drop_null_age = drop_null_age
        self.cells: dict[Any, Counter] = defaultdict(Counter)  # donor (or None) -> age -> cells
        self.dropped = 0

    def add(self, donors: pa.Array | None, ages: pa.Array) -> None:
        keep = _keep_mask(ages, self.drop_null_age)
        self.dropped += int((~keep).sum())
        for (donor, age), n in _pairs(donors if self.by_donor else None, ages, keep).items():
            self.cells[donor][age] += n

    def decide(self, test_size: float, seed: int) -> "SplitDecision":
        """Which donors (or, without two donors, which cells of each age) go to test."""
        if not 0 < test_size < 1:
            raise ValueError(f"test_size must be between 0 and 1 (exclusive), got {test_size}")
        donors = [d for d in self.cells if sum(self.cells[d].values())]
        if self.by_donor and len(donors) >= 2:
            return _donor_split(self.cells, test_size, seed, self.dropped, self.drop_null_age)
        by_age: Counter = Counter()
        for ages in self.cells.values():
            by_age.update(ages)
        reason = "no donor column" if not self.by_donor else f"{len(donors)} donor(s): a donor split needs two"
        return _cell_split(by_age, test_size, seed, self.dropped, self.drop_null_age, reason)


def _keep_mask(ages: pa.Array, drop_null_age: bool) -> np.ndarray:
    if not drop_null_age:
        return np.ones(len(ages), dtype=bool)
    return ~np.asarray(ages.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _sort_key(age: float | None) -> tuple[bool, float]:
    return (age is None, age if age is not None else 0.0)


def _donor_split(cells: dict[Any, Counter], test_size: float, seed: int, dropped: int, drop_null: bool) -> "SplitDecision":
    names = sorted((d for d in cells if sum(cells[d].values())), key=lambda d: (d is None, str(d)))
    sizes = {d: sum(cells[d].values()) for d in names}
    age_of = {d: min(cells[d].items(), key=lambda kv: (-kv[1], _sort_key(kv[0])))[0] for d in names}
    rng = np.random.default_rng(seed)
    tiebreak = dict(zip(names, rng.permutation(len(names)).tolist()))
    by_age = sorted(names, key=lambda d: (_sort_key(age_of[d]), tiebreak[d]))
    stratum = max(2, round(1 / test_size))  # donors of similar age, shuffled among themselves
    order = [d for s in range(0, len(by_age), stratum) for d in rng.permutation(np.array(by_age[s : s + stratum], dtype=object))]
    test: set = set()
    in_test = total = 0
    for donor in order:
        total += sizes[donor]
        target = test_size * total
        if abs(in_test + sizes[donor] - target) < abs(in_test - target):
            test.add(donor)
            in_test += sizes[donor]
    if not test:  # a small donor set: give the test side the donor closest to its share
        test.add(min(order, key=lambda d: (abs(sizes[d] - test_size * total), tiebreak[d])))
    if len(test) == len(order):
        test.discard(max(test, key=lambda d: (sizes[d], tiebreak[d])))
    return SplitDecision(
        level="donor",
        donor_test={d: d in test for d in names},
        dropped=dropped,
        drop_null_age=drop_null,
    )


def _cell_split(by_age: Counter, test_size: float, seed: int, dropped: int, drop_null: bool, reason: str) -> "SplitDecision":
    strata = sorted(by_age, key=_sort_key)
    sizes = np.array([by_age[a] for a in strata], dtype=np.int64)
    total = int(sizes.sum())
    want = min(max(round(test_size * total), 1 if total >= 2 else 0), max(total - 1, 0))
    exact = sizes * (want / total) if total else sizes.astype(float)
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(strata)), -(exact - quota)))  # largest remainder first
    quota[order[: want - int(quota.sum())]] += 1
    rng = np.random.default_rng(seed)
    chosen = {a: np.sort(rng.choice(int(n), int(k), replace=False)) for a, n, k in zip(strata, sizes, quota)}
    return SplitDecision(level="cell", chosen=chosen, dropped=dropped, drop_null_age=drop_null, reason=reason)


@dataclass
class SplitDecision:
    """Which donors (or which cells of each age) go to test; `assigner()` applies it to rows."""

    level: str
    dropped: int
    drop_null_age: bool
    donor_test: dict[Any, bool] = field(default_factory=dict)
    chosen: dict[float | None, np.ndarray] = field(default_factory=dict)
    reason: str = ""

    def assigner(self) -> "Assigner":
        return Assigner(self)

    def describe(self) -> dict:
        """JSON-able facts for the manifest and the log."""
        out: dict[str, Any] = {"by": self.level, "dropped_null_age": self.dropped}
        if self.level == "donor":
            out["test_donors"] = sorted(str(d) for d, t in self.donor_test.items() if t)
            out["train_donors"] = sorted(str(d) for d, t in self.donor_test.items() if not t)
        else:
            out["reason"] = self.reason
            out["strata"] = len(self.chosen)
        return out


class Assigner:
    """Pass two: TRAIN, TEST or DROPPED per row; call it on consecutive blocks in file order."""

    def __init__(self, decision: SplitDecision) -> None:
        self.decision = decision
        self._seen: Counter = Counter()

    def codes(self, donors: pa.Array | None, ages: pa.Array) -> np.ndarray:
        keep = _keep_mask(ages, self.decision.drop_null_age)
        out = np.full(len(ages), DROPPED, dtype=np.int8)
        if self.decision.level == "donor":
            assert donors is not None
            encoded = donors.cast(pa.string()).dictionary_encode()
            flags = np.array([self.decision.donor_test.get(d, False) for d in encoded.dictionary.to_pylist()] + [self.decision.donor_test.get(None, False)])
            index = encoded.indices.fill_null(len(flags) - 1).to_numpy(zero_copy_only=False)
            out[keep] = np.where(flags[index], TEST, TRAIN)[keep]
            return out
        encoded = ages.dictionary_encode()
        strata = encoded.dictionary.to_pylist() + [None]
        index = encoded.indices.fill_null(len(strata) - 1).to_numpy(zero_copy_only=False)
        for code in np.unique(index[keep]):
            rows = np.flatnonzero((index == code) & keep)
            age = strata[code]
            local = self._seen[age] + np.arange(len(rows))
            self._seen[age] += len(rows)
            chosen = self.decision.chosen.get(age, np.zeros(0, np.int64))
            out[rows] = np.where(np.isin(local, chosen, assume_unique=True), TEST, TRAIN)
        return out

