"""A closed session's memory is freed when it closes, not at some later full GC (issue 15).

A server allocates few Python container objects per batch (its batches are numpy and Arrow
buffers), so CPython's full collection runs seldom: anything a closed session leaves in a
reference cycle stays in memory for hundreds of sessions. Here the cyclic GC is off, so only
reference counting frees what the session held.
"""

from __future__ import annotations

import gc
import weakref

from cellfeed.server.context import ServerContext
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


def test_an_evicted_perturbation_session_leaves_no_sampler_behind(pert_root):
    ctx = ServerContext.from_settings(Settings(data_root=str(pert_root), session_idle_seconds=3600))
    registry = SessionRegistry(ctx, sweep_seconds=0)
    gc.collect()
    before = _alive(PerturbationSampler)
    gc.disable()
    try:
        for seed in range(3):
            source = registry.open("perturbation", {"files": ["k562.h5ad"], "group_size_S": 4, "batch_size": 4, "seed": seed}).source
            split = source.splits()[0]
            source.batch(split, 0, 0, 1, 0)  # plans epoch 0 (and 1, ahead)
            del source
        assert _alive(PerturbationSampler) >= before + 3
        registry.evict(now=float("inf"))
        assert len(registry) == 0
        assert _alive(PerturbationSampler) == before, "closed sessions' samplers stay until a full GC"
    finally:
        gc.enable()
        registry.close()
        ctx.handles.close()
