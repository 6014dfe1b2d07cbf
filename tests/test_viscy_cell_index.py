"""Port of VisCy main's `packages/viscy-data/tests/test_cell_index.py` (mehta-lab/VisCy, branch
main, commit 4b62365c0df25929bffc7f01b3bb2d1c11d69cce): the cell index parquet (validation, I/O,
the time-lapse builder, lineage reconstruction).

VisCy's `build_timelapse_cell_index` is cellfeed's `build-cell-index` job, run here by a real
server on loopback through its jobs API (`POST /v1/jobs`) over iohub plates; VisCy's
`validate_cell_index` / `read_cell_index` is what the server does when a session opens with
`cell_index_path`. The OPS helpers and converter (`_parse_bbox_*`, `convert_ops_parquet`), the
`strict` validation mode and the OPS/time-lapse concatenation have no counterpart: cellfeed
builds and serves time-lapse indices only (listed in docs/dynaclr.md, "Ported VisCy tests").
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cellfeed.client import MultiExperimentDataModule, RequestError
from cellfeed.server.kinds.dynaclr.cell_index import CELL_INDEX_SCHEMA
from tests.fixtures.jobs import run_job
from tests.fixtures.viscy_ports import ported_server, write_plate, write_tracks

CORE = ["cell_id", "experiment", "store_path", "tracks_path", "fov", "well", "y", "x", "z", "perturbation", "channel_name", "microscope"]
GROUPING = ["t", "track_id", "global_track_id", "lineage_id", "parent_track_id", "hours_post_perturbation"]
OPS = ["gene_name", "reporter", "sgRNA"]


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with ported_server(tmp_path_factory, "viscy-cell-index") as p:
        yield p


def _collection(path, tracks_path, channels=("nuclei_labels",), wells=None) -> dict:
    return {"name": "test_collection", "experiments": [{
        "name": "test_exp", "data_path": str(path), "tracks_path": str(tracks_path),
        "channels": [{"name": c, "marker": c} for c in channels],
        "perturbation_wells": wells or {"uninfected": ["A/1", "A/2"], "infected": ["B/1", "B/2"]},
        "interval_minutes": 30.0, "start_hpi": 0.0}]}


def _build(ported, folder, collection: dict, **options) -> pd.DataFrame:
    (folder / "collection.yml").write_text(yaml.safe_dump(collection))
    rel = folder.relative_to(ported.root)
    job = run_job(ported.server.http_url, {"kind": "build-cell-index", "inputs": [f"{rel}/collection.yml"],
                        "options": {"output": f"{rel}/cells.parquet", **options}})
    assert job["state"] == "succeeded", json.dumps(job)
    return pq.read_table(folder / "cells.parquet").to_pandas()


@pytest.fixture(scope="module")
def tracks_hcs(ported):
    """VisCy's tracks_hcs_dataset: wells A/1, A/2, B/1, B/2 x 3 FOVs, 1 x 256 x 256 uint16, two
    tracks per FOV (CSV next to each position)."""
    folder = ported.folder("tracks-hcs")
    plate = folder / "tracks.zarr"
    fovs = [f"{w}/{i}" for w in ("A/1", "A/2", "B/1", "B/2") for i in range(3)]
    write_plate(plate, ["nuclei_labels"], fovs, n_t=2, zyx=(1, 256, 256), dtype=np.uint16, seed=None)
    tracks = pd.DataFrame({"track_id": [0, 1], "t": [0, 1], "y": [100, 200], "x": [96, 160], "id": [0, 1],
                           "parent_track_id": [-1, -1], "parent_id": [-1, -1]})
    for fov in fovs:
        write_tracks(plate, fov, tracks)
    return folder, plate


@pytest.fixture(scope="module")
def built(ported, tracks_hcs):
    folder, plate = tracks_hcs
    return _build(ported, folder, _collection(plate, plate))


def _session(ported, path, **kw) -> dict:
    dm = MultiExperimentDataModule(cell_index_path=str(path.relative_to(ported.root)), z_range=(0, 1), yx_patch_size=(16, 16),
                                   final_yx_patch_size=(16, 16), batch_size=4, split_ratio=1.0, tau_range=(0.5, 0.5),
                                   server=ported.server.flight_uri, **kw)
    dm.setup("fit")
    return dm.info


def _timelapse_df(store: str, tracks: str) -> pd.DataFrame:
    """VisCy's _make_timelapse_df: two tracks seen at t = 0, 1 in A/1/0."""
    n = 4
    return pd.DataFrame({
        "cell_id": [f"cell_{i}" for i in range(n)], "experiment": "exp_a", "store_path": store, "tracks_path": tracks,
        "fov": "A/1/0", "well": "A/1", "y": np.array([8, 8, 9, 9], np.float32), "x": np.array([8, 9, 8, 9], np.float32),
        "z": np.zeros(n, np.int16), "perturbation": "uninfected", "channel_name": "GFP", "microscope": "",
        "t": pd.array([0, 1, 0, 1], dtype="Int32"), "track_id": pd.array([0, 0, 1, 1], dtype="Int32"),
        "global_track_id": ["exp_a_A/1/0_0"] * 2 + ["exp_a_A/1/0_1"] * 2, "lineage_id": ["exp_a_A/1/0_0"] * 2 + ["exp_a_A/1/0_1"] * 2,
        "parent_track_id": pd.array([-1] * 4, dtype="Int32"), "hours_post_perturbation": [0.0, 0.5, 0.0, 0.5], "interval_minutes": 30.0,
    })


@pytest.fixture(scope="module")
def flat(ported):
    """A small plate for hand-written cell indices (channels Phase3D, GFP)."""
    folder = ported.folder("flat")
    write_plate(folder / "exp_a.zarr", ["Phase3D", "GFP"], ["A/1/0"], n_t=2, zyx=(1, 16, 16))
    return folder


def _write(folder, df: pd.DataFrame, name: str):
    path = folder / name
    df.to_parquet(path, index=False)
    return path


# -- validation ------------------------------------------------------------------------------------

def test_valid_df_passes(ported, flat):
    # cellfeed serves time-lapse indices: the valid index here is VisCy's time-lapse frame.
    path = _write(flat, _timelapse_df(str(flat / "exp_a.zarr"), ""), "valid.parquet")
    (exp,) = _session(ported, path)["experiments"]
    assert exp["name"] == "exp_a" and exp["rows"] == 4


def test_missing_core_columns_raises(ported, flat):
    df = _timelapse_df(str(flat / "exp_a.zarr"), "").drop(columns=["experiment"])
    with pytest.raises(RequestError, match="missing column.*experiment"):
        _session(ported, _write(flat, df, "missing.parquet"))


def test_duplicate_cell_id_channel_name_raises(ported, flat):
    df = _timelapse_df(str(flat / "exp_a.zarr"), "")
    df.loc[1, "cell_id"] = df.loc[0, "cell_id"]
    with pytest.raises(RequestError, match="cell_id"):
        _session(ported, _write(flat, df, "duplicate.parquet"))


def test_same_cell_id_different_channel_passes(ported, flat):
    """The flat parquet: one row per (cell, frame, channel); the rows of one cell are one observation."""
    one = _timelapse_df(str(flat / "exp_a.zarr"), "")
    two = pd.concat([one.assign(channel_name="Phase3D"), one], ignore_index=True)
    (exp,) = _session(ported, _write(flat, two, "flat.parquet"))["experiments"]
    assert exp["source_channel"] == ["Phase3D", "GFP"] and exp["rows"] == 4


# test_strict_requires_all_columns, test_strict_passes_with_all_columns, test_all_null_column_warns:
# no counterpart (no strict mode; the server needs the columns it reads and ignores the rest).


# -- I/O -------------------------------------------------------------------------------------------

def test_round_trip_preserves_dtypes(built, tracks_hcs):
    _, plate = tracks_hcs
    table = pq.read_table(plate.parent / "cells.parquet")
    assert table.schema.equals(CELL_INDEX_SCHEMA)  # VisCy main's CELL_INDEX_SCHEMA, names and types
    assert built["y"].dtype == np.float32 and built["x"].dtype == np.float32
    assert pd.api.types.is_string_dtype(built["cell_id"])
    assert built["gene_name"].isna().all()


def test_write_adds_missing_columns(built):
    assert {"gene_name", "t"} <= set(built.columns)
    assert [f.name for f in CELL_INDEX_SCHEMA] == list(built.columns)


# -- time-lapse builder ----------------------------------------------------------------------------

def test_produces_correct_schema(built):
    # (VisCy's fixture tracks are one frame each, so no anchor: sessions on built indices are in
    # test_valid_df_passes and tests/test_dynaclr_main_cell_index.py.)
    assert len(built) == 12 * 2
    assert set(CORE + GROUPING) <= set(built.columns)


def test_lineage_reconstruction(ported):
    folder = ported.folder("lineage")
    plate = folder / "lineage.zarr"
    write_plate(plate, ["nuclei_labels"], ["A/1/0"], n_t=4, zyx=(1, 64, 64), seed=42)
    write_tracks(plate, "A/1/0", pd.DataFrame({  # 0 -> 1 -> 2
        "track_id": [0, 0, 1, 1, 2, 2], "t": [0, 1, 1, 2, 2, 3], "y": [32] * 6, "x": [32] * 6, "id": [0, 1, 2, 3, 4, 5],
        "parent_track_id": [-1, -1, 0, 0, 1, 1], "parent_id": [-1, -1, 1, 1, 3, 3]}))
    # VisCy's collection also names wells A/2, B/1, B/2 that this plate lacks; cellfeed refuses
    # that (documented difference), so the collection names A/1 only.
    df = _build(ported, folder, _collection(plate, plate, wells={"uninfected": ["A/1"]}), include_wells=["A/1"])
    assert (df["lineage_id"] == "test_exp_A/1/0_0").all()


def test_well_filtering(ported, tracks_hcs):
    folder, plate = tracks_hcs
    df = _build(ported, ported.folder("wells"), _collection(plate, plate), include_wells=["A/1"])
    assert len(df) > 0 and (df["well"] == "A/1").all()


def test_fov_exclusion(ported, tracks_hcs):
    folder, plate = tracks_hcs
    df = _build(ported, ported.folder("fovs"), _collection(plate, plate), exclude_fovs=["A/1/0"])
    assert len(df) > 0 and "A/1/0" not in set(df["well"] + "/" + df["fov"].str.rsplit("/", n=1).str[-1])


def test_cell_id_unique(built):
    assert not built["cell_id"].duplicated().any()


# -- lineage reconstruction ------------------------------------------------------------------------

def test_cross_well_same_fov_does_not_collapse(ported):
    """Wells B/2 and C/2 both have a FOV named "002001" with the same track numbers."""
    folder = ported.folder("cross-well")
    plate = folder / "plate.zarr"
    write_plate(plate, ["nuclei_labels"], ["B/2/002001", "C/2/002001"], n_t=2, zyx=(1, 32, 32), seed=1)
    write_tracks(plate, "B/2/002001", pd.DataFrame({"track_id": [35, 88], "t": [0, 1], "y": [16, 16], "x": [16, 16],
                                                    "parent_track_id": [-1, 35]}))
    write_tracks(plate, "C/2/002001", pd.DataFrame({"track_id": [34, 86, 35], "t": [0, 1, 1], "y": [16, 16, 16], "x": [16, 16, 16],
                                                    "parent_track_id": [-1, 34, -1]}))
    df = _build(ported, folder, _collection(plate, plate, wells={"mock": ["B/2"], "infected": ["C/2"]}))
    lineage = dict(zip(df["global_track_id"], df["lineage_id"]))
    assert lineage["test_exp_B/2/002001_88"] == "test_exp_B/2/002001_35"
    assert lineage["test_exp_C/2/002001_86"] == "test_exp_C/2/002001_34"
    assert lineage["test_exp_C/2/002001_35"] == "test_exp_C/2/002001_35"  # C/2's 35 is its own root


def test_no_parent_track_id_column(ported):
    folder = ported.folder("no-parent")
    plate = folder / "plate.zarr"
    write_plate(plate, ["nuclei_labels"], ["A/1/0"], n_t=2, zyx=(1, 32, 32), seed=2)
    write_tracks(plate, "A/1/0", pd.DataFrame({"track_id": [0, 1], "t": [0, 1], "y": [16, 16], "x": [16, 16]}))
    df = _build(ported, folder, _collection(plate, plate, wells={"mock": ["A/1"]}))
    assert (df["lineage_id"] == df["global_track_id"]).all()


def test_single_well_chain_resolves_to_root(ported):
    folder = ported.folder("chain")
    plate = folder / "plate.zarr"
    write_plate(plate, ["nuclei_labels"], ["A/1/0"], n_t=3, zyx=(1, 32, 32), seed=3)
    write_tracks(plate, "A/1/0", pd.DataFrame({"track_id": [1, 2, 3], "t": [0, 1, 2], "y": [16] * 3, "x": [16] * 3,
                                               "parent_track_id": [-1, 1, 2]}))
    df = _build(ported, folder, _collection(plate, plate, wells={"mock": ["A/1"]}))
    assert set(df["lineage_id"]) == {"test_exp_A/1/0_1"}


# -- OPS and cross-paradigm ------------------------------------------------------------------------
# test_bbox_to_centroid, test_small_bbox_filtering, test_perturbation_map_populates_perturbation,
# test_ops_has_null_timelapse_columns, test_concat_schema_compatible and the five
# TestConvertOpsParquet tests: no counterpart (no OPS builder or converter in cellfeed).


def test_timelapse_has_null_ops_columns(built):
    for column in OPS:
        assert built[column].isna().all()
