"""Run a function over items on a few threads and get the results back in input order.

numpy sorts, Arrow kernels and parquet compression release the GIL, so two threads keep two
cores busy; at most `ahead` results wait in memory, which bounds the pipeline's footprint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int = 2, ahead: int = 3) -> Iterator[R]:
    """fn(item) for each item, in order, computed up to `ahead` items in advance."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="preprocess")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(1, ahead):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
