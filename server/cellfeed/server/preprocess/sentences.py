"""Cell sentences: each cell's expressed genes ranked by value, straight from its sparse row.

Only stored values > 0 count; genes without a symbol are left out before ranking; ties go to the
gene that comes first in var. A whole block is ranked with one sort of packed 64-bit keys
(row, value descending, var position), so nothing is densified and nothing loops per cell.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

VALUE_BITS = 32
# Non-nullable lists of non-nullable items: parquet then needs one definition level, not three.
GENES_TYPE = pa.list_(pa.field("element", pa.string(), nullable=False))
VALUES_TYPE = pa.list_(pa.field("element", pa.float32(), nullable=False))
FIELDS = {
    "cell_sentence": pa.field("cell_sentence", pa.string(), nullable=False),
    "genes": pa.field("genes", GENES_TYPE, nullable=False),
    "values": pa.field("values", VALUES_TYPE, nullable=False),
}


def rows_per_block_limit(n_vars: int) -> int:
    """The most rows one call to `rank` can take: row, value and var position share 64 bits."""
    gene_bits = max(1, (n_vars - 1).bit_length())
    return 1 << (64 - VALUE_BITS - gene_bits)


def rank(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_vars: int, top_n: int, named: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, var positions, values) of each row's top `top_n` expressed genes, best first.

    `named` marks the vars that have a symbol; values are ranked as float32.
    """
    n_rows = len(indptr) - 1
    if n_rows > rows_per_block_limit(n_vars):
        raise ValueError(f"{n_rows} rows exceed the ranking limit of {rows_per_block_limit(n_vars)} for {n_vars} vars")
    gene_bits = np.uint64(max(1, (n_vars - 1).bit_length()))
    values = np.asarray(data, dtype=np.float32)
    keep = values > 0
    if named is not None and not named.all():
        keep &= named[indices]
    counts = np.diff(indptr).astype(np.int64)
    if not keep.all():
        kept = np.r_[0, np.cumsum(keep)]
        counts = kept[indptr[1:]] - kept[indptr[:-1]]
        indices, values = indices[keep], values[keep]
    key = np.repeat(np.arange(n_rows, dtype=np.uint64) << (np.uint64(VALUE_BITS) + gene_bits), counts)
    inverted = np.invert(values.view(np.uint32)).astype(np.uint64)
    inverted <<= gene_bits
    key |= inverted
    key |= indices.astype(np.uint64)
    key.sort()
    if counts.max(initial=0) > top_n:
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        key = key[np.arange(len(key)) - starts < top_n]
        counts = np.minimum(counts, top_n)
    offsets = np.zeros(n_rows + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    genes = (key & ((np.uint64(1) << gene_bits) - np.uint64(1))).astype(np.int32)
    key >>= gene_bits
    return offsets, genes, np.invert(key.astype(np.uint32)).view(np.float32)


def columns(offsets: np.ndarray, genes: np.ndarray, values: np.ndarray, symbols: pa.StringArray) -> dict[str, pa.Array]:
    """`cell_sentence` (space-separated symbols, the seed's column), `genes` and `values` lists."""
    offs = pa.array(offsets, type=pa.int32())
    tokens = symbols.take(pa.array(genes, type=pa.int32()))
    return {
        "cell_sentence": pc.binary_join(pa.ListArray.from_arrays(offs, tokens), " "),
        "genes": pa.ListArray.from_arrays(offs, tokens, type=GENES_TYPE),
        "values": pa.ListArray.from_arrays(offs, pa.array(values, type=pa.float32()), type=VALUES_TYPE),
    }
