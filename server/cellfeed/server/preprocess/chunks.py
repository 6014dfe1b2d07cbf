"""Parquet chunk files: written in order, `chunk_size` rows each, named chunk_0000.parquet, ...

Row groups hold a few thousand rows so readers can fetch part of a chunk; columns whose values
repeat (obs categories, gene symbols) are dictionary-encoded, per-cell unique ones are not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

UNIQUE_PER_CELL = {"obs_names", "cell_sentence", "values"}
ROW_GROUP_ROWS = 1024


def chunk_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("chunk_*.parquet"))


def _leaf(field: pa.Field) -> str:
    return f"{field.name}.list.element" if pa.types.is_list(field.type) or pa.types.is_large_list(field.type) else field.name


def open_parquet(path: Path, schema: pa.Schema, compression: str, compression_level: int | None) -> pq.ParquetWriter:
    """A parquet writer with the chunk encoding: dictionaries where values repeat, stats on scalars,
    and every column (each list's leaf included) compressed with the chosen codec."""
    leaves = {f.name: _leaf(f) for f in schema}
    leveled = compression in ("zstd", "gzip", "brotli") and compression_level is not None
    return pq.ParquetWriter(
        path,
        schema,
        compression=compression,
        compression_level=compression_level if leveled else None,
        use_dictionary=[leaves[n] for n in leaves if n not in UNIQUE_PER_CELL],
        write_statistics=[f.name for f in schema if leaves[f.name] == f.name],
    )


class ChunkWriter:
    """Appends tables to a folder of chunk files, rolling over every `chunk_size` rows."""

    def __init__(self, folder: Path, chunk_size: int, compression: str = "zstd", compression_level: int | None = 1) -> None:
        self.folder = folder
        self.chunk_size = chunk_size
        self.compression = compression
        self.compression_level = compression_level
        self.rows = 0
        self.files: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_rows = [], 0
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._open(table.schema)
            take = min(self.chunk_size - self._in_file, table.num_rows - offset)
            self._writer.write_table(table.slice(offset, take), row_group_size=ROW_GROUP_ROWS)
            offset += take
            self._in_file += take
            if self._in_file >= self.chunk_size:
                self._writer.close()
                self._writer = None

    def _open(self, schema: pa.Schema) -> None:
        path = self.folder / f"chunk_{len(self.files):04d}.parquet"
        self._writer = open_parquet(path, schema, self.compression, self.compression_level)
        self.files.append(path)
        self._in_file = 0

    def close(self) -> list[Path]:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.files


def read_chunks(folder: Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Every row group of every chunk in order, as tables (bounded memory)."""
    for path in chunk_files(folder):
        with pq.ParquetFile(path) as pf:
            for i in range(pf.num_row_groups):
                yield pf.read_row_group(i, columns=columns)
