"""A folder of parquet chunk files read as one table, by row group.

Row groups are the unit of reading: the reader knows where each starts (from the footers, read
once at open) and reads one with the columns asked for. Files must share one schema.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cellfeed.server.errors import CellfeedError

if TYPE_CHECKING:
    from cellfeed.server.paths import DataRoot


class ParquetFolder:
    """The chunk_*.parquet (or *.parquet) files of one folder, in name order; thread-safe."""

    def __init__(self, folder: Path, label: str, root: "DataRoot | None" = None) -> None:
        """With `root`, each chunk is resolved inside it as it is opened (a chunk that is a
        symlink out of the root is refused, naming it)."""
        self.folder = folder
        self.label = label
        files = sorted(folder.glob("chunk_*.parquet")) or sorted(folder.glob("*.parquet"))
        if not files:
            raise CellfeedError(f"{label}: no parquet files")
        opened = [root.contain(p, f"{label}/{p.name}") if root is not None else p for p in files]
        self.files: list[pq.ParquetFile] = []
        self._locks: list[threading.Lock] = []
        groups: list[tuple[int, int, int]] = []  # (file, row group, rows)
        for i, (path, real) in enumerate(zip(files, opened)):
            try:
                pf = pq.ParquetFile(real)
            except (pa.ArrowInvalid, OSError) as exc:
                said = str(exc).replace(str(real), path.name).replace(str(path), path.name)  # no server paths
                raise CellfeedError(f"{label}: {path.name} is not a readable parquet file ({said})") from None
            if self.files and not pf.schema_arrow.equals(self.files[0].schema_arrow):
                raise CellfeedError(f"{label}: {path.name} has a different schema from {files[0].name}")
            self.files.append(pf)
            self._locks.append(threading.Lock())
            groups += [(i, g, pf.metadata.row_group(g).num_rows) for g in range(pf.num_row_groups)]
        self.groups = [(f, g) for f, g, n in groups if n]
        sizes = np.array([n for _, _, n in groups if n], dtype=np.int64)
        self.starts = np.r_[0, np.cumsum(sizes)]  # global row where each row group starts
        self.schema = self.files[0].schema_arrow

    def null_counts(self) -> dict[str, int | None]:
        """Nulls of each top-level column over every row group of every file, from the footers'
        statistics; None where a file does not tell (no statistics, or a nested column)."""
        counts: dict[str, int | None] = {name: 0 for name in self.schema.names}
        for pf in self.files:
            meta = pf.metadata
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                for c in range(group.num_columns):
                    chunk = group.column(c)
                    top = chunk.path_in_schema.split(".")[0]
                    if top not in counts or counts[top] is None:
                        continue
                    stats = chunk.statistics if chunk.is_stats_set else None
                    if "." in chunk.path_in_schema or stats is None or not stats.has_null_count:
                        counts[top] = None
                    else:
                        counts[top] += stats.null_count
        return counts

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def group_of(self, rows: np.ndarray) -> np.ndarray:
        """The row group holding each global row."""
        return np.searchsorted(self.starts, rows, side="right") - 1

    def read_group(self, group: int, columns: list[str]) -> pa.Table:
        file, index = self.groups[group]
        with self._locks[file]:
            return self.files[file].read_row_group(index, columns=columns)

    def close(self) -> None:
        for pf in self.files:
            pf.close()
