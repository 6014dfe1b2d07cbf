"""Port of VisCy main's `packages/viscy-data/tests/test_triplet.py` (mehta-lab/VisCy, branch main,
commit 4b62365c0df25929bffc7f01b3bb2d1c11d69cce): the single-plate TripletDataModule /
TripletDataset (FOV split with well and FOV filters, the Z window, anchors by `time_interval`,
FOVs independent, predict mode).

cellfeed's counterpart of a one-plate TripletDataModule is `MultiExperimentDataModule` with one
experiment, served by a real `cellfeed serve` on loopback over an iohub plate written as
viscy-data's conftest writes it (wells A/1, A/2, B/1, B/2 x FOVs 0-3; 4 channels). Mapping:
`time_interval=k` is `tau_range` of exactly k frames; `time_interval="any"` is
`positive_cell_source="self"` (every row an anchor); `split_ratio` is the FOV split; the tracks
CSV lies next to each position, as there. Plates are 64 x 64 with centroids scaled by 1/4 and
hold 5 frames (viscy-data's hold 2 while its tracks reach t = 4; cellfeed drops rows past a FOV's
last frame). Negatives (`return_negative`) have no counterpart: cellfeed streams anchor/positive
pairs (the loss takes other samples of the batch as negatives, as NT-Xent does).
"""

from __future__ import annotations

import pandas as pd
import pytest

from tests.fixtures.viscy_ports import custom_tracks, make_experiment, ported_server

CHANNELS = ["Phase", "Retardance", "GFP", "DAPI"]
WELLS = ["A/1", "A/2", "B/1", "B/2"]
INTERVAL_H = 0.5  # 30 min frames
GAPS = {
    "A/1/0": [(0, [0, 1, 2, 3], 32), (1, [0, 1], 25)],
    "A/1/1": [(0, [0, 1, 3], 32), (1, [0, 2, 4], 25)],
    "A/2/0": [(0, [0], 32), (1, [0, 1, 2], 25)],
}


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with ported_server(tmp_path_factory, "viscy-main-triplet") as p:
        yield p


def _fovs() -> list[str]:
    return [f"{w}/{i}" for w in WELLS for i in range(4)]


@pytest.fixture(scope="module")
def tracks_hcs(ported):
    """preprocessed_hcs_dataset + tracks_hcs_dataset: two tracks per FOV, at t = 0 and t = 1."""
    two = custom_tracks([{"track_id": 0, "t": 0, "y": 25.0, "x": 24.0, "z": 0, "id": 0},
                         {"track_id": 1, "t": 1, "y": 50.0, "x": 40.0, "z": 0, "id": 1}])
    entry = make_experiment(ported.folder("tracks"), "tracks", CHANNELS, WELLS, {"ctrl": WELLS}, fovs_per_well=4,
                            tracks=two, n_t=5, zyx=(12, 64, 64), seed=None, source_channel=CHANNELS)
    return [entry]


@pytest.fixture(scope="module")
def gaps(ported):
    """tracks_with_gaps_dataset: the three FOVs with gap patterns, one track at t = 0 elsewhere."""
    frames = {}
    for fov in _fovs():
        spec = GAPS.get(fov, [(0, [0], 32)])
        frames[fov] = custom_tracks([{"track_id": tid, "t": t, "y": float(c), "x": float(c), "z": 0}
                                     for tid, ts, c in spec for t in ts])
    entry = make_experiment(ported.folder("gaps"), "gaps", ["nuclei_labels"], WELLS, {"ctrl": WELLS}, fovs_per_well=4,
                            tracks=frames, n_t=5, zyx=(1, 64, 64), seed=None, source_channel=["nuclei_labels"])
    return [entry]


def _total(entries) -> int:
    return sum(len(frame) for frame in _csvs(entries).values())


def _csvs(entries) -> dict[str, pd.DataFrame]:
    from pathlib import Path

    root = Path(entries[0]["tracks_path"])
    return {fov: pd.read_csv(next((root / fov).glob("*.csv"))) for fov in _fovs()}


def _anchors(ported, gaps, k: int) -> pd.DataFrame:
    return ported.anchors(gaps, tau_range=(k * INTERVAL_H, k * INTERVAL_H), yx_patch_size=(32, 32), z_range=(0, 1))


def _ts(anchors: pd.DataFrame, fov: str, tid: int) -> set[int]:
    return set(anchors[(anchors.fov_name == fov) & (anchors.track_id == tid)].t)


@pytest.mark.parametrize("include_wells", [None, ["A/1", "A/2", "B/1"]])
@pytest.mark.parametrize("exclude_fovs", [None, ["A/1/0", "A/1/1", "A/2/2", "B/1/3"]])
def test_datamodule_setup_fit(ported, tracks_hcs, include_wells, exclude_fovs):
    total_fovs = (len(include_wells) if include_wells else 4) * 4 - (len(exclude_fovs) if exclude_fovs else 0)
    len_total = total_fovs * 2
    len_train = int(len_total * 0.75)
    dm = ported.datamodule(tracks_hcs, z_range=(4, 9), yx_patch_size=(32, 32), split_ratio=0.75, batch_size=4,
                           include_wells=include_wells, exclude_fovs=exclude_fovs, positive_cell_source="self",
                           condition_balanced=False, return_index=True)
    dm.setup("fit")
    splits = dm.info["splits"]
    assert splits["train"]["items"] == len_train and splits["val"]["items"] == len_total - len_train
    rows = []
    for loader, full in ((dm.train_dataloader(), True), (dm.val_dataloader(), False)):
        for batch in loader:  # validation is in order here: its last batch may be short
            assert batch["anchor"].shape[1:] == (len(CHANNELS), 5, 32, 32)
            assert not full or batch["anchor"].shape[0] == 4
            rows += [r for r, pad in zip(batch["index"], batch["padding"].tolist()) if not pad]
    frame = pd.DataFrame(rows)
    assert len(frame) == len_total
    for fov in set(frame.fov_name):
        if include_wells is not None:
            assert fov.rsplit("/", 1)[0] in include_wells
        if exclude_fovs is not None:
            assert fov not in exclude_fovs


@pytest.mark.parametrize("z_window_size", [None, 3])
def test_datamodule_z_window_size(ported, tracks_hcs, z_window_size):
    z_range = (4, 4 + z_window_size) if z_window_size is not None else (4, 9)
    dm = ported.datamodule(tracks_hcs, z_range=z_range, yx_patch_size=(32, 32), batch_size=4, positive_cell_source="self",
                           condition_balanced=False)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["anchor"].shape == (4, len(CHANNELS), z_range[1] - z_range[0], 32, 32)


def test_filter_anchors_time_interval_any(ported, gaps):
    anchors = ported.anchors(gaps, positive_cell_source="self", yx_patch_size=(32, 32), z_range=(0, 1))
    assert len(anchors) == _total(gaps)


def test_filter_anchors_time_interval_1(ported, gaps):
    anchors = _anchors(ported, gaps, 1)
    assert _ts(anchors, "A/1/0", 0) == {0, 1, 2}
    assert _ts(anchors, "A/1/0", 1) == {0}
    assert _ts(anchors, "A/1/1", 0) == {0}
    assert _ts(anchors, "A/1/1", 1) == set()
    assert _ts(anchors, "A/2/0", 0) == set()
    assert _ts(anchors, "A/2/0", 1) == {0, 1}


def test_filter_anchors_time_interval_2(ported, gaps):
    anchors = _anchors(ported, gaps, 2)
    assert _ts(anchors, "A/1/0", 0) == {0, 1}
    assert _ts(anchors, "A/1/0", 1) == set()
    assert _ts(anchors, "A/1/1", 0) == {1}
    assert _ts(anchors, "A/1/1", 1) == {0, 2}
    assert _ts(anchors, "A/2/0", 1) == {0}


def test_filter_anchors_cross_fov_independence(ported, gaps):
    # VisCy's "{fov_name}_{track_id}" global id: here the (fov_name, track_id) columns.
    tracks = ported.predict_index(gaps, tau_range=(INTERVAL_H, INTERVAL_H), yx_patch_size=(32, 32), z_range=(0, 1))
    assert len(tracks[tracks.track_id == 0].groupby("fov_name")) >= 3
    anchors = _anchors(ported, gaps, 1)
    assert len(_ts(anchors, "A/1/0", 0)) == 3 > len(_ts(anchors, "A/1/1", 0)) == 1


def test_filter_anchors_predict_mode(ported, gaps):
    tracks = ported.predict_index(gaps, tau_range=(INTERVAL_H, INTERVAL_H), yx_patch_size=(32, 32), z_range=(0, 1))
    assert len(tracks) == _total(gaps)
