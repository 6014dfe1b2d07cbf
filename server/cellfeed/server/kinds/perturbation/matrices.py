"""The row matrices a perturbation session reads: X, or a matrix of obsm (cell-load's `embed_key`,
`obsm["X_hvg"]` for its counts), dense or CSR.

A CSR matrix's rows travel as CSR list columns (`<prefix>_indices`, `<prefix>_data`); a dense
one's as one `arrow.fixed_shape_tensor` column (`<prefix>_dense`), so an embedding (every entry
set) costs 4 bytes a value on the wire and none to densify. Rows are read one contiguous block at
a time, as X's are.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from cellfeed.server.errors import CellfeedError
from cellfeed.server.reading.blocks import CSRBlock
from cellfeed.server.reading.h5ad import H5ad

X = "X"


@dataclass(frozen=True)
class Shape:
    dense: bool
    width: int


class RowMatrix:
    """X (key "X") or obsm[key] of one h5ad: `read(start, stop)` gives a CSRBlock (sparse) or a
    float32 [stop-start, width] array (dense)."""

    def __init__(self, h5: H5ad, key: str) -> None:
        self.h5 = h5
        self.key = key
        if key == X:
            self.shape = Shape(False, int(h5.n_vars))
            return
        obsm = h5.file.get("obsm")
        if obsm is None or key not in obsm:
            have = ", ".join(sorted(obsm.keys())) if obsm is not None else "none"
            raise CellfeedError(f"{h5.label}: obsm has no matrix {key!r} (obsm keys: {have})")
        node = obsm[key]
        if isinstance(node, h5py.Dataset):
            if node.ndim != 2 or node.shape[0] != h5.n_obs:
                raise CellfeedError(f"{h5.label}: obsm[{key!r}] has shape {node.shape}, expected ({h5.n_obs}, width)")
            if node.dtype.kind not in "fiub":
                raise CellfeedError(f"{h5.label}: obsm[{key!r}] holds dtype {node.dtype}, not numbers")
            self._dense = node
            self.shape = Shape(True, int(node.shape[1]))
            return
        encoding = node.attrs.get("encoding-type", "")
        if encoding != "csr_matrix" or not all(k in node for k in ("indptr", "indices", "data")):
            raise CellfeedError(f"{h5.label}: obsm[{key!r}] is stored as {encoding or 'an unknown group'}; use a dense array or csr_matrix")
        shape = tuple(int(v) for v in node.attrs.get("shape", (0, 0)))
        if len(shape) != 2 or shape[0] != h5.n_obs:
            raise CellfeedError(f"{h5.label}: obsm[{key!r}] has shape {shape}, expected ({h5.n_obs}, width)")
        indptr = np.asarray(node["indptr"][:], dtype=np.int64)
        if len(indptr) != h5.n_obs + 1 or indptr[0] != 0 or (np.diff(indptr) < 0).any() or indptr[-1] != node["indices"].shape[0]:
            raise CellfeedError(f"{h5.label}: obsm[{key!r}] is not a well-formed CSR matrix (indptr)")
        self._indptr = indptr
        self._indices = node["indices"]
        self._data = node["data"]
        self.shape = Shape(False, shape[1])

    def read(self, start: int, stop: int, index_dtype: np.dtype) -> CSRBlock | np.ndarray:
        if self.key == X:
            return CSRBlock(*self.h5.read_rows(start, stop, index_dtype))
        if self.shape.dense:
            out = np.empty((stop - start, self.shape.width), dtype=np.float32)
            with self.h5._lock:
                if stop > start:
                    self._dense.read_direct(out, np.s_[start:stop])  # HDF5 converts on read
            return out
        lo, hi = int(self._indptr[start]), int(self._indptr[stop])
        indices = np.empty(hi - lo, dtype=np.int64)
        data = np.empty(hi - lo, dtype=np.float32)
        with self.h5._lock:
            if hi > lo:
                self._indices.read_direct(indices, np.s_[lo:hi])
                self._data.read_direct(data, np.s_[lo:hi])
        if len(indices) and (indices.min() < 0 or indices.max() >= self.shape.width):
            raise CellfeedError(f"{self.h5.label}: obsm[{self.key!r}] has a column index outside 0..{self.shape.width - 1} in rows {start}..{stop - 1}")
        indptr = (self._indptr[start : stop + 1] - lo).astype(np.int32)
        return CSRBlock(indptr, indices.astype(index_dtype), data)


def hvg_width(h5: H5ad) -> int:
    """cell-load's `hvg_dim`: the width of obsm["X_hvg"], 0 without one."""
    try:
        return RowMatrix(h5, "X_hvg").shape.width
    except CellfeedError:
        return 0
