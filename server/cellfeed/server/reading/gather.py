"""Gather rows of cached CSR blocks into one CSR batch, writing each byte of output once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CSRBlock:
    """Contiguous rows of X held in memory: indptr (int64, from 0), indices (int32), data (float32)."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.indptr.nbytes + self.indices.nbytes + self.data.nbytes


def gather_rows(pieces: Sequence[tuple[CSRBlock, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate `block` rows `rows` for each (block, rows) piece, in order, as one CSR."""
    starts = [block.indptr[rows] for block, rows in pieces]
    lengths = [block.indptr[rows + 1] - s for (block, rows), s in zip(pieces, starts)]
    all_lengths = np.concatenate(lengths)
    indptr = np.zeros(len(all_lengths) + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=indptr[1:])
    total = int(indptr[-1])
    indices = np.empty(total, dtype=np.int32)
    data = np.empty(total, dtype=np.float32)
    row0 = 0
    for (block, _), s, n in zip(pieces, starts, lengths):
        out0, out1 = int(indptr[row0]), int(indptr[row0 + len(n)])
        # source position of output element e of row i: s[i] + (e - indptr[i])
        src = np.repeat(s - indptr[row0 : row0 + len(n)], n)
        src += np.arange(out0, out1)
        np.take(block.indices, src, out=indices[out0:out1])
        np.take(block.data, src, out=data[out0:out1])
        row0 += len(n)
    return indptr, indices, data
