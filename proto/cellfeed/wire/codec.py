"""The Arrow batch codec used by server and client alike (docs/protocol.md is its contract).

Sparse CSR rows travel as two list columns sharing one offsets buffer (offsets = indptr; column
indices as uint16 when the columns number at most 65,536, else int32);
dense blocks as `arrow.fixed_shape_tensor`; session-level facts as JSON in schema metadata.
Decoding never copies: the numpy arrays returned are views of the received Arrow buffers.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

METADATA_KEY = b"cellfeed"
PADDING = "padding"  # bool per row, in the kinds that pad by rows: a repeat that only evens out the ranks' shares


def index_type(n_vars: int) -> pa.DataType:
    """The type of CSR column indices for `n_vars` columns: uint16 when they fit (a quarter of
    the bytes of a row: gene spaces are almost always under 65,536), else int32."""
    return pa.uint16() if n_vars <= 1 << 16 else pa.int32()


def csr_columns(prefix: str, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, index: pa.DataType = pa.int32()) -> dict[str, pa.Array]:
    """`{prefix}_indices: list<index>` and `{prefix}_data: list<float32>`, one offsets buffer."""
    indptr = np.asarray(indptr, dtype=np.int32)
    if len(indptr) and indptr[0] != 0:
        indptr = indptr - indptr[0]
    offsets = pa.array(indptr)
    return {
        f"{prefix}_indices": pa.ListArray.from_arrays(offsets, pa.array(np.asarray(indices, dtype=index.to_pandas_dtype()))),
        f"{prefix}_data": pa.ListArray.from_arrays(offsets, pa.array(np.asarray(data, dtype=np.float32))),
    }


def csr_fields(prefix: str, index: pa.DataType = pa.int32()) -> list[pa.Field]:
    return [
        pa.field(f"{prefix}_indices", pa.list_(index), nullable=False),
        pa.field(f"{prefix}_data", pa.list_(pa.float32()), nullable=False),
    ]


def csr_from_columns(batch: pa.RecordBatch, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, data) as zero-copy numpy views; indptr starts at 0."""
    indices_col = batch.column(f"{prefix}_indices")
    data_col = batch.column(f"{prefix}_data")
    offsets = indices_col.offsets.to_numpy(zero_copy_only=True)
    start, stop = int(offsets[0]), int(offsets[-1])
    indices = indices_col.values.to_numpy(zero_copy_only=True)[start:stop]
    data = data_col.values.to_numpy(zero_copy_only=True)[start:stop]
    indptr = offsets if start == 0 else offsets - start
    return indptr, indices, data


def tensor_type(shape: tuple[int, ...], dtype: pa.DataType = pa.float32()) -> pa.DataType:
    """The canonical `arrow.fixed_shape_tensor` type of one row of a dense block."""
    return pa.fixed_shape_tensor(dtype, list(shape))


def tensor_column(array: np.ndarray) -> pa.Array:
    """A [N, *shape] C-contiguous array as one fixed-shape tensor column of N rows."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))


def tensor_from_column(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The [N, *shape] numpy view of a fixed-shape tensor column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy_ndarray()


def with_metadata(schema: pa.Schema, meta: dict[str, Any]) -> pa.Schema:
    """Attach JSON facts (vocabularies, shapes) to a schema under the `cellfeed` key."""
    existing = dict(schema.metadata or {})
    existing[METADATA_KEY] = json.dumps(meta, separators=(",", ":")).encode()
    return schema.with_metadata(existing)


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_ipc(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
