"""Fixed control pairs: cell-load's `cache_perturbation_control_pairs=True`.

Each cell of a split (perturbed, or a control item) is given its control once, when the session
opens, and keeps it every epoch: per group (file, cell type, target), a seeded shuffle of the
group's control pool dealt to the group's cells in row order, without replacement; cell-load
asserts when the pool is smaller than the group, here the shuffled pool is dealt again (each
control then serves ceil(n / pool) cells). Without it, controls are drawn afresh per batch.
"""

from __future__ import annotations

import numpy as np

from cellfeed.server.kinds.perturbation.layout import Group


class FixedPairs:
    """The control row of every row of a split's groups, drawn once (seed, stream key)."""

    def __init__(self, groups: list[Group], pools: list[np.ndarray], pool_of_group: np.ndarray, *, seed: int, stream_key: int) -> None:
        self._rows: list[np.ndarray] = []  # per group: its rows, ascending
        self._controls: list[np.ndarray] = []  # per group: the control of each of those rows
        for g, group in enumerate(groups):
            pool = pools[int(pool_of_group[g])]
            rng = np.random.default_rng([seed, stream_key, g, 2])
            n = len(group.rows)
            dealt = np.concatenate([rng.permutation(pool) for _ in range(-(-n // len(pool)))])[:n] if len(pool) else np.zeros(0, np.int64)
            self._rows.append(np.asarray(group.rows, dtype=np.int64))
            self._controls.append(dealt.astype(np.int64))

    def controls(self, group: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[B, S] control rows of the items' rows [B, S] (item b's rows all in group[b])."""
        out = np.empty(rows.shape, dtype=np.int64)
        for b, g in enumerate(group.tolist()):
            own = self._rows[g]
            out[b] = self._controls[g][np.searchsorted(own, rows[b])]
        return out
