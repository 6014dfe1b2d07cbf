"""Epoch plans built once each, and the next epoch's built ahead in the background.

A weighted plan over a million anchors takes about a second to build; asking for epoch e also
starts epoch e + 1, so the first batch of the next epoch does not wait for it.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

P = TypeVar("P")


class EpochPlans(Generic[P]):
    """`get(epoch, *key)` gives `build(epoch, *key)`, built once; the last `keep` are kept.

    A sampler's own method as `build` is held weakly: a strong one would make a cycle (sampler ->
    plans -> bound method -> sampler) that only the cyclic GC frees, which in a server that
    allocates few Python objects runs seldom, so a closed session's plans, pools and arrays
    stayed in memory (issue 15: ~5 MB per closed session, hundreds of sessions long)."""

    def __init__(self, build: Callable[..., P], keep: int = 4) -> None:
        self._build = weakref.WeakMethod(build) if hasattr(build, "__self__") and hasattr(build, "__func__") else (lambda: build)
        self._keep = keep
        self._plans: OrderedDict[tuple[Hashable, ...], Future[P]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def get(self, epoch: int, *key: Hashable) -> P:
        plan = self._submit(epoch, key)
        self._submit(epoch + 1, key)
        return plan.result()

    def _submit(self, epoch: int, key: tuple[Hashable, ...]) -> Future[P]:
        with self._lock:
            found = self._plans.get((epoch, *key))
            if found is not None:
                self._plans.move_to_end((epoch, *key))
                return found
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellfeed-plan")
            build = self._build()
            if build is None:
                raise RuntimeError("EpochPlans: its sampler is gone")
            future = self._pool.submit(build, epoch, *key)
            self._plans[(epoch, *key)] = future
            while len(self._plans) > self._keep:
                self._plans.popitem(last=False)
            return future
