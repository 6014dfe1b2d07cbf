"""The one interface every stream kind implements: open a config, plan epochs, build batches.

A source is a pure function of its config: `batch(split, epoch, rank, world_size, k)` must give
the same record batch in any server process, so resume and fail-over need no server memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Union

import numpy as np
import pyarrow as pa

from cellfeed.server.errors import CellfeedError

# what a buffer holds: one column's values, or several columns' (equal shares of its first axis, in order)
Columns = Union[str, tuple[str, ...]]


class Buffers(ABC):
    """Where a source writes the values of its large columns, handed to it by serving.

    Serving decides what backs them (plain memory over gRPC, shared memory on one host); a source
    writes each column's final values into the array it got, so nothing is copied afterwards.
    """

    @abstractmethod
    def arrays(self, wanted: dict[Columns, tuple[tuple[int, ...], np.dtype]]) -> dict[Columns, np.ndarray]:
        """C-contiguous arrays of these shapes and dtypes, asked for together (a CSR's indices
        and values, say): key `(a, b)` is one array whose first half holds column a's values and
        second half column b's."""

    def array(self, columns: Columns, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """One array for `columns` (see `arrays`)."""
        return self.arrays({columns: (shape, dtype)})[columns]


class HeapBuffers(Buffers):
    """New arrays in the process heap: what a batch sent over gRPC is built in."""

    def arrays(self, wanted: dict[Columns, tuple[tuple[int, ...], np.dtype]]) -> dict[Columns, np.ndarray]:
        return {columns: np.empty(shape, dtype) for columns, (shape, dtype) in wanted.items()}


HEAP = HeapBuffers()

if TYPE_CHECKING:
    from cellfeed.server.context import ServerContext
    from cellfeed.server.samplers.base import Sampler


class Source(ABC):
    """A session's batch producer for one kind ("perturbation", "dynaclr", "table").

    `open` sets `samplers` (split -> its sampler, samplers/) and `config` (with `batch_size`).
    """

    kind: ClassVar[str]
    samplers: dict[str, "Sampler"]
    config: Any

    @classmethod
    @abstractmethod
    def open(cls, config: dict[str, Any], ctx: "ServerContext") -> "Source":
        """Validate `config` and open what it names; raise CellfeedError naming any fault."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """JSON-able facts the client needs: splits, vocabularies, shapes, var names."""

    def tables(self) -> dict[str, pa.Table]:
        """Side tables sent once with the session (e.g. target embeddings)."""
        return {}

    def splits(self) -> list[str]:
        """The split names this session can stream (e.g. train, val, test)."""
        return list(self.samplers)

    def sampler(self, split: str) -> "Sampler":
        """The sampler of `split`; an unknown split is refused (invalid, not not_found: retrying
        cannot make it exist) with the ones there are."""
        try:
            return self.samplers[split]
        except KeyError:
            raise CellfeedError(f"unknown split {split!r}; this {self.kind} session has {', '.join(self.splits())}") from None

    @abstractmethod
    def schema(self, split: str) -> pa.Schema:
        """The schema of every record batch of `split`."""

    def batch_size(self, split: str) -> int:
        """Training items per batch in `split`."""
        self.sampler(split)
        return self.config.batch_size

    def num_batches(self, split: str, world_size: int) -> int:
        """Batches per rank in one epoch; the same on every rank and in every epoch."""
        return self.sampler(split).num_batches(world_size)

    @abstractmethod
    def batch(self, split: str, epoch: int, rank: int, world_size: int, index: int, *, buffers: Buffers = HEAP) -> pa.RecordBatch:
        """Rank-local batch `index` of `epoch`. Thread-safe: several streams call it at once.

        The values of large tensor columns and of marked list columns are written into arrays
        from `buffers`, named by their columns (the rest may be made anywhere).
        """

    def nbytes(self) -> int:
        """Bytes this session holds beyond the shared caches (for the session memory budget):
        by default, the tables it sends with the session."""
        return sum(t.nbytes for t in self.tables().values())

    def close(self) -> None:
        """Release what `open` acquired beyond the shared handle cache."""
