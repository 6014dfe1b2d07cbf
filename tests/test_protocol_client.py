"""A stranger's client: raw `pyarrow.flight`, written from docs/protocol.md and docs/protocol/*.md.

No `cellfeed.client` import: the session is opened with the `open_session` action, each rank's
epoch planned with GetFlightInfo, every endpoint's ticket read with DoGet, and the record batches
decoded by the pages' rules. One real server on loopback over real files (h5ad screens, OME-Zarr
plates with tracks, a preprocessed parquet dataset); the assertions are the docs' promises:
schemas and shapes, padding masks, equal `num_batches` on every rank, and every item of a split
once over all ranks. The only cellfeed import is the generated protobuf of
proto/cellfeed/v1/cellfeed.proto.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from cellfeed.server.kinds.perturbation.synthetic import write_perturbation_h5ad
from cellfeed.wire import cellfeed_pb2 as pb
from tests.conftest import ServerProcess
from tests.fixtures.plates import make_dynaclr_data
from tests.fixtures.preprocess_h5ad import make_cellxgene_like, write

CONTROL = "non-targeting"
S, B = 4, 4
WORLD, STREAMS = 2, 2
TOML = """
[datasets]
screen = "{k562,rpe1}.h5ad"
[zeroshot]
"screen.rpe1" = "test"
[fewshot."screen.k562"]
val = ["G001"]
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One data root: two perturbation screens, two time-lapse plates, one parquet dataset."""
    from cellfeed.server.preprocess.cli import main as preprocess

    root = tmp_path_factory.mktemp("stranger") / "data"
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562", seed=1)
    write_perturbation_h5ad(root / "rpe1.h5ad", cell_type="rpe1", seed=2)
    screen = write_perturbation_h5ad(root / "obsm" / "k562.h5ad", cell_type="k562", seed=1)
    rng = np.random.default_rng(0)
    screen.obsm["X_hvg"] = rng.random((screen.n_obs, 10), dtype=np.float32)  # a dense embedding (cell-load's embed_key)
    screen.write_h5ad(root / "obsm" / "k562.h5ad")
    make_dynaclr_data(root)
    cells = make_cellxgene_like(n_cells=500, n_genes=80, n_donors=10, seed=7)
    n = cells.n_obs
    umi = pd.array(np.arange(n) % 40, dtype="Int64")
    umi[np.arange(n) % 250 < 12] = pd.NA  # nulls in a few runs of rows
    cells.obs["umi_bins"] = umi
    write(root / "in" / "cells.h5ad", cells)
    args = ["run-all", str(root / "in" / "cells.h5ad"), "--chunk-size", "120", "--test-size", "0.25", "--no-progress",
            "--interim-dir", str(root / "interim"), "--output-dir", str(root / "out"), "--log-dir", str(root / "logs")]
    assert preprocess(args) == 0
    return root


@pytest.fixture(scope="module")
def client(root):
    server = ServerProcess(root)
    server.start()
    c = flight.FlightClient(server.flight_uri)
    yield c
    c.close()
    server.stop()


# -- the raw protocol: docs/protocol.md "Calls" -----------------------------------------------
def open_session(client: flight.FlightClient, kind: str, config: dict) -> tuple[str, dict, dict[str, pa.Table]]:
    body = pb.OpenSession(kind=kind, config_json=json.dumps(config)).SerializeToString()
    results = list(client.do_action(flight.Action("open_session", body)))
    assert len(results) == 1  # "one result: SessionInfo"
    info = pb.SessionInfo()
    info.ParseFromString(results[0].body.to_pybytes())
    assert info.kind == kind and info.session_id
    tables = {name: pa.ipc.open_stream(pa.py_buffer(raw)).read_all() for name, raw in info.tables.items()}
    return info.session_id, json.loads(info.info_json), tables


def plan(client, session_id: str, split: str, *, rank: int, world_size: int = WORLD, stream_count: int = STREAMS,
         epoch: int = 0, first_batch: int = 0) -> tuple[flight.FlightInfo, pb.Plan]:
    request = pb.StreamRequest(session_id=session_id, split=split, epoch=epoch, rank=rank, world_size=world_size,
                               stream_count=stream_count, first_batch=first_batch)
    fi = client.get_flight_info(flight.FlightDescriptor.for_command(request.SerializeToString()))
    p = pb.Plan()
    p.ParseFromString(fi.app_metadata)
    return fi, p


def read_rank(client, session_id: str, split: str, *, rank: int, world_size: int = WORLD, stream_count: int = STREAMS,
              first_batch: int = 0) -> tuple[list[pa.RecordBatch], pb.Plan, pa.Schema]:
    """One rank's epoch (eval epochs are pinned to 0, as the docs tell a raw client), in rank-local
    batch order: stream i carries batches k >= first_batch with k % stream_count == i."""
    fi, p = plan(client, session_id, split, rank=rank, world_size=world_size, stream_count=stream_count, first_batch=first_batch)
    assert len(fi.endpoints) == stream_count
    per_stream = []
    for i, endpoint in enumerate(fi.endpoints):
        ticket = pb.Ticket()
        ticket.ParseFromString(endpoint.ticket.ticket)
        assert (ticket.stream_index, ticket.stream_count, ticket.rank, ticket.split) == (i, stream_count, rank, split)
        assert not ticket.continue_epochs and ticket.epoch == 0
        reader = client.do_get(endpoint.ticket)
        assert reader.schema.equals(fi.schema)
        per_stream.append([chunk.data for chunk in reader])
    by_k = {}
    for i, got in enumerate(per_stream):
        ks = [k for k in range(first_batch, p.num_batches) if k % stream_count == i]
        assert len(got) == len(ks), f"stream {i} of {split!r} rank {rank}: {len(got)} batches, expected {len(ks)}"
        by_k.update(zip(ks, got))
    return [by_k[k] for k in sorted(by_k)], p, fi.schema


def read_all_ranks(client, session_id: str, split: str, **kw) -> list[tuple[int, pa.RecordBatch]]:
    out, counts = [], set()
    for rank in range(WORLD):
        batches, p, _ = read_rank(client, session_id, split, rank=rank, **kw)
        counts.add(p.num_batches)
        out += [(rank, rb) for rb in batches]
    assert len(counts) == 1, f"{split}: ranks got different num_batches {counts}"
    return out


def cellfeed_meta(schema: pa.Schema) -> dict:
    return json.loads(schema.metadata[b"cellfeed"])


# -- perturbation: docs/protocol/perturbation.md ----------------------------------------------
def csr_rows(rb: pa.RecordBatch | pa.Table, prefix: str, width: int) -> np.ndarray:
    """'Decoding a batch by hand', step 1: CSR list columns to a dense [rows, width] matrix."""
    col_i, col_d = rb.column(f"{prefix}_indices"), rb.column(f"{prefix}_data")
    if isinstance(col_i, pa.ChunkedArray):
        col_i, col_d = col_i.combine_chunks(), col_d.combine_chunks()
    offsets = col_i.offsets.to_numpy()
    assert np.array_equal(offsets, col_d.offsets.to_numpy())  # one offsets buffer
    lo, hi = int(offsets[0]), int(offsets[-1])
    indptr = offsets - lo
    indices = col_i.values.to_numpy()[lo:hi].astype(np.int64)
    data = col_d.values.to_numpy()[lo:hi]
    assert np.all(np.diff(indptr) >= 0) and indptr[-1] == len(indices) == len(data)  # the client's checks
    assert len(indices) == 0 or (indices.min() >= 0 and indices.max() < width)
    out = np.zeros((len(indptr) - 1, width), np.float32)
    out[np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)), indices] = data
    return out


@pytest.fixture(scope="module")
def screen(root):
    files = {stem: ad.read_h5ad(root / f"{stem}.h5ad") for stem in ("k562", "rpe1")}
    obs = {stem: a.obs for stem, a in files.items()}

    def cells(stem, keep):
        o = obs[stem]
        return set(o.index[(o.target_gene.astype(str) != CONTROL) & keep(o.target_gene.astype(str))])

    expected = {
        "train": cells("k562", lambda t: t != "G001"),
        "val": cells("k562", lambda t: t == "G001"),
        "test": cells("rpe1", lambda t: t == t),
    }
    return files, expected


def x_row(files, barcode: str) -> np.ndarray:
    a = files[barcode.split("_")[0]]
    return np.asarray(a.X[a.obs_names.get_loc(barcode)].todense(), np.float32).ravel()


@pytest.mark.parametrize("controls", ["table", "inline"])
def test_perturbation_batches_decode_as_the_docs_say(client, screen, controls):
    files, expected = screen
    config = {"toml": TOML, "group_size_S": S, "batch_size": B, "barcodes": True, "seed": 3}
    if controls == "inline":
        config["control_table_max_bytes"] = 0
    sid, info, tables = open_session(client, "perturbation", config)
    assert info["controls"] == controls and info["toml_schema"] == "protoplast"
    assert ("controls" in tables) == (controls == "table")
    assert info["pert_emb"] == "onehot" and info["embedding_dim"] == len(info["targets"]) and CONTROL in info["targets"]
    G = info["input_dim"]
    assert G == info["n_vars"] == 50 and info["encoding"] == {"pert": "csr", "ctrl": "csr"}
    control_rows = csr_rows(tables["controls"], "ctrl", G) if controls == "table" else None

    for split in ("train", "val", "test"):
        batches = read_all_ranks(client, sid, split)
        num_batches = len(batches) // WORLD
        items = info["splits"][split]["items"]
        assert num_batches == math.ceil(math.ceil(items / B) / WORLD)
        seen: Counter = Counter()
        fillers = padded = 0
        for _, rb in batches:
            schema = rb.schema
            ctrl_cols = ["ctrl_row"] if controls == "table" else ["ctrl_indices", "ctrl_data"]
            assert schema.names == ["pert_indices", "pert_data", *ctrl_cols, "target", "cell_type", "batch", "cell_mask",
                                    "pert_barcode", "ctrl_barcode"]
            assert cellfeed_meta(schema) == {"kind": "perturbation", "group_size_S": S, "n_vars": G, "input_dim": G}
            assert schema.field("pert_indices").type == pa.list_(pa.uint16())
            assert rb.num_rows % S == 0
            nb = rb.num_rows // S
            assert 1 <= nb <= B
            mask = rb.column("cell_mask").to_numpy(zero_copy_only=False).reshape(nb, S)
            if split != "train" and not mask.any():
                assert nb == 1  # a rank's filler batch in evaluation: one item, all padding
                fillers += 1
            padded += int((~mask).sum())
            # dictionaries are the whole vocabularies; target and cell type constant within an item
            assert rb.column("target").dictionary.to_pylist() == info["targets"]
            assert rb.column("cell_type").dictionary.to_pylist() == info["cell_types"]
            assert rb.column("batch").dictionary.to_pylist() == info["batches"]
            target = rb.column("target").indices.to_numpy().reshape(nb, S)
            cell_type = rb.column("cell_type").indices.to_numpy().reshape(nb, S)
            assert (target == target[:, :1]).all() and (cell_type == cell_type[:, :1]).all()
            pert = csr_rows(rb, "pert", G)
            if controls == "table":
                ctrl_row = rb.column("ctrl_row").to_numpy()
                assert ctrl_row.min() >= 0 and ctrl_row.max() < len(control_rows)
                ctrl = control_rows[ctrl_row]
            else:
                ctrl = csr_rows(rb, "ctrl", G)
            pert_bc = rb.column("pert_barcode").to_pylist()
            ctrl_bc = rb.column("ctrl_barcode").to_pylist()
            targets = np.asarray(info["targets"])[target.ravel()]
            for i, (p_bc, c_bc) in enumerate(zip(pert_bc, ctrl_bc)):
                np.testing.assert_array_equal(pert[i], x_row(files, p_bc))
                np.testing.assert_array_equal(ctrl[i], x_row(files, c_bc))
                stem = p_bc.split("_")[0]
                assert c_bc.split("_")[0] == stem  # a control of the same file and cell type
                assert str(files[stem].obs.loc[c_bc, "target_gene"]) == CONTROL
                assert str(files[stem].obs.loc[p_bc, "target_gene"]) == targets[i]
            seen.update(b for b, real in zip(pert_bc, mask.ravel()) if real)
        # the padding mask: every cell of the split once over all ranks, in every split
        assert set(seen) == expected[split] and set(seen.values()) == {1}, split
        assert info["splits"][split]["cells"] == len(expected[split]) > 0
        assert padded > 0, split  # the data are made so that every split has padding rows
        if split == "val":
            assert fillers == 1  # 10 items in batches of 4: 3 global batches, the 4th a filler


@pytest.mark.parametrize("controls", ["table", "inline"])
def test_perturbation_embed_key_rows_are_dense_tensors(client, root, controls):
    """`embed_key` of a dense obsm: `pert_dense`/`ctrl_dense` tensors; `pert_counts` X rows as CSR."""
    a = ad.read_h5ad(root / "obsm" / "k562.h5ad")
    config = {"files": ["obsm/k562.h5ad"], "embed_key": "X_hvg", "pert_counts": "X", "group_size_S": S, "batch_size": B,
              "barcodes": True}
    if controls == "inline":
        config["control_table_max_bytes"] = 0
    sid, info, tables = open_session(client, "perturbation", config)
    assert info["input_dim"] == 10 and info["n_vars"] == 50 and info["counts_dims"] == {"pert_counts": 50}
    assert info["encoding"] == {"pert": "dense", "ctrl": "dense", "pert_counts": "csr"} and info["controls"] == controls
    if controls == "table":
        assert tables["controls"].schema.names == ["ctrl_dense"]
        control_rows = tables["controls"].column("ctrl_dense").combine_chunks().to_numpy_ndarray()
    batches, _, schema = read_rank(client, sid, "train", rank=0)
    ctrl_cols = ["ctrl_row"] if controls == "table" else ["ctrl_dense"]
    assert schema.names[:4] == ["pert_dense", "pert_counts_indices", "pert_counts_data", *ctrl_cols]
    assert schema.field("pert_dense").type == pa.fixed_shape_tensor(pa.float32(), [10])
    for rb in batches[:3]:
        pert = rb.column("pert_dense").to_numpy_ndarray()
        assert pert.shape == (rb.num_rows, 10) and pert.dtype == np.float32
        ctrl = control_rows[rb.column("ctrl_row").to_numpy()] if controls == "table" else rb.column("ctrl_dense").to_numpy_ndarray()
        counts = csr_rows(rb, "pert_counts", 50)
        for i, (p_bc, c_bc) in enumerate(zip(rb.column("pert_barcode").to_pylist(), rb.column("ctrl_barcode").to_pylist())):
            row, crow = a.obs_names.get_loc(p_bc), a.obs_names.get_loc(c_bc)
            np.testing.assert_array_equal(pert[i], a.obsm["X_hvg"][row])
            np.testing.assert_array_equal(ctrl[i], a.obsm["X_hvg"][crow])
            np.testing.assert_array_equal(counts[i], np.asarray(a.X[row].todense()).ravel())


def test_a_resumed_stream_and_a_refused_first_batch(client):
    sid, info, _ = open_session(client, "perturbation", {"toml": TOML, "group_size_S": S, "batch_size": B, "barcodes": True})
    full, p, _ = read_rank(client, sid, "test", rank=1)
    later, _, _ = read_rank(client, sid, "test", rank=1, first_batch=1)
    assert [rb.column("pert_barcode").to_pylist() for rb in later] == [rb.column("pert_barcode").to_pylist() for rb in full[1:]]
    with pytest.raises(flight.FlightServerError, match=r"first_batch .* is past the end") as past_the_end:
        plan(client, sid, "test", rank=0, first_batch=p.num_batches)
    assert past_the_end.value.extra_info == b"cellfeed:invalid"  # docs/protocol.md "Errors": the kind is extra_info
    with pytest.raises(flight.FlightServerError, match=r"unknown split 'no-such-split'") as unknown_split:
        plan(client, sid, "no-such-split", rank=0)
    assert unknown_split.value.extra_info == b"cellfeed:invalid"


# -- dynaclr: docs/protocol/dynaclr.md --------------------------------------------------------
def test_dynaclr_batches_decode_as_the_docs_say(client):
    config = {"experiments_yaml": "experiments.yml", "z_range": [0, 2], "yx_patch_size": [16, 16],
              "val_experiments": ["tomm20"], "batch_size": 8, "return_index": True}
    sid, info, tables = open_session(client, "dynaclr", config)
    assert tables == {}
    C, Z, Y, X = info["patch_shape"]
    assert (C, Z, Y, X) == (2, 2, 16, 16) and info["channel_keys"] == ["ch_0", "ch_1"]
    L, NS = len(info["norm_levels"]), len(info["norm_stats"])
    frames = {e["name"]: e["tau_range_frames"] for e in info["experiments"]}

    for split in ("train", "val", "predict"):
        batches = read_all_ranks(client, sid, split)
        items = info["splits"][split]["items"]
        if split != "train":
            assert len(batches) // WORLD == math.ceil(math.ceil(items / 8) / WORLD)
        real: Counter = Counter()
        for _, rb in batches:
            names = rb.schema.names
            meta = cellfeed_meta(rb.schema)
            assert meta["kind"] == "dynaclr" and meta["split"] == split and meta["patch_shape"] == [C, Z, Y, X]
            anchor = rb.column("anchor").to_numpy_ndarray()
            norm = rb.column("anchor_norm").to_numpy_ndarray()
            assert anchor.shape == (rb.num_rows, C, Z, Y, X) and anchor.dtype == np.float32
            assert norm.shape == (rb.num_rows, C, L, NS) and norm.dtype == np.float32
            assert ("positive" in names) == (split != "predict") and ("positive_t" in names) == (split != "predict")
            padding = rb.column("padding").to_numpy(zero_copy_only=False)
            assert rb.schema.field("padding").type == pa.bool_()
            assert not any(f.nullable for f in rb.schema)
            assert rb.column("experiment").dictionary.to_pylist() == [e["name"] for e in info["experiments"]]
            assert rb.column("condition").dictionary.to_pylist() == info["conditions"]
            exp = np.asarray(rb.column("experiment").dictionary)[rb.column("experiment").indices.to_numpy()]
            fov = np.asarray(rb.column("fov_name").dictionary)[rb.column("fov_name").indices.to_numpy()]
            track, t = rb.column("track_id").to_numpy(), rb.column("t").to_numpy()
            if split != "predict":
                assert rb.column("positive").to_numpy_ndarray().shape == anchor.shape
                tau = rb.column("positive_t").to_numpy() - t
                lo = np.array([max(frames[e][0], 1) for e in exp])
                hi = np.array([frames[e][1] for e in exp])
                assert ((tau >= lo) & (tau <= hi)).all()
            if split == "val":
                assert set(exp) == {"tomm20"}
            if padding.all() and split != "train":
                assert rb.num_rows == 8  # a rank's filler batch: whole, all padding
            real.update(zip(exp[~padding], fov[~padding], track[~padding], t[~padding]))
        if split != "train":  # every item once (val: anchors; predict: every indexed row)
            assert sum(real.values()) == items and set(real.values()) == {1}, split


# -- table: docs/protocol/table.md ------------------------------------------------------------
def test_table_batches_decode_as_the_docs_say(client, root):
    batch = 16
    sid, info, tables = open_session(client, "table", {"dataset": "out/cells", "batch_size": batch, "seed": 1})
    assert tables == {} and info["train_split"] == "train" and set(info["splits"]) == {"train", "test"}
    assert info["nullable"]["umi_bins"] is True and info["nullable"]["padding"] is False
    nulls = 0
    for split in ("train", "test"):
        stored = pa.concat_tables(pq.read_table(f) for f in sorted((root / "out/cells" / split / "chunks").glob("*.parquet")))
        n = stored.num_rows
        assert info["splits"][split]["rows"] == n
        batches = read_all_ranks(client, sid, split)
        assert len(batches) // WORLD == math.ceil(math.ceil(n / batch) / WORLD)
        names: Counter = Counter()
        null_umi = 0
        for _, rb in batches:
            schema = rb.schema
            assert schema.names == [*info["columns"], "padding"]
            assert cellfeed_meta(schema) == {"kind": "table", "dataset": "out/cells", "padding": "padding"}
            for f in schema:
                assert f.nullable == info["nullable"][f.name], f.name
                assert str(f.type) == info["types"][f.name], f.name
                if f.name in stored.schema.names:
                    assert f.type == stored.schema.field(f.name).type  # the stored types, not converted
            assert 1 <= rb.num_rows <= batch
            padding = rb.column("padding").to_numpy(zero_copy_only=False)
            keep = pa.array(~padding)
            real = rb.filter(keep)
            names.update(real.column("obs_names").to_pylist())
            null_umi += real.column("umi_bins").null_count  # nulls stay null
            values, offsets = real.column("values").values, real.column("values").offsets.to_numpy()
            assert len(values) >= offsets[-1] - offsets[0]
        assert names == Counter(stored.column("obs_names").to_pylist()), split  # every row once
        assert null_umi == stored.column("umi_bins").null_count, split
        nulls += null_umi
    assert nulls > 0  # the data set has nulls, and they arrived as nulls


# -- the pages name every column a stream sends ---------------------------------------------
DOCS = Path(__file__).resolve().parents[1] / "docs" / "protocol"


def documented(name: str, text: str) -> bool:
    """`name` in backticks, or a dotted name under its documented pattern (`obs.<name>`,
    `anchor_meta.labels.<key>`, `.field` shorthand beside `prefix.`; `positive_meta.*` is
    documented as `anchor_meta.*`)."""
    if f"`{name}`" in text:
        return True
    parts = name.split(".")
    if len(parts) == 1:
        return False
    if parts[0] == "positive_meta" and "`positive_meta.*` | as `anchor_meta.*`" in text:
        return documented(".".join(["anchor_meta", *parts[1:]]), text)
    head, parent, last = parts[0], ".".join(parts[:-1]), parts[-1]
    return re.search(rf"`{re.escape(parent)}\.<\w+>`", text) is not None or (f"`.{last}`" in text and f"`{head}." in text)


def test_every_streamed_column_is_documented(client):
    pert = (DOCS / "perturbation.md").read_text()
    dyn = (DOCS / "dynaclr.md").read_text()
    configs = [
        {"toml": TOML, "barcodes": True, "dataset_column": True, "obs_columns": ["batch_var"]},
        {"toml": TOML, "control_table_max_bytes": 0, "pert_counts": "X", "ctrl_counts": "X"},
        {"files": ["obsm/k562.h5ad"], "embed_key": "X_hvg", "pert_counts": "X", "ctrl_counts": "X", "control_table_max_bytes": 0},
    ]
    names: set[str] = set()
    for config in configs:
        sid, _, tables = open_session(client, "perturbation", config)
        names |= set(plan(client, sid, "train", rank=0)[0].schema.names)
        names |= {n for t in tables.values() for n in t.schema.names}
    missing = sorted(n for n in names if not documented(n, pert))
    assert not missing, f"docs/protocol/perturbation.md does not name {missing}"
    base = {"experiments_yaml": "experiments.yml", "z_range": [0, 2], "yx_patch_size": [16, 16], "val_experiments": ["tomm20"]}
    names = set()
    for extra in ({"return_index": True}, {"return_meta": True, "label_columns": {"cond": "perturbation"}}):
        sid, _, _ = open_session(client, "dynaclr", {**base, **extra})
        for split in ("train", "val", "predict"):
            names |= set(plan(client, sid, split, rank=0)[0].schema.names)
    missing = sorted(n for n in names if not documented(n, dyn))
    assert not missing, f"docs/protocol/dynaclr.md does not name {missing}"
