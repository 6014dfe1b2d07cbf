"""VisCy main's geometry on iohub plates through a real server: Z windows centred on each plate's
focus_slice (z_window, z_extraction_window, z_focus_offset, focus_channel), the MIP for 2D models
in train and predict, max_border_shift dropping border cells, and pixel-size rescaling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cellfeed.client import MultiExperimentDataModule
from tests.fixtures.dynaclr_main import FOCUS, server, write_main_data  # noqa: F401 (server: a fixture)
from tests.fixtures.ecosystem_plates import IohubPlate
from tests.fixtures.plates import expected_origin
from tests.helpers import epoch

PATCH = (24, 24)
Z_TOTAL = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root, legacy = write_main_data(tmp_path_factory.mktemp("dynaclr-main-geometry") / "data", exclude=None)
    doc = yaml.safe_load((root / "collection.yml").read_text())
    doc["experiments"][1]["pixel_size_xy_um"] = 0.2988  # twice the reference: read half as many pixels, upsampled
    (root / "rescaled.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root, legacy




def _dm(server, **kwargs) -> MultiExperimentDataModule:
    options = dict(
        collection_yaml="collection.yml",
        z_window=1,
        z_extraction_window=3,
        yx_patch_size=PATCH,
        final_yx_patch_size=PATCH,
        val_experiments=["iohub_05"],
        tau_range=(0.5, 1.5),
        batch_size=8,
        num_workers=2,
        return_index=True,
        server=server.flight_uri,
    )
    options.update(kwargs)
    dm = MultiExperimentDataModule(**options)
    dm.setup("fit")
    return dm


def _window(focus: float, extract: int, offset: float) -> tuple[int, int]:
    """VisCy main's rule (ExperimentRegistry): centre round(focus), int(extract * offset) below."""
    z0 = max(0, int(round(focus)) - int(extract * offset))
    z1 = min(Z_TOTAL, z0 + extract)
    return max(0, z1 - extract), z1


@pytest.mark.parametrize("focus_channel, offset", [(None, 0.5), ("Phase3D", 0.5), ("Phase3D", 0.0), ("GFP", 1.0)])
def test_z_windows_follow_each_plates_focus_slice(server, data, focus_channel, offset):
    root, _ = data
    dm = _dm(server, focus_channel=focus_channel, z_focus_offset=offset)
    channel = focus_channel or "GFP"  # default: each experiment's first channel
    windows = {e["name"]: tuple(e["z_range"]) for e in dm.info["experiments"]}
    for name in ("iohub_04", "iohub_05"):
        assert windows[name] == _window(FOCUS[name][channel], 3, offset)
    for split, name in (("train", "iohub_04"), ("val", "iohub_05")):
        reference = IohubPlate(root / f"{name}.zarr")
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        try:
            for batch in epoch(loader)[:2]:
                assert batch["anchor"].shape[1:] == (2, 3, *PATCH)
                for i, row in enumerate(batch["index"]):
                    y0, x0 = expected_origin(row["y"], row["x"], PATCH)
                    expected = reference.patch(row["fov_name"], row["t"], ["GFP", "Phase3D"], windows[name], y0, x0, PATCH)
                    np.testing.assert_array_equal(batch["anchor"][i].numpy(), expected)
        finally:
            reference.close()


def test_mip_reduces_the_extraction_window_in_train_and_predict(server, data):
    root, _ = data
    dm = _dm(server, z_reduction="mip", channel_dropout_prob=0.0)
    window = tuple(dm.info["experiments"][0]["z_range"])
    reference = IohubPlate(root / "iohub_04.zarr")

    class Trainer:
        training, predicting = True, False

    try:
        raw = next(iter(dm.train_dataloader()))
        rows = raw["index"]
        dm.trainer = Trainer()  # the hook as Lightning calls it while training
        out = dm.on_after_batch_transfer(raw, 0)
        assert out["anchor"].shape[1:] == (2, 1, *PATCH) and out["positive"].shape[1:] == (2, 1, *PATCH)
        for i, row in enumerate(rows):
            y0, x0 = expected_origin(row["y"], row["x"], PATCH)
            full = reference.patch(row["fov_name"], row["t"], ["GFP", "Phase3D"], window, y0, x0, PATCH)
            np.testing.assert_array_equal(out["anchor"][i].numpy(), full.max(axis=1, keepdims=True))
        Trainer.training, Trainer.predicting = False, True
        predicted = dm.on_after_batch_transfer(next(iter(dm.predict_dataloader())), 0)
        assert predicted["anchor"].shape[1:] == (2, 1, *PATCH)
    finally:
        dm.trainer = None
        reference.close()


def _rows_in_csvs(root, legacy) -> int:
    n = 0
    for e in legacy:
        for csv in sorted((root / e["tracks_path"]).rglob("*.csv")):
            frame = pd.read_csv(csv)
            n += int(((frame.y >= 0) & (frame.y < 64) & (frame.x >= 0) & (frame.x < 64) & (frame.t < 6)).sum())
    return n


def _fits(frame: pd.DataFrame, shift: int) -> pd.Series:
    keep = pd.Series(True, index=frame.index)
    for c in ("y", "x"):
        start = np.floor(frame[c]).astype(int) - PATCH[0] // 2
        keep &= (np.clip(start, 0, 64 - PATCH[0]) - start).abs() <= shift
    return keep


@pytest.mark.parametrize("shift", [0, 3, -1])
def test_max_border_shift_drops_cells_too_close_to_the_border(server, data, shift):
    root, legacy = data
    dm = _dm(server, max_border_shift=shift, z_window=3, z_extraction_window=None, split_ratio=1.0, val_experiments=[])
    limit = max(PATCH) // 4 if shift < 0 else shift
    expected = 0
    for e in legacy:
        for csv in sorted((root / e["tracks_path"]).rglob("*.csv")):
            f = pd.read_csv(csv)
            f = f[(f.y >= 0) & (f.y < 64) & (f.x >= 0) & (f.x < 64) & (f.t < 6)]
            expected += int(_fits(f, limit).sum())
    assert sum(e["rows"] for e in dm.info["experiments"]) == expected < _rows_in_csvs(root, legacy)
    for b in epoch(dm.predict_dataloader()):
        for row in b["index"]:
            y0, x0 = expected_origin(row["y"], row["x"], PATCH)
            start_y, start_x = int(np.floor(row["y"])) - 12, int(np.floor(row["x"])) - 12
            assert abs(y0 - start_y) <= limit and abs(x0 - start_x) <= limit


def test_the_experiments_yaml_form_still_clamps_every_border_cell(server, data):
    root, legacy = data
    dm = MultiExperimentDataModule("experiments.yml", z_range=(0, 3), yx_patch_size=PATCH, final_yx_patch_size=PATCH,
                                   batch_size=8, server=server.flight_uri)
    dm.setup("fit")
    assert sum(e["rows"] for e in dm.info["experiments"]) == _rows_in_csvs(root, legacy)


def _nearest_exact(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch's nearest-exact, the reference for the server's resampling."""
    t = torch.from_numpy(np.ascontiguousarray(image))[None]
    return torch.nn.functional.interpolate(t, size=(image.shape[1], *size), mode="nearest-exact")[0].numpy()


def test_pixel_sizes_are_rescaled_to_the_reference(server, data):
    root, _ = data
    dm = _dm(server, collection_yaml="rescaled.yml", z_window=3, z_extraction_window=None, reference_pixel_size_xy_um=0.1494)
    by_name = {e["name"]: e for e in dm.info["experiments"]}
    assert by_name["iohub_04"]["native_patch_zyx"] == [3, 24, 24]
    assert by_name["iohub_05"]["native_patch_zyx"] == [3, 12, 12] and by_name["iohub_05"]["scale_zyx"][1] == pytest.approx(0.5)
    reference = IohubPlate(root / "iohub_05.zarr")
    window = tuple(by_name["iohub_05"]["z_range"])
    try:
        batch = epoch(dm.val_dataloader())[0]
        assert batch["anchor"].shape[1:] == (2, 3, *PATCH)
        for i, row in enumerate(batch["index"]):
            y0, x0 = expected_origin(row["y"], row["x"], (12, 12))
            native = reference.patch(row["fov_name"], row["t"], ["GFP", "Phase3D"], window, y0, x0, (12, 12))
            np.testing.assert_array_equal(batch["anchor"][i].numpy(), _nearest_exact(native, PATCH))
    finally:
        reference.close()
    with pytest.raises(Exception, match="has no pixel_size_z_um|reference_pixel_size_z_um"):
        doc = yaml.safe_load((root / "rescaled.yml").read_text())
        doc["experiments"][0].pop("pixel_size_z_um")
        (root / "no_z.yml").write_text(yaml.safe_dump(doc))
        _dm(server, collection_yaml="no_z.yml", z_window=3, z_extraction_window=None, reference_pixel_size_z_um=0.174)


def test_z_pixel_size_rescales_the_z_window(server, data):
    root, _ = data
    # 0.174 um slices against a 0.348 um reference: 2 output slices read as 4 native ones, then resampled.
    dm = _dm(server, z_window=2, z_extraction_window=None, reference_pixel_size_z_um=0.348, val_experiments=["iohub_05"])
    exp = dm.info["experiments"][1]
    assert exp["native_patch_zyx"] == [4, 24, 24] and exp["z_range"] == [0, 4]
    reference = IohubPlate(root / "iohub_05.zarr")
    try:
        batch = epoch(dm.val_dataloader())[0]
        assert batch["anchor"].shape[1:] == (2, 2, *PATCH)
        for i, row in enumerate(batch["index"]):
            y0, x0 = expected_origin(row["y"], row["x"], PATCH)
            native = reference.patch(row["fov_name"], row["t"], ["GFP", "Phase3D"], (0, 4), y0, x0, PATCH)
            np.testing.assert_array_equal(batch["anchor"][i].numpy(), native[:, [1, 3]])  # nearest-exact 4 -> 2
    finally:
        reference.close()
