"""Temporal offsets between anchor and positive, in frames, favouring short offsets.

P(tau) is proportional to exp(-decay * (tau - tau_min) / (tau_max - tau_min)) over the integers of
[tau_min, tau_max]; decay 0 is uniform. tau = 0 never counts: a positive lies in the future.
"""

from __future__ import annotations

import numpy as np


def tau_probabilities(tau_min: int, tau_max: int, decay: float) -> tuple[np.ndarray, np.ndarray]:
    """The offsets tau >= 1 of [tau_min, tau_max] and their probabilities (empty if none)."""
    taus = np.arange(max(tau_min, 1), tau_max + 1, dtype=np.int64)
    if len(taus) == 0:
        return taus, np.zeros(0)
    span = tau_max - tau_min
    weights = np.exp(-decay * (taus - tau_min) / span) if span > 0 else np.ones(len(taus))
    return taus, weights / weights.sum()


def tau_weight_matrix(ranges: list[tuple[int, int]], decay: float) -> np.ndarray:
    """[experiments, K+1] weights over tau = 0..K (K the largest tau_max): row e sums to 1."""
    width = max(hi for _, hi in ranges) + 1 if ranges else 1
    out = np.zeros((len(ranges), width))
    for e, (lo, hi) in enumerate(ranges):
        taus, probs = tau_probabilities(lo, hi, decay)
        out[e, taus] = probs
    return out
