"""The Arrow codec and the CSR row gather shared by server and client."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from cellfeed.wire import codec, csr


@pytest.mark.parametrize("native", [True, False])
def test_gather_matches_scipy_row_indexing(native):
    rng = np.random.default_rng(0)
    a = sp.random(300, 40, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    b = sp.random(100, 40, density=0.5, format="csr", dtype=np.float32, random_state=rng)
    ra, rb = rng.integers(0, 300, 77), rng.integers(0, 100, 13)
    pieces = [((m.indptr.astype(np.int32), m.indices.astype(np.int32), m.data), r) for m, r in ((a, ra), (b, rb))]
    indptr, indices, data = csr.gather(pieces, native=native)
    expected = sp.vstack([a[ra], b[rb]]).tocsr()
    np.testing.assert_array_equal(indptr, expected.indptr)
    np.testing.assert_array_equal(indices, expected.indices)
    np.testing.assert_array_equal(data, expected.data)


def test_csr_columns_share_offsets_and_decode_without_copy():
    m = sp.random(20, 30, density=0.3, format="csr", dtype=np.float32, random_state=1)
    batch = pa.RecordBatch.from_pydict(codec.csr_columns("x", m.indptr, m.indices, m.data))
    assert batch.schema.field("x_indices").type == pa.list_(pa.int32())
    indptr, indices, data = codec.csr_from_columns(batch.slice(5, 6), "x")
    np.testing.assert_array_equal(sp.csr_matrix((data, indices, indptr), shape=(6, 30)).toarray(), m[5:11].toarray())
    full = codec.csr_from_columns(batch, "x")[2]
    assert full.base is not None and not full.flags.writeable  # a view on the Arrow buffer


def test_tensor_columns_and_metadata_round_trip():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    col = codec.tensor_column(x)
    assert col.type.shape == [3, 4]
    np.testing.assert_array_equal(codec.tensor_from_column(col), x)
    schema = codec.with_metadata(pa.schema([pa.field("t", col.type)]), {"kind": "demo", "shape": [3, 4]})
    assert codec.read_metadata(schema) == {"kind": "demo", "shape": [3, 4]}
    table = pa.table({"t": col})
    assert codec.table_from_ipc(codec.table_to_ipc(table)).equals(table)
