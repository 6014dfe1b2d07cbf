"""An input h5ad as a stream of Arrow tables: obs_names, every obs column, age, cell sentences.

Blocks are bounded by rows and by non-zeros, so memory does not depend on the file; two threads
rank and assemble blocks while the caller writes, and the tables come back in row order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cellfeed.server.errors import CellfeedError
from cellfeed.server.preprocess import age as age_mod
from cellfeed.server.preprocess import sentences
from cellfeed.server.preprocess.genes import GeneSymbols
from cellfeed.server.preprocess.h5ad_reader import OBS_NAMES, H5adInput
from cellfeed.server.preprocess.threads import ordered_map

SENTENCE_COLUMNS = ("cell_sentence", "genes", "values")
RESERVED = {OBS_NAMES, "age", *SENTENCE_COLUMNS}


class Cancelled(Exception):
    """The job this file belongs to was cancelled."""


@dataclass(frozen=True)
class BlockOptions:
    top_genes: int = 2000
    max_rows: int = 4096
    max_nnz: int = 6_000_000
    threads: int = 2


@dataclass(frozen=True)
class AgeSource:
    """Which obs columns give the age: the stage label and, if present, its ontology term ID."""

    label_column: str | None
    term_column: str | None


def plan_blocks(indptr: np.ndarray, max_rows: int, max_nnz: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of at most `max_rows` rows and about `max_nnz` non-zeros each."""
    n = len(indptr) - 1
    blocks = []
    start = 0
    while start < n:
        stop = min(start + max_rows, n)
        by_nnz = int(np.searchsorted(indptr, indptr[start] + max_nnz, side="right")) - 1
        stop = max(start + 1, min(stop, by_nnz))
        blocks.append((start, stop))
        start = stop
    return blocks


class Converter:
    """Turns one H5adInput into tables; `table(start, stop)` is thread-safe and pure."""

    def __init__(self, source: H5adInput, symbols: GeneSymbols, options: BlockOptions, age: AgeSource | None = None) -> None:
        if options.top_genes < 1:
            raise CellfeedError(f"top_genes must be at least 1, got {options.top_genes}")
        self.source = source
        self.options = options
        self.age = age
        self._symbols = symbols.arrow()
        self._named = symbols.mapped
        self._renamed = {c: (f"obs_{c}" if c in RESERVED else c) for c in source.obs_columns}
        limit = sentences.rows_per_block_limit(source.n_vars)
        self.blocks = plan_blocks(source.indptr, min(options.max_rows, limit), options.max_nnz)

    def table(self, block: tuple[int, int]) -> pa.Table:
        start, stop = block
        obs = self.source.obs(start, stop)
        columns: dict[str, pa.Array] = {self._renamed.get(k, k): v for k, v in obs.items()}
        if self.age is not None:
            labels = obs.get(self.age.label_column) if self.age.label_column else None
            terms = obs.get(self.age.term_column) if self.age.term_column else None
            columns["age"] = age_mod.ages(labels, terms)
        indptr, indices, data = self.source.x_rows(start, stop)
        ranked = sentences.rank(indptr, indices, data, self.source.n_vars, self.options.top_genes, self._named)
        columns.update(sentences.columns(*ranked, self._symbols))
        return pa.table(columns)

    def tables(self, cancelled: Callable[[], bool] = lambda: False) -> Iterator[pa.Table]:
        """Every block's table in row order; raises Cancelled between blocks when asked to stop."""
        for table in ordered_map(self.table, self.blocks, workers=self.options.threads, ahead=self.options.threads + 1):
            if cancelled():
                raise Cancelled()
            yield table

    def output_name(self, column: str) -> str:
        """The name an obs column has in the output tables."""
        return self._renamed.get(column, column)

    @property
    def renamed(self) -> dict[str, str]:
        """obs columns renamed because their name is one the pipeline writes (name -> obs_name)."""
        return {k: v for k, v in self._renamed.items() if k != v}
