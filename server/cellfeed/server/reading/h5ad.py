"""A backed .h5ad opened once: obs columns, obs_names, var_names, and contiguous row reads of X.

The hot path reads X's CSR datasets (indptr, indices, data) straight through h5py, one
contiguous slice per call; obs and var elements go through anndata's element reader.

A file whose CSR is not well formed is refused, naming the file and the first bad row, before a
client could index past its buffers: shape, dtypes (integer indptr and indices, numeric data)
and indptr (n_obs + 1 entries from 0, never decreasing, ending at nnz) at open; the column
indices of each block as it is read (one max, and one min for signed indices, over the block).
Measured on a 2-core machine, a block of 4,096 rows and 820k entries: 0.12 ms of checks for
7.4 ms of reading with int32 indices (1.6%), 0.04 ms for 4.4 ms with uint16 (1.0%). A decoded
block sits in the block cache, so each is checked once per read, not once per batch.
"""

from __future__ import annotations

import threading
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from anndata.io import read_elem

from cellfeed.server.errors import CellfeedError


class H5ad:
    """Read-only view of one .h5ad file; safe to share between threads."""

    def __init__(self, path: Path, label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label or self.path.name
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise CellfeedError(f"{self.label}: not an HDF5/h5ad file ({exc.__class__.__name__}: {exc})") from None
        if "X" not in self.file or "obs" not in self.file or "var" not in self.file:
            missing = [k for k in ("X", "obs", "var") if k not in self.file]
            raise CellfeedError(f"{self.label}: not an h5ad file (no {', '.join(missing)} element)")
        self._lock = threading.Lock()
        x = self.file["X"]
        if isinstance(x, h5py.Group):
            encoding = x.attrs.get("encoding-type", "")
            if encoding != "csr_matrix":
                raise CellfeedError(
                    f"{self.label}: X is stored as {encoding or 'an unknown group'}; cellfeed reads rows from "
                    "csr_matrix or dense X (convert with adata.X = adata.X.tocsr())"
                )
            self.n_obs, self.n_vars = self._shape(x.attrs.get("shape"))
            for key in ("indptr", "indices", "data"):
                if key not in x or not isinstance(x[key], h5py.Dataset):
                    raise CellfeedError(f"{self.label}: X is not a well-formed CSR matrix: X/{key} is missing or not an array")
            self._indices = x["indices"]
            self._data = x["data"]
            self._indptr = self._check_indptr(x["indptr"])
            self._check_dtypes()
            self._signed = self._indices.dtype.kind == "i"
            self.sparse = True
        else:
            if x.ndim != 2:
                raise CellfeedError(f"{self.label}: X has {x.ndim} dimensions, expected 2")
            self.n_obs, self.n_vars = (int(v) for v in x.shape)
            if x.dtype.kind not in "fiub":
                raise CellfeedError(f"{self.label}: X holds {_kind(x.dtype)} (dtype {x.dtype}); expression values must be numbers")
            self._dense = x
            self.sparse = False

    # the CSR checks: at open (shape, dtypes, indptr), and per block as it is read (indices) ------

    def _shape(self, shape) -> tuple[int, int]:
        try:
            n_obs, n_vars = (int(v) for v in shape)
            if n_obs < 0 or n_vars < 0 or np.asarray(shape).dtype.kind not in "iu":
                raise ValueError
        except (TypeError, ValueError):
            raise CellfeedError(f"{self.label}: X is not a well-formed CSR matrix: its shape attribute is {shape!r}, expected two counts") from None
        return n_obs, n_vars

    def _check_indptr(self, dataset: h5py.Dataset) -> np.ndarray:
        """indptr must be integers, n_obs + 1 of them, from 0, never decreasing, ending at nnz."""
        bad = f"{self.label}: X is not a well-formed CSR matrix"
        if dataset.dtype.kind not in "iu" or dataset.ndim != 1:
            raise CellfeedError(f"{bad}: X/indptr holds {_kind(dataset.dtype)} (dtype {dataset.dtype}, {dataset.ndim}-D); row pointers must be integers")
        indptr = dataset[...].astype(np.int64)
        nnz = self._indices.shape[0] if self._indices.ndim == 1 else -1
        if len(indptr) != self.n_obs + 1:
            raise CellfeedError(f"{bad}: X/indptr has {len(indptr):,} entries; {self.n_obs:,} rows need {self.n_obs + 1:,}")
        if indptr[0] != 0:
            raise CellfeedError(f"{bad}: X/indptr starts at {indptr[0]}, not 0 (row 0)")
        falls = np.flatnonzero(indptr[1:] < indptr[:-1])
        if len(falls):
            row = int(falls[0])
            raise CellfeedError(f"{bad}: X/indptr decreases at row {row:,} ({indptr[row]} then {indptr[row + 1]}); row pointers must not decrease")
        if self._indices.ndim != 1 or self._data.ndim != 1 or self._data.shape[0] != nnz:
            raise CellfeedError(f"{bad}: X/indices has {self._indices.shape} and X/data {self._data.shape} entries; both must be 1-D and equally long")
        if indptr[-1] != nnz:
            row = int(np.searchsorted(indptr, nnz, side="right")) - 1 if indptr[-1] > nnz else self.n_obs - 1
            raise CellfeedError(f"{bad}: X/indptr ends at {indptr[-1]:,} but X/indices and X/data hold {nnz:,} entries (first bad row {max(row, 0):,})")
        return indptr

    def _check_dtypes(self) -> None:
        bad = f"{self.label}: X is not a well-formed CSR matrix"
        if self._indices.dtype.kind not in "iu":
            raise CellfeedError(f"{bad}: X/indices holds {_kind(self._indices.dtype)} (dtype {self._indices.dtype}); gene (column) indices must be integers, they are not truncated")
        if self._data.dtype.kind not in "fiub":
            raise CellfeedError(f"{self.label}: X/data holds {_kind(self._data.dtype)} (dtype {self._data.dtype}); expression values must be numbers")

    def _check_indices(self, indices: np.ndarray, indptr: np.ndarray, start: int) -> None:
        """Every column index of rows [start, ...) in [0, n_vars): one max (and min if signed)."""
        if not len(indices):
            return
        high = indices.max()
        low = indices.min() if indices.dtype.kind == "i" else 0
        if high < self.n_vars and low >= 0:
            return
        first = int(np.flatnonzero((indices >= self.n_vars) | (indices < 0))[0])
        row = start + int(np.searchsorted(indptr, first, side="right")) - 1
        raise CellfeedError(
            f"{self.label}: X is not a well-formed CSR matrix: row {row:,} has gene (column) index {int(indices[first])}, "
            f"outside 0..{self.n_vars - 1} (var has {self.n_vars:,} genes)"
        )

    def obs_keys(self) -> list[str]:
        return [k for k in self.file["obs"].keys() if k != self.file["obs"].attrs.get("_index", "_index")]

    def obs_column(self, name: str) -> pd.Categorical:
        """An obs column as a pandas Categorical (plain columns are categorised on the fly)."""
        obs = self.file["obs"]
        if name not in obs:
            have = ", ".join(sorted(self.obs_keys())) or "none"
            raise CellfeedError(f"{self.label}: obs has no column {name!r} (columns: {have})")
        with self._lock:
            values = read_elem(obs[name])
        if isinstance(values, pd.Categorical):
            return values
        return pd.Categorical(np.asarray(values).astype(str))

    def obs_names(self) -> np.ndarray:
        obs = self.file["obs"]
        with self._lock:
            return np.asarray(read_elem(obs[obs.attrs.get("_index", "_index")])).astype(str)

    def var_names(self) -> np.ndarray:
        var = self.file["var"]
        with self._lock:
            return np.asarray(read_elem(var[var.attrs.get("_index", "_index")])).astype(str)

    def read_rows(self, start: int, stop: int, index_dtype: np.dtype = np.dtype(np.int32)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [start, stop) of X as CSR (indptr from 0, int32; indices of `index_dtype`, int32 or
        uint16 for up to 65,536 columns; float32 data)."""
        if self.sparse:
            lo, hi = int(self._indptr[start]), int(self._indptr[stop])
            indptr = self._indptr[start : stop + 1] - lo
            # a signed file read into unsigned indices would clip negatives to 0: read int32, check, narrow
            read_as = np.dtype(np.int32) if self._signed and np.dtype(index_dtype).kind == "u" else np.dtype(index_dtype)
            indices = np.empty(hi - lo, dtype=read_as)
            data = np.empty(hi - lo, dtype=np.float32)
            with self._lock:
                if hi > lo:
                    self._indices.read_direct(indices, np.s_[lo:hi])
                    self._data.read_direct(data, np.s_[lo:hi])  # HDF5 converts int64/float64 on read
            self._check_indices(indices, indptr, start)
            return indptr.astype(np.int32), indices.astype(index_dtype, copy=False), data
        with self._lock:
            block = np.asarray(self._dense[start:stop], dtype=np.float32)
        rows, cols = np.nonzero(block)
        indptr = np.zeros(stop - start + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=stop - start), out=indptr[1:])
        return indptr, cols.astype(index_dtype), block[rows, cols]

    def fileno(self) -> int:
        """The open file's descriptor (HDF5's sec2 driver), for checking what was opened."""
        return int(self.file.id.get_vfd_handle())

    def close(self) -> None:
        self.file.close()


def _kind(dtype: np.dtype) -> str:
    return {"S": "strings", "U": "strings", "O": "objects (strings?)", "f": "floats", "c": "complex numbers", "V": "compound values"}.get(dtype.kind, f"{dtype.kind!r} values")
