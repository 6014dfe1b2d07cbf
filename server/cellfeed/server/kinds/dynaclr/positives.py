"""Positives: for each anchor, an observation of the same lineage tau frames later.

tau follows the exponential decay of `tau.py`, restricted to the offsets where the lineage was
actually observed (VisCy instead drew tau blindly and scanned upward on a miss). The random
generator is the caller's, seeded by (seed, epoch, batch): the same batch has the same positives.
"""

from __future__ import annotations

import numpy as np

from cellfeed.server.kinds.dynaclr.lineage import LineageGrid
from cellfeed.server.kinds.dynaclr.tau import tau_weight_matrix


class PositiveSampler:
    """Draws positives for anchor rows of a cell index; read-only, so safe across threads."""

    def __init__(self, grid: LineageGrid, experiment: np.ndarray, tau_frames: list[tuple[int, int]], decay: float) -> None:
        self.grid = grid
        self.experiment = experiment
        self.weights = tau_weight_matrix(tau_frames, decay)[:, 1:]  # tau = 1..K
        self.taus = np.arange(1, self.weights.shape[1] + 1)

    def sample(self, anchors: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(positive rows, tau in frames) for each anchor; every anchor must be a valid one."""
        weights = self.weights[self.experiment[anchors]] * self.grid.present(anchors[:, None], self.taus[None, :])
        total = weights.sum(axis=1)
        if len(anchors) and not (total > 0).all():
            raise ValueError("an anchor without any positive in its tau range reached the positive sampler")
        cdf = np.cumsum(weights, axis=1)
        u = rng.random(len(anchors)) * total  # strictly below the last cdf value
        choice = (cdf <= u[:, None]).sum(axis=1)  # the first tau whose cdf exceeds u: never a zero weight
        tau = self.taus[choice]
        return self.grid.pick(anchors, tau, rng.random(len(anchors))), tau
