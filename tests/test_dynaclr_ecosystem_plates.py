"""Plates written by iohub and ome-zarr-py, served by a real `cellfeed serve` on loopback.

One test per writer (iohub NGFF 0.4, iohub 0.5 unsharded, iohub 0.5 sharded, ome-zarr-py 0.4 and
0.5): every patch a training epoch streams, anchor and positive, equals the pixels iohub reads
back at that sample's FOV, frame and centroid. Then the plates cellfeed must refuse, each with a
message that names the plate, the field and what was expected.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellfeed.client import MultiExperimentDataModule, RequestError
from cellfeed.client.connection import Connection
from cellfeed.server.errors import CellfeedError
from cellfeed.server.reading.omezarr import NORM_STATS, open_plate
from tests.fixtures.ecosystem_plates import WRITERS, SOURCE, IohubPlate, make_ecosystem_data
from tests.fixtures.plates import expected_origin

PATCH = (24, 24)
Z_RANGE = (1, 4)


def _fov_meta(plate: Path, fov: str) -> dict:
    """The FOV group's attributes as the writer left them on disk."""
    if (plate / fov / "zarr.json").is_file():
        return json.loads((plate / fov / "zarr.json").read_text())["attributes"]
    return json.loads((plate / fov / ".zattrs").read_text())


def _array_meta(plate: Path, fov: str, array: str) -> dict:
    folder = plate / fov / array
    return json.loads(((folder / "zarr.json") if (folder / "zarr.json").is_file() else (folder / ".zarray")).read_text())


def _check_writer_on_disk(writer: str, plate: Path) -> None:
    """The writer really produced the format under test (so each test covers what it names)."""
    attrs = _fov_meta(plate, "A/1/0")
    ome = attrs.get("ome", attrs)
    axes = [a["name"] for a in ome["multiscales"][0]["axes"]]
    array = ome["multiscales"][0]["datasets"][0]["path"]
    meta = _array_meta(plate, "A/1/0", array)
    if writer.startswith("iohub"):
        assert axes == ["T", "C", "Z", "Y", "X"] and array == "0"  # upper case: what was refused before
    else:
        assert axes == ["t", "c", "z", "y", "x"] and array == "s0"  # level 0 is not named "0"
    assert meta["zarr_format"] == (2 if writer.endswith("0.4") else 3)
    codecs = [c["name"] for c in meta.get("codecs", [])]
    assert ("sharding_indexed" in codecs) == writer.endswith("sharded")
    if writer == "iohub-0.5":
        assert meta["data_type"] == "uint16"


@pytest.mark.parametrize("writer", WRITERS)
def test_streamed_patches_equal_iohub_reads(serve, tmp_path, writer):
    data = make_ecosystem_data(tmp_path / "data", (writer,))
    name = data.entries[0]["name"]
    plate_path = data.plate(name)
    _check_writer_on_disk(writer, plate_path)
    server = serve(data.root)
    dm = MultiExperimentDataModule(
        "experiments.yml",
        z_range=Z_RANGE,
        yx_patch_size=PATCH,
        final_yx_patch_size=PATCH,
        val_experiments=[],
        tau_range=(0.5, 1.5),
        batch_size=8,
        num_workers=2,
        condition_balanced=False,  # unweighted: an epoch is a permutation of the anchors
        return_index=True,
        server=server.flight_uri,
    )
    dm.setup("fit")
    reference = IohubPlate(plate_path)
    tracks = {fov: pd.read_csv(data.tracks(name) / fov / "tracks.csv") for fov in ("A/1/0", "A/1/1", "B/2/0", "B/2/1")}
    seen, fovs = set(), set()
    try:
        for batch in dm.train_dataloader():
            anchor, positive = batch["anchor"].numpy(), batch["positive"].numpy()
            assert anchor.shape[1:] == (len(SOURCE), Z_RANGE[1] - Z_RANGE[0], *PATCH)
            norm = batch["anchor_norm_meta"].numpy()  # [B, C, levels, stats], before the device hook
            for i, (row, pad) in enumerate(zip(batch["index"], batch["padding"].tolist())):
                if pad:
                    continue
                fov, t = row["fov_name"], row["t"]
                y0, x0 = expected_origin(row["y"], row["x"], PATCH)
                np.testing.assert_array_equal(anchor[i], reference.patch(fov, t, SOURCE, Z_RANGE, y0, x0, PATCH))
                track, pt = int(batch["positive_index"]["track_id"][i]), int(batch["positive_index"]["t"][i])
                frame = tracks[fov]
                match = frame[(frame.track_id == track) & (frame.t == pt)].iloc[0]
                y0, x0 = expected_origin(match.y, match.x, PATCH)
                np.testing.assert_array_equal(positive[i], reference.patch(fov, pt, SOURCE, Z_RANGE, y0, x0, PATCH))
                stats = reference.plate[fov].zattrs["normalization"]
                for c, channel in enumerate(SOURCE):
                    assert norm[i, c, 1, NORM_STATS.index("mean")] == pytest.approx(stats[channel]["fov_statistics"]["mean"])
                seen.add((fov, row["track_id"], t))
                fovs.add(fov)
    finally:
        reference.close()
    assert len(seen) == dm.info["splits"]["train"]["items"] > 0  # every anchor of the epoch compared
    assert fovs == set(tracks)


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    """An iohub 0.4 and an iohub 0.5 plate, to be copied and broken by the tests below."""
    return make_ecosystem_data(tmp_path_factory.mktemp("ecosystem-broken") / "data", ("iohub-0.4", "iohub-0.5"))


def _copy(plates, name: str, tmp_path: Path) -> Path:
    out = tmp_path / f"{name}.zarr"
    shutil.copytree(plates.plate(name), out)
    return out


def _edit(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _chunks(array_dir: Path) -> list[Path]:
    return [p for p in array_dir.rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs")]


@pytest.mark.parametrize("name", ["iohub_04", "iohub_05"])
def test_a_fov_whose_chunks_are_gone_is_refused_not_served_as_zeros(plates, tmp_path, name):
    plate = _copy(plates, name, tmp_path)
    chunks = _chunks(plate / "B/2/1/0")
    assert chunks
    for chunk in chunks:
        chunk.unlink()
    with pytest.raises(CellfeedError, match=rf"{name}.zarr/B/2/1/0: no chunk files under 0/ \(the array's data is missing"):
        open_plate(plate, f"{name}.zarr")
    # One chunk left is enough: writers skip chunks that hold only the fill value.
    shutil.copytree(plates.plate(name) / "B/2/1/0", plate / "B/2/1/0", dirs_exist_ok=True)
    _chunks(plate / "B/2/1/0")[0].unlink()
    assert len(open_plate(plate, f"{name}.zarr").fovs) == 4


def test_session_on_a_plate_without_chunks_is_refused_by_the_server(serve, plates, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(plates.root, root)
    for chunk in _chunks(root / "iohub_05.zarr/A/1/0/0"):
        chunk.unlink()
    server = serve(root)
    conn = Connection(server.flight_uri)
    with pytest.raises(RequestError, match=r"iohub_05.zarr/A/1/0/0: no chunk files"):
        conn.open_session("dynaclr", {"experiments_yaml": "experiments.yml", "z_range": [0, 3], "yx_patch_size": [24, 24]})


def _axes_of(doc: dict) -> list:
    return doc.get("ome", doc)["multiscales"][0]["axes"]


def test_unsupported_metadata_is_refused_naming_plate_field_and_expectation(plates, tmp_path):
    plate = _copy(plates, "iohub_04", tmp_path)
    fov = plate / "A/1/1/.zattrs"

    def refused(path: Path, change, pattern: str) -> None:
        original = path.read_text()
        _edit(path, change)
        try:
            with pytest.raises(CellfeedError, match=pattern):
                open_plate(plate, "iohub_04.zarr")
        finally:
            path.write_text(original)

    refused(fov, lambda d: _axes_of(d).__setitem__(2, {"name": "angle", "type": "angle"}),
            r"iohub_04.zarr/A/1/1: multiscales\[0\].axes\[2\] is .*angle.*expected name t, c, z, y or x")
    refused(fov, lambda d: _axes_of(d).__setitem__(2, {"name": "depth", "type": "space"}),
            r"iohub_04.zarr/A/1/1: multiscales\[0\].axes\[2\] .*depth.*expected name z, y or x")
    refused(fov, lambda d: _axes_of(d).reverse(),
            r"iohub_04.zarr/A/1/1: multiscales\[0\].axes are in the order XYZCT, expected TCZYX order")
    refused(fov, lambda d: d["multiscales"][0]["datasets"].__setitem__(0, {"path": "../../B/2/0/0"}),
            r"iohub_04.zarr/A/1/1: multiscales\[0\].datasets\[0\].path is '../../B/2/0/0', expected a path inside the plate")
    refused(fov, lambda d: d["multiscales"][0]["datasets"].__setitem__(0, {"path": "full"}),
            r"iohub_04.zarr/A/1/1: no image array 'full' \(the path in multiscales\[0\].datasets\[0\]")
    refused(fov, lambda d: d.pop("omero"),
            r"iohub_04.zarr/A/1/1: no omero.channels metadata \(the channel names are read from omero.channels\[\].label\)")
    refused(fov, lambda d: d["omero"]["channels"].pop(),
            r"iohub_04.zarr/A/1/1: omero.channels lists 2 channels but the array has 3")
    refused(plate / ".zattrs", lambda d: d["plate"].__setitem__("version", "0.6"),
            r"iohub_04.zarr: NGFF version '0.6' is not supported \(expected one of 0.1, 0.2, 0.3, 0.4, 0.5\)")
    refused(plate / "A/1/1/0/.zarray", lambda d: d.__setitem__("compressor", {"id": "lzma"}),
            r"iohub_04.zarr/A/1/1/0: cannot be read as a zarr v2 array")
    refused(plate / "A/1/1/0/.zarray", lambda d: d.update(dtype="|S4", fill_value=None),
            r"iohub_04.zarr/A/1/1/0: data type .* is not supported \(expected bool, integer or floating point\)")
    assert len(open_plate(plate, "iohub_04.zarr").fovs) == 4  # every edit undone: the plate opens


def test_an_image_without_t_c_or_z_axes_reads_them_as_length_one(plates, tmp_path):
    """NGFF allows YX or CZYX images; cellfeed reads them as TCZYX with length-1 axes."""
    from cellfeed.server.reading.omezarr import ImageReader, PatchRequest
    from iohub.ngff import open_ome_zarr

    path = tmp_path / "czyx.zarr"
    image = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    from iohub.ngff.models import ChannelAxisMeta, SpaceAxisMeta

    axes = [ChannelAxisMeta(name="C"), *(SpaceAxisMeta(name=n, unit="micrometer") for n in "ZYX")]
    with open_ome_zarr(path, layout="hcs", mode="w", channel_names=["a", "b"], axes=axes) as plate:
        plate.create_position("A", "1", "0").create_image("0", image)
    fov = open_plate(path, "czyx.zarr").fovs[0]
    assert fov.axes == ("c", "z", "y", "x") and fov.shape == (1, 2, 3, 16, 16)
    out = ImageReader().read([PatchRequest(fov, 0, (1, 0), 1, 2, 3)], (2, 8, 8))
    np.testing.assert_array_equal(out[0], image[[1, 0], 1:3, 2:10, 3:11])
