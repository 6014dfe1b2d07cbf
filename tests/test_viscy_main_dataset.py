"""Port of VisCy main's `applications/dynaclr/tests/test_dataset.py` (mehta-lab/VisCy, branch main,
commit 4b62365c0df25929bffc7f01b3bb2d1c11d69cce): MultiExperimentTripletDataset in the collection
form (batches, channel remapping, predict mode, `channels_per_sample`, mixed channel counts, patch
rescaling, self positives, timepoint statistics).

VisCy's `__getitems__` is a streamed batch from a real `cellfeed serve` on loopback over iohub
plates; patches are compared with iohub's reads pixel for pixel. `_rescale_patch` is the server's
`nearest_exact` (the same torch `nearest-exact` rule, done before the wire).
"""

from __future__ import annotations

import numpy as np
import pytest

from cellfeed.client import RequestError
from cellfeed.server.kinds.dynaclr.geometry import nearest_exact
from tests.fixtures.ecosystem_plates import IohubPlate
from tests.fixtures.plates import expected_origin
from tests.fixtures.viscy_main_ports import main_entry, main_ported_server
from tests.fixtures.viscy_ports import standard_tracks

TAU = (0.5, 2.0)
PATCH = (32, 32)


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with main_ported_server(tmp_path_factory, "viscy-main-dataset") as p:
        yield p


def _channels(*names: str) -> list[dict]:
    return [{"name": n, "marker": n} for n in names]


@pytest.fixture(scope="module")
def single(ported):
    """exp_a: Phase, GFP; one well, 5 tracks x 10 frames; random pixels."""
    return [main_entry(ported.folder("single"), "exp_a", ["Phase", "GFP"], ["A/1"], {"control": ["A/1"]},
                       channels=_channels("Phase", "GFP"), seed=42)]


@pytest.fixture(scope="module")
def two(ported):
    """exp_a (Phase, GFP) and exp_b (Mito first on the plate, read as Phase, Mito)."""
    folder = ported.folder("two")
    a = main_entry(folder, "exp_a", ["Phase", "GFP"], ["A/1"], {"control": ["A/1"]}, channels=_channels("Phase", "GFP"), seed=1)
    b = main_entry(folder, "exp_b", ["Mito", "Phase"], ["A/1"], {"treated": ["A/1"]}, channels=_channels("Phase", "Mito"),
                   interval_minutes=15.0, seed=2)
    return [a, b]


def _batches(ported, entries, split: str = "fit", **kw):
    kw.setdefault("tau_range", TAU)
    kw.setdefault("return_index", True)
    kw.setdefault("stratify_by", None)
    dm = ported.datamodule(entries, **kw)
    dm.setup(split)
    loader = dm.train_dataloader() if split == "fit" else dm.predict_dataloader()
    return dm, list(loader)


def _check_pixels(entries, batch, key: str = "anchor", channels=None) -> None:
    """Each sample equals iohub's read of its channels at its frame and (clamped) centroid."""
    by_name = {e["name"]: e for e in entries}
    plates = {n: IohubPlate(e["data_path"]) for n, e in by_name.items()}
    try:
        for i, row in enumerate(batch["index"]):
            if batch["padding"][i]:
                continue
            entry = by_name[row["experiment"]]
            names = channels[i] if channels is not None else [c["name"] for c in entry["channels"]]
            t = row["t"] if key == "anchor" else int(batch["positive_index"]["t"][i])
            y0, x0 = expected_origin(row["y"], row["x"], PATCH)
            want = plates[row["experiment"]].patch(row["fov_name"], t, names, (0, 1), y0, x0, PATCH)
            np.testing.assert_array_equal(batch[key][i].numpy(), want)
    finally:
        for plate in plates.values():
            plate.close()


def test_getitems_returns_anchor_positive_keys(ported, single):
    _, batches = _batches(ported, single, batch_size=2)
    batch = batches[0]
    assert batch["anchor"].shape == batch["positive"].shape == (2, 2, 1, 32, 32)
    _check_pixels(single, batch)
    _check_pixels(single, batch, key="positive")


def test_getitems_returns_norm_meta(ported, single):
    # VisCy: a list of per-sample dicts; cellfeed: one [B, C, levels, stats] tensor, VisCy's
    # collated dict after the device hook (documented difference, as in the app-dynaclr port).
    dm, batches = _batches(ported, single, batch_size=1)
    meta = dm.decoder.norm_meta(batches[0]["anchor_norm_meta"])
    assert set(meta) == {"Phase", "GFP"}  # main's keys: the markers
    assert meta["GFP"]["fov_statistics"]["mean"].shape == (1,)


def test_channel_remapping(ported, two):
    _, batches = _batches(ported, two, batch_size=16)
    assert {r["experiment"] for b in batches for r in b["index"]} == {"exp_a", "exp_b"}
    for batch in batches:
        assert batch["anchor"].shape[1:] == (2, 1, 32, 32)
        _check_pixels(two, batch)  # exp_b: Phase is plate channel 1


def test_predict_mode_returns_index(ported, single):
    _, batches = _batches(ported, single, split="predict", batch_size=2)
    batch = batches[0]
    assert "anchor" in batch and "positive" not in batch
    assert isinstance(batch["index"], list) and len(batch["index"]) == 2
    assert all("fov_name" in r and "id" in r for r in batch["index"])
    _check_pixels(single, batch)


def test_single_random_channel_shape(ported, single):
    _, batches = _batches(ported, single, batch_size=2, channels_per_sample=1)
    assert batches[0]["anchor"].shape == batches[0]["positive"].shape == (2, 1, 1, 32, 32)


def test_from_index_channel_deterministic(ported, single):
    # The item's channel is its marker in anchor_meta (VisCy: the row's channel_name); the patch
    # is that channel and the positive reads the same one.
    _, batches = _batches(ported, single, batch_size=8, channels_per_sample=1)
    for batch in batches:
        names = [[m["marker"]] for m in batch["anchor_meta"]]
        assert [m["marker"] for m in batch["positive_meta"]] == [n[0] for n in names]
        _check_pixels(single, batch, channels=names)
        _check_pixels(single, batch, key="positive", channels=names)


def test_all_channels_default(ported, single):
    _, batches = _batches(ported, single, batch_size=1, channels_per_sample=None)
    assert batches[0]["anchor"].shape[1] == 2


def test_fixed_channels_by_name(ported, single):
    _, batches = _batches(ported, single, batch_size=2, channels_per_sample=["Phase"])
    assert batches[0]["anchor"].shape[1] == 1
    _check_pixels(single, batches[0], channels=[["Phase"]] * 2)


def test_invalid_channel_name_raises_at_read(ported, single):
    # VisCy raises at the first read; cellfeed refuses the session, naming the channel.
    with pytest.raises(RequestError, match="nonexistent_channel"):
        _batches(ported, single, channels_per_sample=["nonexistent_channel"])


def test_int_gt1_raises(ported, single):
    with pytest.raises((RequestError, ValueError), match="channels_per_sample"):
        _batches(ported, single, channels_per_sample=2)


def test_raises_when_experiments_have_different_channel_counts(ported):
    # VisCy raises at read time ("different channel counts"); cellfeed refuses the session.
    folder = ported.folder("mixed-count")
    a = main_entry(folder, "exp_a", ["Phase", "GFP"], ["A/1"], {"c": ["A/1"]}, channels=_channels("Phase", "GFP"))
    b = main_entry(folder, "exp_b", ["Phase"], ["A/1"], {"c": ["A/1"]}, channels=_channels("Phase"))
    with pytest.raises(RequestError, match="same number of source channels"):
        ported.info([a, b], tau_range=TAU)


def test_len_matches_valid_anchors(ported, single):
    dm = ported.datamodule(single, tau_range=TAU, stratify_by=None)
    dm.setup("fit")
    n = dm.info["splits"]["train"]["items"]
    assert n == dm.info["experiments"][0]["valid_anchors"] == 5 * 9  # t = 0..8: some of tau 1..4 frames later exists
    assert len(dm.train_dataloader()) == -(-n // 8)


def test_rescale_identity():
    patch = np.random.default_rng(0).standard_normal((1, 2, 10, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(nearest_exact(patch, (10, 32, 32)), patch)


def test_rescale_down_then_up():
    small = np.random.default_rng(0).standard_normal((1, 1, 5, 16, 16)).astype(np.float32)
    out = nearest_exact(small, (10, 32, 32))
    assert out.shape == (1, 1, 10, 32, 32)
    np.testing.assert_array_equal(out[:, :, ::2, ::2, ::2], small)  # each source pixel, twice per axis


def test_rescale_non_unity_changes_shape():
    assert nearest_exact(np.zeros((1, 1, 8, 24, 24), np.float32), (16, 48, 48)).shape == (1, 1, 16, 48, 48)


def test_self_positive_same_values(ported, single):
    _, batches = _batches(ported, single, batch_size=2, positive_cell_source="self")
    assert batches[0]["anchor"].shape == batches[0]["positive"].shape


def test_self_positive_all_tracks_are_valid_anchors(ported):
    entry = main_entry(ported.folder("self"), "self_exp", ["Phase"], ["A/1"], {"control": ["A/1"]}, channels=_channels("Phase"))
    info = ported.info([entry], tau_range=TAU, positive_cell_source="self")
    assert info["splits"]["train"]["items"] == info["experiments"][0]["rows"] == 50


def test_self_positive_pixel_values_identical(ported, single):
    _, batches = _batches(ported, single, batch_size=4, positive_cell_source="self")
    for batch in batches:
        assert bool((batch["anchor"] == batch["positive"]).all())


def test_norm_meta_matches_sample_timepoint(ported):
    from iohub.ngff import open_ome_zarr

    n_t = 5
    entry = main_entry(ported.folder("tp"), "tp_test", ["Phase", "GFP"], ["A/1"], {"ctrl": ["A/1"]},
                       channels=_channels("Phase", "GFP"), n_t=n_t, tracks=standard_tracks(n_tracks=2, n_t=n_t), seed=0)
    with open_ome_zarr(entry["data_path"], mode="r+") as plate:
        for _, position in plate.positions():
            position.zattrs["normalization"] = {
                ch: {"fov_statistics": {"mean": 0.0, "std": 1.0},
                     "timepoint_statistics": {str(t): {"mean": float(t * 100), "std": 1.0} for t in range(n_t)}}
                for ch in ("Phase", "GFP")
            }
    dm, batches = _batches(ported, [entry], batch_size=4, tau_range=(0.5, 4.0), positive_cell_source="self", channels_per_sample=1)
    seen = set()
    for batch in batches:
        meta = dm.decoder.norm_meta(batch["anchor_norm_meta"])
        means = meta["channel_0"]["timepoint_statistics"]["mean"]  # bag of channels: key channel_0
        for i, row in enumerate(batch["index"]):
            assert means[i].item() == float(row["t"] * 100)
            seen.add(row["t"])
    assert {0, 2, 4} <= seen
