"""The Arrow codec and the CSR row gather shared by server and client."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from cellfeed.wire import codec, csr


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("index_dtype", [np.int32, np.uint16])
def test_gather_matches_scipy_row_indexing(native, index_dtype):
    rng = np.random.default_rng(0)
    a = sp.random(300, 40, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    b = sp.random(100, 40, density=0.5, format="csr", dtype=np.float32, random_state=rng)
    ra, rb = rng.integers(0, 300, 77), rng.integers(0, 100, 13)
    pieces = [((m.indptr.astype(np.int32), m.indices.astype(index_dtype), m.data), r) for m, r in ((a, ra), (b, rb))]
    indptr, indices, data = csr.gather(pieces, native=native)
    assert indices.dtype == index_dtype
    expected = sp.vstack([a[ra], b[rb]]).tocsr()
    np.testing.assert_array_equal(indptr, expected.indptr)
    np.testing.assert_array_equal(indices, expected.indices)
    np.testing.assert_array_equal(data, expected.data)



@pytest.mark.parametrize("native", [True, False])
def test_gather_fills_given_int64_outputs(native):
    """The client gathers control rows straight into a row of its int64 COO coordinates."""
    m = sp.random(50, 30, density=0.3, format="csr", dtype=np.float32, random_state=2)
    rows = np.array([3, 3, 49, 0, 17])
    source = (m.indptr.astype(np.int64), m.indices.astype(np.int64), m.data)
    total = int(np.diff(m.indptr)[rows].sum())
    coords, values = np.full((2, total), -1, dtype=np.int64), np.zeros(total, np.float32)
    indptr, indices, data = csr.gather([(source, rows)], native=native, out=(coords[1], values))
    assert np.shares_memory(indices, coords) and data is values
    np.testing.assert_array_equal(coords[1], m[rows].indices)
    np.testing.assert_array_equal(values, m[rows].data)
    with pytest.raises(ValueError, match="out arrays hold"):
        csr.gather([(source, rows)], native=native, out=(coords[1][:-1], values[:-1]))

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


def test_row_numbers_give_each_value_its_row():
    indptr = np.array([0, 2, 2, 5, 6], dtype=np.int32)  # an empty row too
    out = np.full(6, -1, dtype=np.int64)
    csr.row_numbers(indptr, out=out)
    np.testing.assert_array_equal(out, np.repeat(np.arange(4), np.diff(indptr)))
    out[:] = -1
    csr.row_numbers(indptr[2:], out=out)  # a slice fills its own values, numbering from 0
    np.testing.assert_array_equal(out, [-1, -1, 0, 0, 0, 1])


def test_column_indices_are_uint16_when_the_columns_fit():
    assert codec.index_type(2_000) == codec.index_type(65_536) == pa.uint16()
    assert codec.index_type(65_537) == pa.int32()
    columns = codec.csr_columns("x", np.array([0, 2, 3]), np.array([1, 65_535, 0]), np.ones(3), pa.uint16())
    assert columns["x_indices"].type == pa.list_(pa.uint16())
    batch = pa.RecordBatch.from_pydict(columns)
    indptr, indices, data = codec.csr_from_columns(batch, "x")
    np.testing.assert_array_equal(indices, [1, 65_535, 0])


@pytest.mark.parametrize("index_dtype", [np.int32, np.uint16])
def test_check_accepts_sound_csr_and_names_what_is_wrong(index_dtype):
    """The client's bounds check on every CSR batch: no false alarms on real matrices (empty rows,
    an empty batch), and each fault named."""
    m = sp.random(64, 300, density=0.1, format="csr", dtype=np.float32, random_state=3)
    m[5] = 0  # an empty row
    m.eliminate_zeros()
    indptr, indices = m.indptr.astype(np.int32), m.indices.astype(index_dtype)
    csr.check(indptr, indices, m.data, 300)
    csr.check(np.zeros(1, np.int32), np.zeros(0, index_dtype), np.zeros(0, np.float32), 300)
    with pytest.raises(ValueError, match=r"column index 299 is outside \[0, 299\)"):
        csr.check(indptr, np.append(indices[:-1], index_dtype(299)), m.data, 299)
    with pytest.raises(ValueError, match="empty indptr"):
        csr.check(np.zeros(0, np.int32), indices, m.data, 300)
    shifted = indptr.copy()
    shifted[0] = 1
    with pytest.raises(ValueError, match="indptr runs from 1"):
        csr.check(shifted, indices, m.data, 300)


def test_gather_refuses_rows_and_bounds_outside_its_source():
    m = sp.random(10, 8, density=0.5, format="csr", dtype=np.float32, random_state=4)
    source = (m.indptr.astype(np.int32), m.indices.astype(np.int32), m.data)
    for rows in (np.array([0, 10]), np.array([-1])):
        with pytest.raises(IndexError, match="outside the 10 rows"):
            csr.gather([(source, rows)])
    short = (source[0], source[1], source[2][:-3])  # fewer values than the row pointers say
    with pytest.raises(ValueError, match="corrupt indptr"):
        csr.gather([(short, np.array([9]))])


def test_each_kinds_schema_builder_names_the_columns_both_ends_read():
    from cellfeed.wire import dynaclr, perturbation, shm, table

    pert = perturbation.batch_schema(
        {"pert": (False, 100), "ctrl": (False, 100), "pert_counts": (True, 7)},
        controls_by_row=True, barcodes=True, dataset_column=False, obs_types={"age": pa.float32()}, meta={"group_size_S": 4},
    )
    assert pert.names == [
        "pert_indices", "pert_data", perturbation.dense("pert_counts"), perturbation.CTRL_ROW, "target", "cell_type",
        "batch", "cell_mask", "pert_barcode", "ctrl_barcode", "obs.age",
    ]
    assert shm.LIST_KEY in pert.field("pert_data").metadata and pert.field("pert_indices").type == pa.list_(pa.uint16())
    assert codec.read_metadata(pert) == {"kind": "perturbation", "group_size_S": 4}
    inline = perturbation.batch_schema({"pert": (True, 5), "ctrl": (True, 5)}, controls_by_row=False, barcodes=False,
                                       dataset_column=True, obs_types={}, meta={})
    assert inline.names == ["pert_dense", "ctrl_dense", "target", "cell_type", "batch", "cell_mask", "dataset"]

    train = dynaclr.batch_schema("train", (2, 1, 8, 8), (2, 3, 4), with_index=False, labels=["state"], facts={})
    assert train.names[:5] == ["anchor", "positive", "anchor_norm", "positive_norm", "padding"]
    assert "positive_meta.labels.state" in train.names and "track_id" not in train.names
    predict = dynaclr.batch_schema("predict", (2, 1, 8, 8), (2, 3, 4), with_index=False, labels=None, facts={})
    assert "positive" not in predict.names and set(dynaclr.INDEX_COLUMNS) <= set(predict.names)

    rows = table.batch_schema([pa.field("x", pa.int64())], "data/x")
    assert rows.names == ["x", table.PADDING] and codec.read_metadata(rows)["padding"] == table.PADDING


@pytest.mark.parametrize("index_dtype", [np.uint16, np.int32, np.int64])
def test_to_dense_equals_scipy_toarray(index_dtype):
    """The client's CSR-to-dense scatter gives scipy's dense rows, empty rows and empty CSRs too."""
    dense = sp.random(40, 300, density=0.1, dtype=np.float32, random_state=3).toarray()
    dense[5] = 0  # an empty row
    m = sp.csr_matrix(dense)
    out = csr.to_dense(m.indptr.astype(np.int64), m.indices.astype(index_dtype), m.data, 300)
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, m.toarray())
    assert csr.to_dense(np.zeros(1, np.int64), np.zeros(0, index_dtype), np.zeros(0, np.float32), 7).shape == (0, 7)
