"""A backed .h5ad opened once: obs columns, obs_names, var_names, and contiguous row reads of X.

The hot path reads X's CSR datasets (indptr, indices, data) straight through h5py, one
contiguous slice per call; obs and var elements go through anndata's element reader.
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
            self.n_obs, self.n_vars = (int(v) for v in x.attrs["shape"])
            self._indptr = x["indptr"][...].astype(np.int64)
            self._indices = x["indices"]
            self._data = x["data"]
            self.sparse = True
        else:
            if x.ndim != 2:
                raise CellfeedError(f"{self.label}: X has {x.ndim} dimensions, expected 2")
            self.n_obs, self.n_vars = (int(v) for v in x.shape)
            self._dense = x
            self.sparse = False

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
            indices = np.empty(hi - lo, dtype=index_dtype)
            data = np.empty(hi - lo, dtype=np.float32)
            with self._lock:
                if hi > lo:
                    self._indices.read_direct(indices, np.s_[lo:hi])
                    self._data.read_direct(data, np.s_[lo:hi])  # HDF5 converts int64/float64 on read
            return indptr.astype(np.int32), indices, data
        with self._lock:
            block = np.asarray(self._dense[start:stop], dtype=np.float32)
        rows, cols = np.nonzero(block)
        indptr = np.zeros(stop - start + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=stop - start), out=indptr[1:])
        return indptr, cols.astype(index_dtype), block[rows, cols]

    def close(self) -> None:
        self.file.close()
