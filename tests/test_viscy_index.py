"""Port of VisCy's `applications/dynaclr/tests/test_index.py` (mehta-lab/VisCy, branch app-dynaclr,
commit 0d04b3504d6c621191e88a98ab0de7e6baa7e8e0): MultiExperimentIndex (tracks, lineage, border
clamping, valid anchors, groups and summary).

VisCy's `index.tracks` is what cellfeed's predict split streams (every indexed row, with its index
columns); `index.valid_anchors` is what one unweighted training epoch streams (a permutation of
the valid anchors); the counts VisCy's `summary()` prints are in the session's `info`. Border
clamping is checked on the pixels: the streamed patch equals iohub's read at the clamped origin.
Plates are written by iohub; the server is a real `cellfeed serve` on loopback.

Where cellfeed has no such object (iohub `Position` objects, `global_track_id` strings, the
`summary()` string, row-index group arrays), the test checks what stands for it and says so.
"""

from __future__ import annotations

import numpy as np
import pytest

from cellfeed.client import RequestError
from tests.fixtures.ecosystem_plates import IohubPlate
from tests.fixtures.plates import expected_origin
from tests.fixtures.viscy_ports import custom_tracks, make_experiment, ported_server, standard_tracks

PATCH = (32, 32)
TAU = (0.5, 1.5)
INDEX_COLUMNS = {"experiment", "condition", "fov_name", "track_id", "t", "id", "parent_track_id", "parent_id",
                 "lineage_id", "hours_post_infection", "z", "y", "x"}


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with ported_server(tmp_path_factory, "viscy-index") as p:
        yield p


@pytest.fixture(scope="module")
def two(ported):
    """2 experiments x 2 wells x 2 FOVs x 5 tracks x 10 frames (VisCy's two_experiment_setup)."""
    folder = ported.folder("two")
    a = make_experiment(folder, "exp_a", ["Phase", "GFP"], ["A/1", "B/1"], {"uninfected": ["A/1"], "infected": ["B/1"]},
                        fovs_per_well=2, interval_minutes=30.0, start_hpi=0.0, seed=None)
    b = make_experiment(folder, "exp_b", ["Phase", "Mito"], ["A/1", "B/1"], {"control": ["A/1"], "treated": ["B/1"]},
                        fovs_per_well=2, interval_minutes=15.0, start_hpi=2.0, seed=None)
    return [a, b]


@pytest.fixture(scope="module")
def tracks(ported, two):
    return ported.predict_index(two, tau_range=TAU)


@pytest.fixture(scope="module")
def anchors(ported, two):
    return ported.anchors(two, tau_range=TAU)


@pytest.fixture(scope="module")
def lineage(ported):
    """Track 0 -> 1 -> 2 (daughter, granddaughter); track 3's parent 99 is absent; track 4 a root."""
    entry = make_experiment(ported.folder("lineage"), "lineage_exp", ["Phase", "GFP"], ["A/1"], {"ctrl": ["A/1"]},
                            tracks=standard_tracks(parent_map={1: 0, 2: 1, 3: 99}), seed=None)
    return ported.predict_index([entry])


@pytest.fixture(scope="module")
def border(ported):
    """Track 3 near the border (2, 2), track 4 outside the image (-1, -1); random pixels."""
    entry = make_experiment(ported.folder("border"), "border_exp", ["Phase", "GFP"], ["A/1"], {"ctrl": ["A/1"]},
                            tracks=standard_tracks(border_track=3, outside_track=4), seed=3)
    return entry, _predict_batches(ported, [entry])


def _predict_batches(ported, entries, **kw):
    dm = ported.datamodule(entries, yx_patch_size=PATCH, **kw)
    dm.setup("predict")
    return [(b["anchor"].numpy(), b["index"], b["padding"].numpy()) for b in dm.predict_dataloader()]


def _rows(batches):
    return [(anchor[i], row) for anchor, index, pad in batches for i, row in enumerate(index) if not pad[i]]


def _single(ported, name: str, rows, n_t: int = 10, interval: float = 30.0, channels=("Phase", "GFP")) -> dict:
    return make_experiment(ported.folder(name), name, list(channels), ["A/1"], {"ctrl": ["A/1"]},
                           tracks=custom_tracks(rows), n_t=n_t, interval_minutes=interval, seed=None)


def _track(tid: int, ts, **extra) -> list[dict]:
    return [{"track_id": tid, "t": t, "z": 0, "y": 32.0, "x": 32.0, **extra} for t in ts]


# -- unified tracks --------------------------------------------------------------------------------

def test_all_observations_present(tracks):
    assert len(tracks) == 400


def test_experiment_column(tracks):
    assert set(tracks.experiment) == {"exp_a", "exp_b"}
    assert (tracks.experiment == "exp_a").sum() == 200 and (tracks.experiment == "exp_b").sum() == 200


def test_condition_column(tracks):
    a = tracks[tracks.experiment == "exp_a"]
    well = a.fov_name.str.rsplit("/", n=1).str[0]
    assert (a[well == "A/1"].condition == "uninfected").all()
    assert (a[well == "B/1"].condition == "infected").all()


def test_global_track_id_format(tracks):
    # No counterpart for the "{experiment}_{fov}_{track}" string: cellfeed names a track by the
    # (experiment, fov_name, track_id) columns, which every row carries.
    assert {"experiment", "fov_name", "track_id"} <= set(tracks.columns)


def test_global_track_id_unique_across_experiments(tracks):
    assert len(tracks.groupby(["experiment", "fov_name", "track_id"])) == 40


def test_hours_post_infection(tracks):
    a = tracks[(tracks.experiment == "exp_a") & (tracks.t == 3)].iloc[0]
    assert a.hours_post_infection == pytest.approx(0.0 + 3 * 30.0 / 60.0)
    b = tracks[(tracks.experiment == "exp_b") & (tracks.t == 4)].iloc[0]
    assert b.hours_post_infection == pytest.approx(2.0 + 4 * 15.0 / 60.0)


def test_fluorescence_channel(ported, two):
    # No per-row column: the reporter is position 1 of each experiment's source channels.
    info = ported.info(two, tau_range=TAU)
    assert {e["name"]: e["source_channel"][1] for e in info["experiments"]} == {"exp_a": "GFP", "exp_b": "Mito"}


def test_required_columns_present(tracks):
    # cellfeed's index columns (docs/protocol/dynaclr.md); position, well_name, global_track_id and
    # y_clamp/x_clamp are server-side only (the well is the fov_name's first two parts).
    assert INDEX_COLUMNS <= set(tracks.columns)


def test_include_wells_filter(ported, two):
    rows = ported.predict_index(two, tau_range=TAU, include_wells=["A/1"])
    assert set(rows.fov_name.str.rsplit("/", n=1).str[0]) == {"A/1"}
    assert len(rows) == 200


def test_exclude_fovs_filter(ported, two):
    rows = ported.predict_index(two, tau_range=TAU, exclude_fovs=["A/1/0"])
    assert "A/1/0" not in set(rows.fov_name)
    assert len(rows) == 300


def test_positions_stored(ported, two):
    assert sum(e["fovs"] for e in ported.info(two, tau_range=TAU)["experiments"]) == 8


# test_position_column_is_position_object: no counterpart (iohub Position objects stay on the server).


# -- lineage ---------------------------------------------------------------------------------------

def _lineage_of(frame, tid: int) -> int:
    ids = set(frame[frame.track_id == tid].lineage_id)
    assert len(ids) == 1
    return ids.pop()


def test_root_track_lineage(lineage):
    assert _lineage_of(lineage, 0) == 0


def test_daughter_track_lineage(lineage):
    assert _lineage_of(lineage, 1) == _lineage_of(lineage, 0)


def test_granddaughter_lineage_chain(lineage):
    assert _lineage_of(lineage, 2) == _lineage_of(lineage, 0) == 0


def test_missing_parent_fallback(lineage):
    assert _lineage_of(lineage, 3) == 3


def test_independent_track_lineage(lineage):
    assert _lineage_of(lineage, 4) == 4


# -- border clamping -------------------------------------------------------------------------------

def _patch_check(entry, anchor, row) -> tuple[int, int]:
    """The streamed patch equals iohub's read at the clamped origin; returns the origin."""
    y0, x0 = expected_origin(row["y"], row["x"], PATCH)
    plate = IohubPlate(entry["data_path"])
    try:
        np.testing.assert_array_equal(anchor, plate.patch(row["fov_name"], row["t"], entry["source_channel"], (0, 1), y0, x0, PATCH))
    finally:
        plate.close()
    return y0, x0


def test_center_cell_unchanged(border):
    entry, batches = border
    anchor, row = next((a, r) for a, r in _rows(batches) if r["track_id"] == 0)
    assert _patch_check(entry, anchor, row) == (16, 16)  # centre (32, 32): y_clamp = 32, origin 32 - 16


def test_border_cell_clamped(border):
    entry, batches = border
    anchor, row = next((a, r) for a, r in _rows(batches) if r["track_id"] == 3)
    assert _patch_check(entry, anchor, row) == (0, 0)  # y_clamp = 16: origin 0


def test_border_cell_original_preserved(border):
    _, batches = border
    row = next(r for _, r in _rows(batches) if r["track_id"] == 3)
    assert (row["y"], row["x"]) == (2.0, 2.0)


def test_outside_cell_excluded(border):
    _, batches = border
    assert not [r for _, r in _rows(batches) if r["track_id"] == 4]


def test_border_cells_retained_count(border):
    _, batches = border
    assert len(_rows(batches)) == 40


def test_edge_cell_clamped(ported):
    folder = ported.folder("edge")
    entry = make_experiment(folder, "edge_exp", ["Phase", "GFP"], ["A/1"], {"ctrl": ["A/1"]}, n_t=2, seed=5,
                            tracks=custom_tracks([*_track(0, [0], y=0.0, x=0.0), *_track(0, [1], y=0.0, x=0.0)]))
    ((anchor, row), *_) = _rows(_predict_batches(ported, [entry]))
    assert _patch_check(entry, anchor, row) == (0, 0)


# -- valid anchors ---------------------------------------------------------------------------------

def test_basic_anchor_validity(anchors, tracks):
    assert 0 < len(anchors) <= len(tracks)


def test_anchor_is_subset_of_tracks(anchors, tracks):
    key = ["experiment", "fov_name", "track_id", "t"]
    assert set(map(tuple, anchors[key].to_numpy())) <= set(map(tuple, tracks[key].to_numpy()))


def test_end_of_track_not_valid(ported):
    rows = ported.anchors([_single(ported, "end_test", _track(0, range(10)))], tau_range=TAU)
    times = set(rows.t)
    assert 9 not in times and {7, 8} <= times


def test_lineage_continuity_across_tracks(ported):
    entry = _single(ported, "lineage_anchor", [*_track(0, range(5)), *_track(1, range(5, 10), parent_track_id=0)])
    times = set(ported.anchors([entry], tau_range=TAU).query("track_id == 0").t)
    assert {3, 4} <= times  # t=4's positive can only be the daughter at t=5..7


def test_different_tau_for_different_intervals(ported):
    fast = _single(ported, "fast_exp", _track(0, range(10)), interval=15.0)
    slow = _single(ported, "slow_exp", _track(0, range(10)), interval=30.0, channels=("Phase", "Mito"))
    rows = ported.anchors([fast, slow], tau_range=TAU)
    fast_t, slow_t = set(rows[rows.experiment == "fast_exp"].t), set(rows[rows.experiment == "slow_exp"].t)
    assert 9 not in fast_t and 4 in fast_t  # (2, 6) frames
    assert 9 not in slow_t and 7 in slow_t  # (1, 3) frames


def test_empty_tracks_empty_anchors(ported, two):
    empty = make_experiment(ported.folder("empty"), "empty_exp", ["Phase", "GFP"], ["A/1"], {"ctrl": ["A/1"]}, tracks={}, seed=None)
    # Next to an experiment with tracks: no rows, no anchors, and a warning.
    info = ported.info([two[0], empty], tau_range=TAU)
    exp = {e["name"]: e for e in info["experiments"]}["empty_exp"]
    assert exp["valid_anchors"] == 0 and exp["rows"] == 0
    assert any("empty_exp" in w for w in info["warnings"])
    # Documented difference: alone, VisCy builds an empty index; cellfeed refuses the session.
    with pytest.raises(RequestError, match="no tracks found"):
        ported.info([empty], tau_range=TAU)


def test_track_with_gap_still_valid(ported):
    rows = ported.anchors([_single(ported, "gap_test", _track(0, [0, 1, 2, 4, 5]), n_t=6)], tau_range=TAU)
    assert 2 in set(rows.t)


def test_anchor_self_not_positive(ported, two):
    lone = _single(ported, "self_test", _track(0, [5]))
    info = ported.info([two[0], lone], tau_range=(0.0, 0.5))
    assert {e["name"]: e for e in info["experiments"]}["self_test"]["valid_anchors"] == 0
    # Documented difference: alone, VisCy has an empty valid_anchors; cellfeed refuses the session.
    with pytest.raises(RequestError, match="no valid anchor"):
        ported.info([lone], tau_range=(0.0, 0.5))


# -- groups and summary ----------------------------------------------------------------------------
# VisCy's experiment_groups / condition_groups are row-index arrays into index.tracks and
# summary() a string; cellfeed's counterparts are the index columns and the session's info.

def test_experiment_groups_keys(anchors):
    assert set(anchors.experiment) == {"exp_a", "exp_b"}


def test_experiment_groups_values_are_index_arrays(ported, two, tracks):
    info = ported.info(two, tau_range=TAU)
    assert {e["name"]: e["rows"] for e in info["experiments"]} == tracks.experiment.value_counts().to_dict()


def test_experiment_groups_cover_all_rows(ported, two, tracks):
    info = ported.info(two, tau_range=TAU)
    assert sum(e["rows"] for e in info["experiments"]) == info["splits"]["predict"]["items"] == len(tracks)


def test_condition_groups_keys(ported, two):
    assert set(ported.info(two, tau_range=TAU)["conditions"]) == {"uninfected", "infected", "control", "treated"}


def test_condition_groups_values_correct(tracks):
    wells = {("exp_a", "A/1"): "uninfected", ("exp_a", "B/1"): "infected", ("exp_b", "A/1"): "control", ("exp_b", "B/1"): "treated"}
    well = tracks.fov_name.str.rsplit("/", n=1).str[0]
    assert [wells[(e, w)] for e, w in zip(tracks.experiment, well)] == list(tracks.condition)


def test_summary_returns_string(ported, two):
    assert ported.info(two, tau_range=TAU)["experiments"]


def test_summary_contains_experiment_count(ported, two):
    assert len(ported.info(two, tau_range=TAU)["experiments"]) == 2


def test_summary_contains_per_experiment_lines(ported, two, anchors):
    for exp in ported.info(two, tau_range=TAU)["experiments"]:
        assert exp["rows"] == 200 and exp["conditions"]
        assert exp["valid_anchors"] == (anchors.experiment == exp["name"]).sum()


def test_summary_contains_total_counts(ported, two, tracks, anchors):
    info = ported.info(two, tau_range=TAU)
    assert info["splits"]["predict"]["items"] == len(tracks)
    assert info["splits"]["train"]["items"] == len(anchors)
