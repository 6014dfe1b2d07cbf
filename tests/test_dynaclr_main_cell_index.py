"""VisCy main's cell index parquet: built by a cellfeed job (REST) and by `cellfeed build-cell-index`
from a collection on iohub plates, then used as the DataModule's input (`cell_index_path`),
streaming the same batches as the collection it was built from."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellfeed.client import MultiExperimentDataModule
from tests.fixtures.jobs import run_job
from tests.fixtures.dynaclr_main import server, write_main_data  # noqa: F401 (server: a fixture)
from tests.helpers import epoch

# viscy_data.cell_index.CELL_INDEX_SCHEMA on VisCy main (4b62365c), column for column.
VISCY_COLUMNS = [
    ("cell_id", pa.string()), ("experiment", pa.string()), ("store_path", pa.string()), ("tracks_path", pa.string()),
    ("fov", pa.string()), ("well", pa.string()), ("y", pa.float32()), ("x", pa.float32()), ("z", pa.int16()),
    ("perturbation", pa.string()), ("channel_name", pa.string()), ("t", pa.int32()), ("track_id", pa.int32()),
    ("global_track_id", pa.string()), ("lineage_id", pa.string()), ("parent_track_id", pa.int32()),
    ("hours_post_perturbation", pa.float32()), ("interval_minutes", pa.float32()), ("gene_name", pa.string()),
    ("reporter", pa.string()), ("sgRNA", pa.string()), ("microscope", pa.string()), ("marker", pa.string()),
    ("organelle", pa.string()), ("pixel_size_xy_um", pa.float32()), ("pixel_size_z_um", pa.float32()),
    ("T_shape", pa.int32()), ("C_shape", pa.int32()), ("Z_shape", pa.int32()), ("Y_shape", pa.int32()),
    ("X_shape", pa.int32()), ("z_focus_mean", pa.float32()), ("norm_mean", pa.float32()), ("norm_std", pa.float32()),
    ("norm_median", pa.float32()), ("norm_iqr", pa.float32()), ("norm_max", pa.float32()), ("norm_min", pa.float32()),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_main_data(tmp_path_factory.mktemp("dynaclr-main-index") / "data")




@pytest.fixture(scope="module")
def built(server, data):
    job = run_job(server.http_url, {"kind": "build-cell-index", "inputs": ["collection.yml"], "options": {"output": "index/cells.parquet"}})
    assert job["state"] == "succeeded", job
    return job


def test_the_job_writes_viscy_mains_columns_one_row_per_cell_frame_and_channel(built, data):
    root, legacy = data
    assert built["kind"] == "build-cell-index" and built["files"][0]["counts"]["experiments"] == 2
    table = pq.read_table(root / "index/cells.parquet")
    assert [(f.name, f.type) for f in table.schema] == VISCY_COLUMNS
    df = table.to_pandas()
    assert built["files"][0]["counts"]["rows"] == len(df)
    assert set(df["channel_name"]) == {"GFP", "Phase3D"}
    assert not df.duplicated(["cell_id", "channel_name"]).any()  # VisCy's uniqueness rule
    assert len(df) == 2 * df["cell_id"].nunique()  # every cell once per channel
    first = df[df.experiment == "iohub_04"]
    assert "B/2/1" not in set(first["well"] + "/" + first["fov"])  # the collection's exclude_fovs
    assert set(first["marker"]) == {"SEC61B", "Phase3D"} and set(first["microscope"]) == {"mantis"}
    row = first.iloc[0]
    assert row.cell_id == f"iohub_04_{row.well}/{row.fov}_{row.track_id}_{row.t}"
    assert row.global_track_id == f"iohub_04_{row.well}/{row.fov}_{row.track_id}"
    assert row.hours_post_perturbation == pytest.approx(2.0 + row.t * 30 / 60)
    assert (row.T_shape, row.Z_shape, row.Y_shape, row.X_shape) == (6, 4, 64, 64)
    # Lineages: a daughter track carries its root's global id (the edge-case tracks divide 2 -> 3, 4).
    fov = first[(first.well == "A/1") & (first.fov == "0")]
    for daughter in (3, 4):
        lineage = set(fov.loc[fov.track_id == daughter, "lineage_id"])
        assert lineage == {"iohub_04_A/1/0_2"}
        assert set(fov.loc[fov.track_id == daughter, "parent_track_id"]) == {2}
    assert fov.loc[fov.track_id == 1, "parent_track_id"].isna().all()  # no parent in the CSV: null, as VisCy writes it


def test_cli_builds_the_same_index_and_preprocess_fills_norm_and_focus(built, data, tmp_path):
    root, _ = data
    out = subprocess.run(
        [sys.executable, "-m", "cellfeed.server.cli", "build-cell-index", "collection.yml", "index/cli.parquet", "--data-root", str(root)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert pq.read_table(root / "index/cli.parquet").equals(pq.read_table(root / "index/cells.parquet"))
    out = subprocess.run(
        [sys.executable, "-m", "cellfeed.server.cli", "build-cell-index", "collection.yml", "index/pre.parquet",
         "--data-root", str(root), "--preprocess", "--focus-channel", "Phase3D"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    pre = pq.read_table(root / "index/pre.parquet").to_pandas()
    assert pre["norm_mean"].notna().all() and pre["norm_std"].notna().all()
    assert set(pre.loc[pre.experiment == "iohub_04", "z_focus_mean"]) == {2.25}  # FOV focus_slice of Phase3D
    # Outside the data root: refused, naming the path.
    out = subprocess.run(
        [sys.executable, "-m", "cellfeed.server.cli", "build-cell-index", "collection.yml", "/tmp/elsewhere.parquet", "--data-root", str(root)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "outside" in out.stderr


COMMON = dict(
    z_window=3,
    yx_patch_size=(24, 24),
    final_yx_patch_size=(24, 24),
    val_experiments=["iohub_05"],
    tau_range=(0.5, 1.5),
    batch_size=8,
    num_workers=2,
    return_index=True,
)


def test_cell_index_input_streams_the_same_batches_as_its_collection(built, server):
    from_index = MultiExperimentDataModule(cell_index_path="index/cells.parquet", server=server.flight_uri, **COMMON)
    from_yaml = MultiExperimentDataModule(collection_yaml="collection.yml", server=server.flight_uri, **COMMON)
    from_index.setup("fit")
    from_yaml.setup("fit")
    assert from_index.info["form"] == "cell_index_path"
    a_info, b_info = from_index.info, from_yaml.info
    for a, b in zip(a_info["experiments"], b_info["experiments"], strict=True):
        for key in ("name", "source_channel", "markers", "conditions", "start_hpi", "microscope", "pixel_size_xy_um", "z_range", "rows", "valid_anchors", "fovs"):
            assert a[key] == pytest.approx(b[key]) if isinstance(a[key], float) else a[key] == b[key], key
    assert a_info["splits"] == b_info["splits"]
    for loader in ("train_dataloader", "val_dataloader"):
        pairs = list(zip(epoch(getattr(from_index, loader)()), epoch(getattr(from_yaml, loader)()), strict=True))
        assert pairs
        for a, b in pairs:
            assert bool((a["anchor"] == b["anchor"]).all()) and bool((a["positive"] == b["positive"]).all())
            assert [m["global_track_id"] for m in a["anchor_meta"]] == [m["global_track_id"] for m in b["anchor_meta"]]
    predict = from_index.predict_dataloader()
    rows = [r for b in epoch(predict) for r in b["index"]]
    assert len(rows) == a_info["splits"]["predict"]["items"]
    assert {r["marker"] for r in rows} == {"SEC61B"} and {r["microscope"] for r in rows} == {"mantis", "dragonfly"}
    assert {r["organelle"] for r in rows} == {"endoplasmic_reticulum"} and {r["well"] for r in rows} == {"A/1", "B/2"}
    assert all(r["perturbation"] in ("uninfected", "infected") for r in rows)
    assert np.isfinite([r["hours_post_perturbation"] for r in rows]).all()


def test_a_bad_job_request_or_collection_fails_naming_it(server, data):
    root, _ = data
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        bad = http.post("/v1/jobs", json={"kind": "build-cell-index", "inputs": ["collection.yml"], "options": {"outptu": "x.parquet"}})
        assert bad.status_code == 422 or bad.status_code == 400
    (root / "broken.yml").write_text((root / "collection.yml").read_text().replace("perturbation_wells", "perturbation_well"))
    job = run_job(server.http_url, {"kind": "build-cell-index", "inputs": ["broken.yml"]})
    assert job["state"] == "failed" and "unknown key 'perturbation_well'" in job["files"][0]["message"]


def test_a_cell_index_repeating_a_cell_and_channel_is_refused(built, server, data):
    from cellfeed.client import RequestError
    from cellfeed.client.connection import Connection

    root, _ = data
    table = pq.read_table(root / "index/cells.parquet")
    pq.write_table(pa.concat_tables([table, table.slice(5, 1)]), root / "index/repeated.parquet")
    with pytest.raises(RequestError, match=r"\(cell_id, channel_name\) must be unique; 1 rows repeat one"):
        Connection(server.flight_uri).open_session("dynaclr", {"cell_index_path": "index/repeated.parquet", "z_window": 3, "yx_patch_size": [24, 24]})
