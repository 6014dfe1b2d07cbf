"""A byte-bounded LRU cache of decoded blocks (CSR row blocks, parquet row groups), shared by
every session of a server.

Plans read each block once per epoch and every rank and stream of a job draws its batches from
the same few blocks at about the same time, so one read serves them all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np


class Sized(Protocol):
    """What the cache holds: anything that knows its size (CSRBlock, pyarrow.Table)."""

    @property
    def nbytes(self) -> int: ...


B = TypeVar("B", bound=Sized)


@dataclass(frozen=True)
class CSRBlock:
    """Contiguous rows of X held in memory: indptr (int32, from 0), indices (int32, or uint16 for up
    to 65,536 columns), data (float32)."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray

    @property
    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.indptr, self.indices, self.data

    @property
    def nbytes(self) -> int:
        return self.indptr.nbytes + self.indices.nbytes + self.data.nbytes


class BlockCache:
    """Keeps recently used blocks up to `max_bytes`; loads a missing block once, even if several
    threads ask for it together."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[Hashable, Sized] = OrderedDict()
        self._loading: dict[Hashable, threading.Event] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, load: Callable[[], B]) -> B:
        while True:
            with self._lock:
                block = self._blocks.get(key)
                if block is not None:
                    self._blocks.move_to_end(key)
                    self.hits += 1
                    return block  # type: ignore[return-value]
                waiter = self._loading.get(key)
                if waiter is None:
                    self._loading[key] = threading.Event()
                    self.misses += 1
                    break
            waiter.wait()
        try:
            block = load()
        finally:
            with self._lock:
                self._loading.pop(key).set()
        with self._lock:
            self._store(key, block)
        return block

    def _store(self, key: Hashable, block: Sized) -> None:
        size = block.nbytes
        if key in self._blocks:
            return
        self._blocks[key] = block
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self._bytes -= old.nbytes

    def forget(self, handle: object) -> int:
        """Drop the blocks read through `handle` (keys `(handle, ...)`), which is being closed: a
        file opened again gets a new handle, and its old blocks would only take up the budget."""
        with self._lock:
            gone = [key for key in self._blocks if isinstance(key, tuple) and key and key[0] is handle]
            for key in gone:
                self._bytes -= self._blocks.pop(key).nbytes
        return len(gone)

    @property
    def nbytes(self) -> int:
        return self._bytes
