"""Row gathers on CSR arrays, used by the server (batches from blocks) and the client (controls),
the client's CSR-to-dense scatter, and the bounds checks it runs on every CSR batch it receives
before building tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# scipy's C++ loops: 5-10x faster than numpy's take and repeat, and they release the GIL, so
# several stream threads decode at once (np.repeat holds it)
from scipy.sparse._sparsetools import csr_row_index as _csr_row_index
from scipy.sparse._sparsetools import csr_todense as _csr_todense
from scipy.sparse._sparsetools import expandptr as _expandptr

CSR = tuple[np.ndarray, np.ndarray, np.ndarray]  # indptr, indices, data
NATIVE_INDEX = (np.dtype(np.int32), np.dtype(np.int64))


def gather(
    pieces: Sequence[tuple[CSR, np.ndarray]],
    *,
    native: bool = True,
    out: tuple[np.ndarray, np.ndarray] | Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> CSR:
    """Concatenate rows `rows` of each (csr, rows) piece, in order, as one CSR (indptr int64).

    Each output byte is written once: no intermediate matrices, no vstack. `out` gives the
    (indices, data) arrays to fill (of the right length), e.g. a row of a COO coordinate array,
    or makes them from the number of values (in a shared-memory slot, say).
    """
    for (src_indptr, _, _), rows in pieces:
        # scipy's loop reads rows unchecked: a row past the end (a hostile ctrl_row) would read
        # another object's memory
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(src_indptr) - 1):
            raise IndexError(f"gather: row {int(rows.max()) if int(rows.min()) >= 0 else int(rows.min())} "
                             f"is outside the {len(src_indptr) - 1} rows of its CSR")
    starts = [csr[0][rows] for csr, rows in pieces]
    lengths = [csr[0][rows + 1] - s for (csr, rows), s in zip(pieces, starts)]
    for ((_, src_indices, src_data), _), s, n in zip(pieces, starts, lengths):
        # nor values outside the source's (a corrupt indptr)
        if len(n) and (int(n.min()) < 0 or int(s.min()) < 0 or int((s + n).max()) > min(len(src_indices), len(src_data))):
            raise ValueError(f"gather: the rows' bounds lie outside the {len(src_indices)} values of their CSR (a corrupt indptr)")
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    indptr = np.zeros(len(all_lengths) + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=indptr[1:])
    total = int(indptr[-1])
    if out is None:
        index_dtype = pieces[0][0][1].dtype if pieces else np.dtype(np.int32)
        indices, data = np.empty(total, dtype=index_dtype), np.empty(total, dtype=np.float32)
    else:
        indices, data = out(total) if callable(out) else out
        if len(indices) != total or len(data) != total:
            raise ValueError(f"gather: out arrays hold {len(indices)}/{len(data)} values, the rows hold {total}")
    row0 = 0
    for ((src_indptr, src_indices, src_data), rows), s, n in zip(pieces, starts, lengths):
        out0, out1 = int(indptr[row0]), int(indptr[row0 + len(n)])
        itype = src_indptr.dtype
        native_args = None
        if native and itype in NATIVE_INDEX and src_indices.dtype == indices.dtype and src_data.dtype == data.dtype:
            if src_indices.dtype == itype:
                native_args = (src_indices, src_data, indices[out0:out1], data[out0:out1])
            elif src_data.dtype.itemsize == itype.itemsize:
                # narrow (uint16) indices: scipy wants them typed like indptr, so they go as the
                # "values" and the data, bit for bit, as the "indices"
                native_args = (src_data.view(itype), src_indices, data[out0:out1].view(itype), indices[out0:out1])
        if native_args is not None:
            _csr_row_index(len(rows), rows.astype(itype), src_indptr, *native_args)
            row0 += len(n)
            continue
        # source position of output element e of row i: s[i] + (e - indptr[i])
        src = np.repeat(s - indptr[row0 : row0 + len(n)], n)
        src += np.arange(out0, out1)
        indices[out0:out1] = np.take(src_indices, src)
        np.take(src_data, src, out=data[out0:out1])
        row0 += len(n)
    return indptr, indices, data


def to_dense(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, width: int) -> np.ndarray:
    """The rows as a new dense float32 [rows, width] array, in one scipy loop with the GIL released
    (numpy's flat-index scatter takes 1.5-2x as long and holds it). Run `check` first: the loop
    writes by these numbers unchecked."""
    n = len(indptr) - 1
    out = np.zeros((n, width), dtype=np.float32)
    itype = np.int32 if max(len(indices), width) < 2**31 else np.int64  # scipy: indptr and indices of one type
    _csr_todense(n, width, np.asarray(indptr, itype), np.asarray(indices, itype), np.asarray(data, np.float32), out.reshape(-1))
    return out


def row_numbers(indptr: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Write each value's row number into `out` (int64, one per value): COO row coordinates.

    Positions are indptr's own, so a slice of indptr fills its part of `out`, rows numbered from 0."""
    _expandptr(len(indptr) - 1, np.ascontiguousarray(indptr, dtype=np.int64), out)
    return out


def check(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_cols: int, what: str = "CSR batch") -> None:
    """Raise ValueError unless (indptr, indices, data) is a CSR the client may build tensors on:
    indptr starts at 0, never decreases and ends at nnz; data holds nnz values; every column
    index lies in [0, n_cols). The COO and sparse-tensor code after it reads and writes by these
    numbers unchecked, so a buggy or hostile server could otherwise corrupt the client's memory.

    One vectorised pass over indices (max; min too when they are signed) and one over indptr."""
    if len(indptr) == 0:
        raise ValueError(f"{what}: empty indptr (a CSR of n rows has n + 1 row pointers)")
    nnz = len(indices)
    first, last = int(indptr[0]), int(indptr[-1])
    if first != 0 or last != nnz:
        raise ValueError(f"{what}: indptr runs from {first} to {last}; it must run from 0 to nnz = {nnz}")
    if len(data) != nnz:
        raise ValueError(f"{what}: {len(data)} values for {nnz} column indices")
    if len(indptr) > 1 and bool((indptr[1:] < indptr[:-1]).any()):
        row = int(np.flatnonzero(indptr[1:] < indptr[:-1])[0])
        raise ValueError(f"{what}: indptr decreases at row {row} ({int(indptr[row])} -> {int(indptr[row + 1])})")
    if nnz:
        high = int(indices.max())
        low = int(indices.min()) if indices.dtype.kind != "u" else 0
        if low < 0 or high >= n_cols:
            bad = low if low < 0 else high
            raise ValueError(f"{what}: column index {bad} is outside [0, {n_cols}) (n_vars)")


def check_offsets(offsets: np.ndarray, n_values: int, what: str = "list column") -> None:
    """Raise ValueError unless list offsets never decrease and stay within the n_values values."""
    if len(offsets) == 0:
        raise ValueError(f"{what}: no offsets")
    first, last = int(offsets[0]), int(offsets[-1])
    if first < 0 or last > n_values or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{what}: offsets {first}..{last} are not non-decreasing within its {n_values} values")
