"""OME-Zarr plates (NGFF 0.4 / zarr v2 and 0.5 / zarr v3 sharded) and tracking CSVs on the server."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cellfeed.server.errors import CellfeedError
from cellfeed.server.reading.omezarr import (
    NORM_STATS,
    ImageReader,
    PatchRequest,
    normalization_table,
    open_plate,
)
from cellfeed.server.reading.tracks import find_tracks_csv, read_tracks
from tests.fixtures.plates import T, make_dynaclr_data, read_patch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dynaclr_data(tmp_path_factory.mktemp("dynaclr-reading") / "data")


@pytest.mark.parametrize("name, version, fmt", [("sec61", "0.4", 2), ("tomm20", "0.5", 3)])
def test_plate_metadata(data, name, version, fmt):
    plate = open_plate(data.plate(name), f"{name}.zarr")
    assert plate.version == version
    assert [f.name for f in plate.fovs] == ["A/1/0", "A/1/1", "B/1/0", "B/1/1"]
    assert plate.wells == ["A/1", "B/1"]
    assert all(f.zarr_format == fmt and f.shape == (10, 3, 4, 64, 64) for f in plate.fovs)
    assert plate.fovs[2].well == "B/1"
    expected = ["Phase3D", "GFP", "Mito"] if name == "sec61" else ["RFP", "Phase3D", "StressGranules"]
    assert list(plate.channel_names) == expected


@pytest.mark.parametrize("name, channels", [("sec61", (0, 1)), ("tomm20", (1, 0))])
def test_patches_equal_zarr_python_reads(data, name, channels):
    plate = open_plate(data.plate(name), name)
    reader = ImageReader(cache_pool_bytes=1 << 20)
    requests = [
        PatchRequest(plate.fovs[0], 0, channels, 0, 0, 0),
        PatchRequest(plate.fovs[3], 9, channels, 1, 32, 16),
        PatchRequest(plate.fovs[1], 4, channels, 1, 7, 40),
    ]
    out = reader.read(requests, (3, 24, 24))
    assert out.shape == (3, 2, 3, 24, 24) and out.dtype == np.float32 and out.flags.c_contiguous
    for patch, req in zip(out, requests):
        ref = read_patch(data.plate(name), req.fov.name, req.t, list(channels), (req.z0, req.z0 + 3), req.y0, req.x0, (24, 24))
        np.testing.assert_array_equal(patch, ref)


def test_equal_fov_names_in_two_plates_do_not_collide(data):
    """One reader for both plates: handles are keyed by (plate, FOV), not by FOV name."""
    reader = ImageReader()
    a = open_plate(data.plate("sec61"), "sec61").fovs[0]
    b = open_plate(data.plate("tomm20"), "tomm20").fovs[0]
    assert a.name == b.name == "A/1/0"
    out = reader.read([PatchRequest(a, 0, (0,), 0, 0, 0), PatchRequest(b, 0, (0,), 0, 0, 0)], (1, 8, 8))
    np.testing.assert_array_equal(out[0], read_patch(data.plate("sec61"), "A/1/0", 0, [0], (0, 1), 0, 0, (8, 8)))
    np.testing.assert_array_equal(out[1], read_patch(data.plate("tomm20"), "A/1/0", 0, [0], (0, 1), 0, 0, (8, 8)))
    assert not np.array_equal(out[0], out[1])
    assert reader.array(a) is not reader.array(b)
    assert reader.array(a) is reader.array(open_plate(data.plate("sec61"), "sec61").fovs[0])


def test_one_context_bounds_the_cache_of_every_plate(data):
    reader = ImageReader(cache_pool_bytes=123456)
    for name in ("sec61", "tomm20"):
        store = reader.array(open_plate(data.plate(name), name).fovs[0])
        context = store.spec(retain_context=True).to_json()["context"]
        assert context["cache_pool"] == {"total_bytes_limit": 123456}


def test_normalization_table_holds_each_level(data):
    plate = open_plate(data.plate("tomm20"), "tomm20")
    fov = plate.fovs[1]
    static, per_t = normalization_table(fov, ["Phase3D", "RFP"], T + 2)
    attrs = json.loads((data.plate("tomm20") / "A/1/1/zarr.json").read_text())["attributes"]["normalization"]
    mean = NORM_STATS.index("mean")
    assert static[0, 0, mean] == pytest.approx(attrs["Phase3D"]["dataset_statistics"]["mean"])
    assert static[1, 1, mean] == pytest.approx(attrs["RFP"]["fov_statistics"]["mean"])
    assert per_t[7, 0, NORM_STATS.index("std")] == pytest.approx(attrs["Phase3D"]["timepoint_statistics"]["7"]["std"])
    assert np.isnan(per_t[T:]).all()  # no statistics past the last frame
    assert np.isnan(static[:, :, NORM_STATS.index("otsu_threshold")]).all()  # absent statistic


def test_missing_array_and_non_plate_are_clear_errors(data, tmp_path):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(data.plate("sec61"), broken)
    shutil.rmtree(broken / "B/1/1/0")
    with pytest.raises(CellfeedError, match=r"broken.zarr/B/1/1: no image array '0'"):
        open_plate(broken, "broken.zarr")
    with pytest.raises(CellfeedError, match=r"sec61.zarr/A/1: not an HCS OME-Zarr plate"):
        open_plate(data.plate("sec61") / "A/1", "sec61.zarr/A/1")
    with pytest.raises(CellfeedError, match=r"nothing.zarr: does not exist"):
        open_plate(tmp_path / "nothing.zarr", "nothing.zarr")


def test_tracks_csv_columns(data, tmp_path):
    csv = find_tracks_csv(data.tracks("sec61"), "A/1/0")
    assert csv is not None and csv.name == "tracks.csv"
    table = read_tracks(csv, "sec61_tracks/A/1/0/tracks.csv")
    assert set(table) == {"track_id", "t", "id", "parent_track_id", "parent_id", "z", "y", "x"}
    assert table["track_id"].dtype == np.int64 and table["y"].dtype == np.float64
    divided = table["track_id"] == 3
    assert (table["parent_track_id"][divided] == 2).all()
    assert np.isnan(table["parent_track_id"][table["track_id"] == 1]).all()
    assert find_tracks_csv(data.tracks("sec61"), "C/9/0") is None

    minimal = tmp_path / "minimal.csv"
    minimal.write_text("track_id,t,y,x\n1,0,5.5,6.5\n1,1,6.0,7.0\n")
    table = read_tracks(minimal, "minimal.csv")
    assert (table["id"] == -1).all() and np.isnan(table["parent_track_id"]).all()

    bad = tmp_path / "bad.csv"
    bad.write_text("track_id,t,y\n1,0,5.5\n")
    with pytest.raises(CellfeedError, match=r"bad.csv: missing column\(s\) x"):
        read_tracks(bad, "bad.csv")
