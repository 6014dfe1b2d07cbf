"""A closed session's memory is freed when it closes, not at some later full GC (issue 15).

A server allocates few Python container objects per batch (its batches are numpy and Arrow
buffers), so CPython's full collection runs seldom: anything a closed session leaves in a
reference cycle stays in memory for hundreds of sessions. Here the cyclic GC is off, so only
reference counting frees what the session held.
"""

from __future__ import annotations

import gc
import time
import weakref

from cellfeed.server.context import ServerContext
from cellfeed.server.kinds import source_class
from cellfeed.server.kinds.perturbation.sampler import PerturbationSampler
from cellfeed.server.samplers.plans import EpochPlans
from cellfeed.server.serving.sessions import SessionRegistry
from cellfeed.server.settings import Settings


class _Sampler:
    def __init__(self) -> None:
        self.built: list[int] = []
        self.plans: EpochPlans[list[int]] = EpochPlans(self._build)

    def _build(self, epoch: int) -> list[int]:
        self.built.append(epoch)
        return [epoch] * 3


def _alive(cls: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is cls)


def _settled(before: int) -> bool:
    """Whether the live samplers are down to `before` (the last source's next epoch may still be
    building in the background for a moment: that holds it until the build ends)."""
    for _ in range(100):
        if _alive(PerturbationSampler) == before:
            return True
        time.sleep(0.05)
    return False


def test_epoch_plans_do_not_keep_their_sampler_alive():
    gc.disable()
    try:
        sampler = _Sampler()
        assert sampler.plans.get(0) == [0, 0, 0]
        assert sampler.plans.get(1) == [1, 1, 1]  # built ahead while epoch 0 was asked for
        assert sorted(sampler.built) == [0, 1, 2]
        gone = weakref.ref(sampler)
        del sampler
        assert gone() is None, "the sampler is in a reference cycle: only a full GC would free it"
    finally:
        gc.enable()


def test_plain_functions_still_build_plans():
    plans: EpochPlans[int] = EpochPlans(lambda epoch: epoch * 10)
    assert plans.get(2) == 20 and plans.get(3) == 30


def test_a_closed_perturbation_source_leaves_no_sampler_behind(pert_root):
    ctx = ServerContext.from_settings(Settings(data_root=str(pert_root)))
    gc.collect()
    before = _alive(PerturbationSampler)
    gc.disable()
    try:
        for seed in range(3):
            source = source_class("perturbation").open({"files": ["k562.h5ad"], "group_size_S": 4, "batch_size": 4, "seed": seed}, ctx)
            source.batch(source.splits()[0], 0, 0, 1, 0)  # plans epoch 0 (and 1, ahead)
            source.close()
            del source
        assert _settled(before), "closed sources' samplers stay until a full GC"
    finally:
        gc.enable()
        ctx.handles.close()


def test_evicted_sessions_leave_no_sampler_and_no_opening_lock(pert_root):
    ctx = ServerContext.from_settings(Settings(data_root=str(pert_root), session_idle_seconds=3600))
    registry = SessionRegistry(ctx, sweep_seconds=0)
    gc.collect()
    before = _alive(PerturbationSampler)
    try:
        for seed in range(3):
            source = registry.open("perturbation", {"files": ["k562.h5ad"], "group_size_S": 4, "batch_size": 4, "seed": seed}).source
            source.batch(source.splits()[0], 0, 0, 1, 0)
            del source
        assert len(registry._opening) == 3
        registry.evict(now=float("inf"))
        assert len(registry) == 0 and registry._opening == {}
        assert _settled(before)
    finally:
        registry.close()
        ctx.handles.close()
