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


def _samplers():
    """One sampler of each planner: dynaclr's flexible and sequential, and the table's."""
    from cellfeed.server.kinds.dynaclr.sampler import FlexibleBatchSampler, FlexibleOptions
    from cellfeed.server.kinds.table.sampler import TableSampler
    from cellfeed.server.samplers.sequential import SequentialSampler

    n = 50
    rng = np.random.default_rng(1)
    flexible = FlexibleBatchSampler(rng.integers(0, 2, n), rng.integers(0, 2, n), rng.uniform(0, 5, n), FlexibleOptions(batch_size=8, condition_balanced=False))
    table = TableSampler(np.array([0, 20, 50]), 8, shuffle=True, seed=3, drop_last=False, window=1)
    return {"flexible": (flexible, n), "sequential": (SequentialSampler(n, 8), n), "table": (table, n)}


@pytest.mark.parametrize("name", ["flexible", "sequential", "table"])
def test_every_sampler_plans_typed_batches_and_the_base_checks_ranks(name):
    from cellfeed.server.samplers.base import PlannedBatch

    sampler, n = _samplers()[name]
    world = 3
    per_rank = sampler.num_batches(world)
    served = []
    for rank in range(world):
        for k in range(per_rank):
            planned = sampler.batch(0, rank, world, k)
            assert isinstance(planned, PlannedBatch)
            assert planned.global_index == k * world + rank
            assert planned.items.shape == planned.padding.shape
            served.append(planned)
    real = np.concatenate([p.items[~p.padding] for p in served])
    assert sorted(real.tolist()) == list(range(n))  # every item once, the rest declared padding
    assert sum(int(p.padding.sum()) for p in served) == sum(len(p.items) for p in served) - n
    with pytest.raises(CellfeedError, match=r"rank 3 is outside world size 3"):
        sampler.batch(0, 3, world, 0)
    with pytest.raises(CellfeedError, match=rf"batch {per_rank} is outside this epoch's {per_rank} batches per rank"):
        sampler.batch(0, 0, world, per_rank)
