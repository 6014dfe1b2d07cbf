"""Lineages (tracks joined through parent_track_id) and the (lineage, t) lookup of positives.

Everything is vectorised: roots by pointer doubling (cycle-safe), anchor validity and positive
lookup through a dense lineage-by-frame grid, so millions of rows take seconds.
"""

from __future__ import annotations

import numpy as np


def lineage_roots(group: np.ndarray, track: np.ndarray, parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Root track id of each track (one entry per track; `group` is the FOV a track belongs to),
    and a mask of the tracks whose ancestry runs into a parent cycle.

    A parent that is NaN, negative, the track itself or absent from the same group makes the
    track its own root. Tracks on a parent cycle, and their descendants, take the smallest
    track id of the cycle as root, so the result never depends on where the cycle is entered.
    """
    n = len(track)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    track = track.astype(np.int64)
    span = int(track.max()) + 1
    keys = group.astype(np.int64) * span + track
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    has_parent = np.isfinite(parent) & (parent >= 0)
    parent_ids = np.where(has_parent, parent, -1).astype(np.int64)
    parent_keys = group.astype(np.int64) * span + parent_ids
    pos = np.clip(np.searchsorted(sorted_keys, parent_keys), 0, n - 1)
    found = has_parent & (parent_ids < span) & (sorted_keys[pos] == parent_keys)
    own = np.arange(n)
    up = np.where(found, order[pos], own)
    rounds = max(1, int(np.ceil(np.log2(n))) + 1)
    jump = up.copy()
    for _ in range(rounds):
        jump = jump[jump]
    is_root = up == own
    settled = is_root[jump]
    roots = track[jump]
    if not settled.all():
        # jump[i] now lies on the cycle i leads into; take the cycle's smallest track id.
        least = track.copy()
        step = up.copy()
        for _ in range(rounds):
            least = np.minimum(least, least[step])
            step = step[step]
        roots = np.where(settled, roots, least[jump])
    return roots, ~settled


class LineageGrid:
    """Rows laid out on a dense (lineage, frame) grid: which rows sit at (lineage of r, t of r + tau).

    Each lineage owns the cells of frames tmin..tmax; a cell lists the rows (siblings included)
    observed in that lineage at that frame. Built once per index; read-only afterwards.
    """

    def __init__(self, lineage: np.ndarray, t: np.ndarray) -> None:
        n = len(lineage)
        lineage = lineage.astype(np.int64)
        t = t.astype(np.int64)
        self.rows_by_cell = np.lexsort((t, lineage))
        num = int(lineage.max()) + 1 if n else 0
        tmin = np.full(num, np.iinfo(np.int64).max, dtype=np.int64)
        tmax = np.full(num, -1, dtype=np.int64)
        if n:
            ls, ts_ = lineage[self.rows_by_cell], t[self.rows_by_cell]
            first = np.r_[True, ls[1:] != ls[:-1]]
            last = np.r_[ls[1:] != ls[:-1], True]
            tmin[ls[first]] = ts_[first]
            tmax[ls[last]] = ts_[last]
        span = np.where(tmax >= 0, tmax - tmin + 1, 0)
        offset = np.concatenate([[0], np.cumsum(span)[:-1]]).astype(np.int64)
        self.t = t
        self.cell = offset[lineage] - tmin[lineage] + t if n else np.zeros(0, dtype=np.int64)
        self.row_tmax = tmax[lineage] if n else np.zeros(0, dtype=np.int64)
        total = int(span.sum())
        self.count = np.bincount(self.cell, minlength=total).astype(np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]]).astype(np.int64)

    def present(self, rows: np.ndarray, tau: np.ndarray | int) -> np.ndarray:
        """Whether the lineage of each row has an observation tau frames later."""
        later = self.t[rows] + tau
        inside = later <= self.row_tmax[rows]
        cell = np.where(inside, self.cell[rows] + tau, 0)
        return inside & (self.count[cell] > 0) if len(self.count) else np.zeros(np.shape(inside), dtype=bool)

    def pick(self, rows: np.ndarray, tau: np.ndarray, u: np.ndarray) -> np.ndarray:
        """For each row, the row at (its lineage, t + tau) chosen by u in [0, 1); tau must be present."""
        cell = self.cell[rows] + tau
        k = np.minimum((u * self.count[cell]).astype(np.int64), self.count[cell] - 1)
        return self.rows_by_cell[self.start[cell] + k]


def valid_anchors(grid: LineageGrid, tau_lo: np.ndarray, tau_hi: np.ndarray) -> np.ndarray:
    """Rows with an observation of their lineage at t + tau for some tau >= 1 in [tau_lo, tau_hi]."""
    rows = np.arange(len(grid.t))
    valid = np.zeros(len(rows), dtype=bool)
    if len(rows) == 0:
        return valid
    for tau in range(1, int(tau_hi.max()) + 1):
        in_range = (tau_lo <= tau) & (tau <= tau_hi) & ~valid
        if in_range.any():
            candidates = rows[in_range]
            valid[candidates] = grid.present(candidates, tau)
    return valid
