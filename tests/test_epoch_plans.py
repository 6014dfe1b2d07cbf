"""Epoch plans: built once, the next epoch built ahead, the same plans a cold build gives."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cellfeed.server.errors import CellfeedError
from cellfeed.server.samplers.plans import EpochPlans


def test_each_plan_is_built_once_and_the_next_epoch_ahead():
    built: list[tuple[int, int]] = []
    release = threading.Event()

    def build(epoch: int, world_size: int) -> tuple[int, int]:
        if epoch == 1:
            release.wait(5)  # epoch 1 builds in the background while epoch 0 is served
        built.append((epoch, world_size))
        return epoch, world_size

    plans = EpochPlans(build)
    assert plans.get(0, 2) == (0, 2)
    assert built == [(0, 2)]  # epoch 1 is under way, not done
    release.set()
    deadline = time.monotonic() + 5
    while (1, 2) not in built and time.monotonic() < deadline:
        time.sleep(0.01)
    assert built == [(0, 2), (1, 2)]
    assert plans.get(1, 2) == (1, 2) and plans.get(0, 2) == (0, 2)
    assert built.count((1, 2)) == 1 and built.count((0, 2)) == 1


def test_a_failed_build_raises_for_whoever_asks():
    def build(epoch: int) -> int:
        raise CellfeedError(f"no plan for epoch {epoch}")

    plans = EpochPlans(build)
    with pytest.raises(CellfeedError, match="epoch 3"):
        plans.get(3)


def test_weighted_plans_built_ahead_equal_cold_builds():
    from cellfeed.server.kinds.dynaclr.sampler import FlexibleBatchSampler, FlexibleOptions

    rng = np.random.default_rng(0)
    n = 3000
    args = (rng.integers(0, 3, n), rng.integers(0, 2, n), rng.uniform(0, 24, n))
    options = FlexibleOptions(batch_size=32, experiment_aware=True, condition_balanced=True, temporal_enrichment=True, seed=4)
    warm = FlexibleBatchSampler(*args, options)
    for epoch in range(3):
        items, padding = warm.epoch_items(epoch, 2)
        cold_items, cold_padding = FlexibleBatchSampler(*args, options).epoch_items(epoch, 2)
        np.testing.assert_array_equal(items, cold_items)
        np.testing.assert_array_equal(padding, cold_padding)
