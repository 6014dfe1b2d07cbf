"""An input h5ad to parquet chunks: obs_names, every obs column, age, and the cell sentences.

Each output chunk file is one task: the rows it holds are known up front (from the split codes),
so tasks run on parallel threads, each ranking, encoding and compressing its own file. A task
works through its rows a few hundred at a time, reading X in contiguous runs, so memory stays
bounded by the thread count, not the file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from cellfeed.server.errors import CellfeedError
from cellfeed.server.preprocess import age as age_mod
from cellfeed.server.preprocess import sentences
from cellfeed.server.preprocess.chunks import ROW_GROUP_ROWS, open_parquet
from cellfeed.server.preprocess.genes import GeneSymbols
from cellfeed.server.preprocess.h5ad_reader import OBS_NAMES, H5adInput

SENTENCE_COLUMNS = ("cell_sentence", "genes", "values")
RESERVED = {OBS_NAMES, "age", *SENTENCE_COLUMNS}
SCAN_ROWS = 1 << 20  # rows of split codes looked at per step when choosing chunks


class Cancelled(Exception):
    """The job this file belongs to was cancelled."""


@dataclass(frozen=True)
class BlockOptions:
    top_genes: int = 2000
    group_nnz: int = 4_000_000  # non-zeros per row group at most (rows: ROW_GROUP_ROWS at most)
    rank_rows: int = 512  # rows ranked at once: small arrays stay in the allocator's cache
    threads: int = 2
    compression: str = "zstd"
    compression_level: int | None = 1


@dataclass(frozen=True)
class AgeSource:
    """Which obs columns give the age: the stage label and, if present, its ontology term ID."""

    label_column: str | None
    term_column: str | None


@dataclass(frozen=True)
class ChunkTask:
    """One output file: the rows of [start, stop) whose split code is `code` (all rows if None)."""

    folder: Path
    index: int
    start: int
    stop: int
    code: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / f"chunk_{self.index:04d}.parquet"


def chunk_tasks(folder: Path, n_obs: int, chunk_size: int, codes: np.ndarray | None = None, code: int | None = None) -> list[ChunkTask]:
    """Cut the rows (all, or those with `code`) into files of `chunk_size` rows, in row order."""
    if chunk_size < 1:
        raise CellfeedError(f"chunk_size must be at least 1, got {chunk_size}")
    if codes is None:
        starts = list(range(0, n_obs, chunk_size))
    else:
        starts, seen = [], 0
        for offset in range(0, n_obs, SCAN_ROWS):
            hits = np.flatnonzero(codes[offset : offset + SCAN_ROWS] == code)
            starts += (offset + hits[(-seen) % chunk_size :: chunk_size]).tolist()
            seen += len(hits)
    stops = starts[1:] + [n_obs]
    return [ChunkTask(folder, i, a, b, code) for i, (a, b) in enumerate(zip(starts, stops))]


class Converter:
    """Makes the output rows of one H5adInput; every method is thread-safe."""

    def __init__(self, source: H5adInput, symbols: GeneSymbols, options: BlockOptions, age: AgeSource | None = None) -> None:
        if options.top_genes < 1:
            raise CellfeedError(f"top_genes must be at least 1, got {options.top_genes}")
        self.source = source
        self.options = options
        self.age = age
        self._symbols = symbols.arrow()
        self._named = symbols.mapped
        self._renamed = {c: (f"obs_{c}" if c in RESERVED else c) for c in source.obs_columns}
        self._rank_rows = min(options.rank_rows, sentences.rows_per_block_limit(source.n_vars))

    def output_name(self, column: str) -> str:
        """The name an obs column has in the output tables."""
        return self._renamed.get(column, column)

    @property
    def renamed(self) -> dict[str, str]:
        """obs columns renamed because their name is one the pipeline writes (name -> obs_name)."""
        return {k: v for k, v in self._renamed.items() if k != v}

    def table(self, rows: np.ndarray) -> pa.Table:
        """The output rows for these (ascending) row numbers."""
        start, stop = int(rows[0]), int(rows[-1]) + 1
        obs = self.source.obs(start, stop)
        if stop - start != len(rows):
            picked = pa.array(rows - start)
            obs = {k: v.take(picked) for k, v in obs.items()}
        columns: dict[str, pa.Array] = {self.output_name(k): v for k, v in obs.items()}
        if self.age is not None:
            labels = obs.get(self.age.label_column) if self.age.label_column else None
            terms = obs.get(self.age.term_column) if self.age.term_column else None
            columns["age"] = age_mod.ages(labels, terms)
        columns.update(sentences.columns(*self._rank(*self.source.x_select(rows)), self._symbols))
        fields = [sentences.FIELDS.get(name) or pa.field(name, array.type) for name, array in columns.items()]
        return pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields))

    def _rank(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rank a CSR block a few hundred rows at a time and stitch the results together."""
        offsets, genes, values = [np.zeros(1, np.int32)], [], []
        for a in range(0, len(indptr) - 1, self._rank_rows):
            b = min(a + self._rank_rows, len(indptr) - 1)
            lo, hi = indptr[a], indptr[b]
            o, g, v = sentences.rank(indptr[a : b + 1] - lo, indices[lo:hi], data[lo:hi], self.source.n_vars, self.options.top_genes, self._named)
            offsets.append(o[1:] + offsets[-1][-1])
            genes.append(g)
            values.append(v)
        return np.concatenate(offsets), np.concatenate(genes), np.concatenate(values)

    def _groups(self, task: ChunkTask, codes: np.ndarray | None):
        """The task's rows, one row group (at most ROW_GROUP_ROWS rows, ~group_nnz non-zeros) at a time."""
        indptr = self.source.indptr
        for offset in range(task.start, task.stop, SCAN_ROWS):
            end = min(offset + SCAN_ROWS, task.stop)
            rows = np.arange(offset, end) if codes is None or task.code is None else offset + np.flatnonzero(codes[offset:end] == task.code)
            nnz = np.cumsum(indptr[rows + 1] - indptr[rows])
            i = 0
            while i < len(rows):
                j = min(i + ROW_GROUP_ROWS, int(np.searchsorted(nnz, (nnz[i - 1] if i else 0) + self.options.group_nnz, side="right")))
                j = max(j, i + 1)
                yield rows[i:j]
                i = j

    def write_chunk(self, task: ChunkTask, codes: np.ndarray | None, done: Callable[[int], None], cancelled: Callable[[], bool]) -> int:
        """Write one chunk file, one row group per group of rows; returns its row count."""
        written = 0
        writer = None
        try:
            for rows in self._groups(task, codes):
                if cancelled():
                    raise Cancelled()
                table = self.table(rows)
                writer = writer or open_parquet(task.path, table.schema, self.options.compression, self.options.compression_level)
                writer.write_table(table, row_group_size=table.num_rows)
                written += table.num_rows
                done(table.num_rows)
        finally:
            if writer is not None:
                writer.close()
        return written

    def run(self, tasks: list[ChunkTask], codes: np.ndarray | None, progress: Callable[[int], None], cancelled: Callable[[], bool]) -> dict[Path, int]:
        """Write every task's file on `threads` threads; the first error (or a cancel) stops all.
        Returns the rows written per folder."""
        stop = threading.Event()
        lock = threading.Lock()

        def done(n: int) -> None:
            with lock:
                progress(n)

        def halted() -> bool:
            return stop.is_set() or cancelled()

        with ThreadPoolExecutor(max_workers=max(1, self.options.threads), thread_name_prefix="preprocess") as pool:
            futures = [pool.submit(self.write_chunk, task, codes, done, halted) for task in tasks]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in finished):
                stop.set()
            wait(futures)
        errors = [f.exception() for f in futures if f.exception() is not None]
        real = [e for e in errors if not isinstance(e, Cancelled)]
        if real:
            raise real[0]
        if errors:
            raise errors[0]
        rows: dict[Path, int] = {}
        for task, future in zip(tasks, futures):
            rows[task.folder] = rows.get(task.folder, 0) + future.result()
        return rows
