"""An input h5ad opened for streaming: obs as Arrow columns and X as CSR, block by block.

obs is read per block straight from the anndata on-disk encoding (categoricals, strings, numbers,
nullable arrays), so memory does not grow with the file; X rows go through the server's reader.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
from anndata.io import read_elem

from cellfeed.server.errors import CellfeedError
from cellfeed.server.reading.h5ad import H5ad

OBS_NAMES = "obs_names"


class ObsColumn:
    """One obs column, readable in row slices as an Arrow array of one fixed type."""

    def __init__(self, node: h5py.Dataset | h5py.Group, name: str) -> None:
        self.name = name
        self.node = node
        self.encoding = str(node.attrs.get("encoding-type", ""))
        self._full: pa.Array | None = None
        if self.encoding == "categorical":
            categories = read_elem(node["categories"])
            self._categories = pa.array(np.asarray(categories).tolist() if np.asarray(categories).dtype == object else categories)
            self.type = pa.string() if pa.types.is_string(self._categories.type) or pa.types.is_large_string(self._categories.type) else self._categories.type
        elif self.encoding in ("string-array", "nullable-string-array"):
            self.type = pa.string()
        elif self.encoding == "array" and isinstance(node, h5py.Dataset):
            self.type = pa.from_numpy_dtype(node.dtype) if node.dtype.kind in "biuf" else pa.string()
        elif self.encoding in ("nullable-integer", "nullable-boolean"):
            self.type = pa.from_numpy_dtype(node["values"].dtype)
        else:  # an older or rarer encoding: read once through anndata, then slice
            self._full = pa.array(pd.Series(read_elem(node)), from_pandas=True)
            self.type = self._full.type

    def read(self, start: int, stop: int) -> pa.Array:
        if self._full is not None:
            return self._full.slice(start, stop - start)
        node = self.node
        if self.encoding == "categorical":
            codes = node["codes"][start:stop].astype(np.int32)
            missing = codes < 0
            taken = self._categories.take(pa.array(np.where(missing, 0, codes), mask=missing))
            return taken.cast(self.type)
        if self.encoding == "string-array":
            return pa.array(node.asstr()[start:stop].tolist() if node.dtype.kind == "O" else node[start:stop].astype(str).tolist(), type=pa.string())
        if self.encoding == "nullable-string-array":
            values = node["values"].asstr()[start:stop].tolist()
            return pa.array(values, mask=node["mask"][start:stop], type=pa.string())
        if self.encoding in ("nullable-integer", "nullable-boolean"):
            return pa.array(node["values"][start:stop], mask=node["mask"][start:stop], type=self.type)
        values = node[start:stop]
        return pa.array(values, type=self.type) if values.dtype.kind in "biuf" else pa.array(values.astype(str).tolist(), type=pa.string())


class H5adInput:
    """One input file: checked on open (HDF5, h5ad elements, sparse CSR X, at least one cell)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        label = self.path.name
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise CellfeedError(f"{label}: the file is empty (0 bytes)")
        try:
            self.h5 = H5ad(self.path, label)
        except (OSError, KeyError, ValueError) as exc:
            raise CellfeedError(f"{label}: cannot read the file ({exc}); is it truncated or not an h5ad?") from None
        try:
            if not self.h5.sparse:
                raise CellfeedError(
                    f"{label}: X is a dense array; the pipeline ranks genes from sparse rows, so store X as CSR "
                    "(adata.X = scipy.sparse.csr_matrix(adata.X)) and run it again"
                )
            if self.h5.n_obs == 0:
                raise CellfeedError(f"{label}: the file has no cells (X is 0 x {self.h5.n_vars})")
            obs = self.h5.file["obs"]
            self._index_key = str(obs.attrs.get("_index", "_index"))
            order = [str(c) for c in obs.attrs.get("column-order", [])]
            self.obs_columns = order + sorted(k for k in obs.keys() if k not in order and k != self._index_key)
            self.indptr = self.h5.file["X"]["indptr"][...].astype(np.int64)
        except (OSError, KeyError, ValueError) as exc:
            self.h5.close()
            raise CellfeedError(f"{label}: cannot read obs or X ({exc}); is the file truncated?") from None
        except CellfeedError:
            self.h5.close()
            raise
        self._columns: dict[str, ObsColumn] = {}

    @property
    def label(self) -> str:
        return self.h5.label

    @property
    def n_obs(self) -> int:
        return self.h5.n_obs

    @property
    def n_vars(self) -> int:
        return self.h5.n_vars

    def column(self, name: str) -> ObsColumn:
        if name not in self._columns:
            obs = self.h5.file["obs"]
            if name != OBS_NAMES and name not in self.obs_columns:
                raise CellfeedError(f"{self.label}: obs has no column {name!r} (columns: {', '.join(self.obs_columns) or 'none'})")
            self._columns[name] = ObsColumn(obs[self._index_key if name == OBS_NAMES else name], name)
        return self._columns[name]

    def obs(self, start: int, stop: int, columns: list[str] | None = None) -> dict[str, pa.Array]:
        """obs_names and the obs columns (all by default) of rows [start, stop)."""
        names = [OBS_NAMES] + (self.obs_columns if columns is None else columns)
        return {name: self.column(name).read(start, stop) for name in names}

    def var_names(self) -> list[str]:
        return self.h5.var_names().tolist()

    def var_column(self, name: str) -> list[str] | None:
        var = self.h5.file["var"]
        if name not in var:
            return None
        return [str(v) for v in ObsColumn(var[name], name).read(0, self.n_vars).to_pylist()]

    def x_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [start, stop) of X as CSR (indptr from 0); a read failure names the rows and the file."""
        try:
            indptr, indices, data = self.h5.read_rows(start, stop)
        except (OSError, ValueError, KeyError) as exc:
            raise CellfeedError(f"{self.label}: cannot read X rows {start}-{stop} ({exc}); is the file truncated?") from None
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.n_vars):
            raise CellfeedError(f"{self.label}: X rows {start}-{stop} name a gene outside 0..{self.n_vars - 1}; the file is corrupt")
        return indptr, indices, data

    def x_select(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The given ascending rows of X as CSR, read as few contiguous runs as they form."""
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        firsts = rows[np.r_[0, breaks]]
        lasts = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
        parts = [self.x_rows(int(a), int(b)) for a, b in zip(firsts, lasts)]
        if len(parts) == 1:
            return parts[0]
        sizes = np.array([p[0][-1] for p in parts], dtype=np.int64)
        shifts = np.repeat(np.r_[0, np.cumsum(sizes)[:-1]], [len(p[0]) - 1 for p in parts])
        indptr = np.r_[0, np.concatenate([p[0][1:] for p in parts]) + shifts]
        return indptr, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> "H5adInput":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cells_of(path: str | Path) -> int:
    """The cells (n_obs) of an h5ad from its shape, without reading any data; 0 when it cannot be
    told (not an h5ad, unreadable: the file then fails when it runs, with its message)."""
    try:
        with h5py.File(path, "r") as h5:
            x = h5.get("X")
            if isinstance(x, h5py.Dataset) and x.ndim >= 1:
                return int(x.shape[0])
            if x is not None and "shape" in x.attrs:
                return int(x.attrs["shape"][0])
            obs = h5.get("obs")
            index = obs.attrs.get("_index", "_index") if obs is not None else None
            if obs is not None and index in obs:
                return int(obs[index].shape[0])
    except Exception:  # any unreadable input: unknown size
        return 0
    return 0
