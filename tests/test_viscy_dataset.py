"""Port of VisCy's `applications/dynaclr/tests/test_dataset.py` (mehta-lab/VisCy, branch app-dynaclr,
commit 0d04b3504d6c621191e88a98ab0de7e6baa7e8e0): MultiExperimentTripletDataset (batched reads,
lineage-aware positives, channel remapping, predict index, length).

VisCy's dataset lives in the training process; cellfeed's is the server. Here the batches are the
ones a real server on loopback streams (train with `return_index=True`, predict), and every
patch is compared with iohub's read of the same plate at the sample's FOV, frame and centroid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.fixtures.ecosystem_plates import IohubPlate
from tests.fixtures.plates import expected_origin
from tests.fixtures.viscy_ports import batch_frame, make_experiment, ported_server, standard_tracks

PATCH = (32, 32)
TAU = (0.5, 2.0)


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with ported_server(tmp_path_factory, "viscy-dataset") as p:
        yield p


@pytest.fixture(scope="module")
def single(ported):
    """One experiment, 5 tracks x 10 frames, random pixels."""
    return [make_experiment(ported.folder("single"), "exp_a", ["Phase", "GFP"], ["A/1"], {"control": ["A/1"]},
                            tracks=standard_tracks(y=30.0, x=35.0), seed=42)]


@pytest.fixture(scope="module")
def two(ported):
    """Two experiments with different channels (and intervals)."""
    folder = ported.folder("two")
    return [
        make_experiment(folder, "exp_a", ["Phase", "GFP"], ["A/1"], {"control": ["A/1"]}, seed=1),
        make_experiment(folder, "exp_b", ["Mito", "Phase"], ["A/1"], {"treated": ["A/1"]}, source_channel=["Phase", "Mito"],
                        interval_minutes=15.0, seed=2),
    ]


@pytest.fixture(scope="module")
def division(ported):
    """Track 0 divides into tracks 1 and 2 (parent_map {1: 0, 2: 0})."""
    return [make_experiment(ported.folder("division"), "exp_a", ["Phase", "GFP"], ["A/1"], {"control": ["A/1"]},
                            tracks=standard_tracks(n_tracks=3, parent_map={1: 0, 2: 0}), seed=3)]


def _train(ported, entries, epochs=(0,), **kw):
    kw.setdefault("condition_balanced", False)
    return ported.train_batches(entries, epochs=epochs, tau_range=TAU, yx_patch_size=PATCH, **kw)


def _check_pixels(entries, batch) -> None:
    """Anchors and positives equal iohub's reads at their own frame and centroid."""
    by_name = {e["name"]: e for e in entries}
    plates = {name: IohubPlate(e["data_path"]) for name, e in by_name.items()}
    try:
        for i, row in enumerate(batch["index"]):
            if batch["padding"][i]:
                continue
            entry, plate = by_name[row["experiment"]], plates[row["experiment"]]
            y0, x0 = expected_origin(row["y"], row["x"], PATCH)
            want = plate.patch(row["fov_name"], row["t"], entry["source_channel"], (0, 1), y0, x0, PATCH)
            np.testing.assert_array_equal(batch["anchor"][i].numpy(), want)
            if "positive_index" in batch:
                pt = int(batch["positive_index"]["t"][i])
                want = plate.patch(row["fov_name"], pt, entry["source_channel"], (0, 1), y0, x0, PATCH)  # tracks do not move
                np.testing.assert_array_equal(batch["positive"][i].numpy(), want)
    finally:
        for plate in plates.values():
            plate.close()


def test_getitems_returns_anchor_positive_keys(ported, single):
    batch = _train(ported, single, batch_size=2)[0]
    assert batch["anchor"].shape == batch["positive"].shape == (2, 2, 1, 32, 32)
    _check_pixels(single, batch)


def test_getitems_returns_norm_meta(ported, single):
    # VisCy: a list of per-sample dicts; cellfeed: one [B, C, levels, stats] tensor, turned into
    # VisCy's collated {ch_i: {level: {stat: [B]}}} on the device (on_after_batch_transfer).
    dm = ported.datamodule(single, tau_range=TAU, yx_patch_size=PATCH, batch_size=1, return_index=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["anchor_norm_meta"].shape[:2] == (1, 2)
    levels, stats = dm.info["norm_levels"], dm.info["norm_stats"]
    plate = IohubPlate(single[0]["data_path"])
    try:
        want = plate.plate[batch["index"][0]["fov_name"]].zattrs["normalization"]["GFP"]["fov_statistics"]["mean"]
    finally:
        plate.close()
    meta = dm.decoder.norm_meta(batch["anchor_norm_meta"])
    assert meta["ch_1"]["fov_statistics"]["mean"].shape == (1,)
    assert meta["ch_1"]["fov_statistics"]["mean"][0].item() == pytest.approx(want, rel=1e-6)
    assert batch["anchor_norm_meta"][0, 1, levels.index("fov_statistics"), stats.index("mean")].item() == pytest.approx(want, rel=1e-6)


def test_positive_same_lineage(ported, single):
    batches = _train(ported, single, epochs=(0, 1))
    for batch in batches:
        frame = batch_frame(batch)
        # No divisions here: the lineage is the track; the positive lies tau > 0 frames later.
        assert (frame.positive_track_id == frame.track_id).all()
        assert (frame.positive_t > frame.t).all()
    _check_pixels(single, batches[0])


def test_positive_through_division(ported, division):
    index = ported.predict_index(division, tau_range=TAU)
    assert set(index.groupby("track_id").lineage_id.first()) == {0}  # one lineage, rooted at track 0
    frames = [batch_frame(b) for b in _train(ported, division, epochs=(0, 1, 2))]
    parent = [f[f.track_id == 0] for f in frames]
    assert sum(len(p) for p in parent) > 0
    reached = set().union(*(set(p.positive_track_id) for p in parent))
    assert {1, 2} & reached  # positives of parent anchors reach the daughters (VisCy: informational)


def test_channel_remapping(ported, two):
    batches = _train(ported, two, batch_size=16, experiment_aware=False)
    assert {r["experiment"] for b in batches for r in b["index"]} == {"exp_a", "exp_b"}
    for batch in batches:
        assert batch["anchor"].shape[1:] == (2, 1, 32, 32)
        _check_pixels(two, batch)  # exp_b: Phase is plate channel 1, Mito channel 0


def test_predict_mode_returns_index(ported, single):
    dm = ported.datamodule(single, tau_range=TAU, yx_patch_size=PATCH, batch_size=2)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert "anchor" in batch and "positive" not in batch
    assert isinstance(batch["index"], list) and len(batch["index"]) == 2
    assert all("fov_name" in r and "id" in r for r in batch["index"])
    _check_pixels(single, batch)


def test_len_matches_valid_anchors(ported, single):
    # Documented difference: cellfeed's training epoch is every valid anchor once (VisCy samples
    # each batch independently); predict streams every tracked row.
    anchors = ported.anchors(single, tau_range=TAU, yx_patch_size=PATCH)
    dm = ported.datamodule(single, tau_range=TAU, yx_patch_size=PATCH, batch_size=8, condition_balanced=False)
    dm.setup("fit")
    assert dm.info["splits"]["train"]["items"] == len(anchors) == dm.info["experiments"][0]["valid_anchors"] == 5 * 9  # t = 0..8 of each track (tau 1..4 frames)
    assert len(dm.train_dataloader()) == math.ceil(len(anchors) / 8)
