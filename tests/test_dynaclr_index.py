"""The cell index: lineages, HPI, border clamping, valid anchors, FOV selection, tau sampling."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cellfeed.server.kinds.dynaclr.index import build_index
from cellfeed.server.kinds.dynaclr.lineage import LineageGrid, lineage_roots, valid_anchors
from cellfeed.server.kinds.dynaclr.positives import PositiveSampler
from cellfeed.server.kinds.dynaclr.registry import ExperimentRegistry
from cellfeed.server.kinds.dynaclr.tau import tau_probabilities
from cellfeed.server.errors import CellfeedError
from cellfeed.server.paths import DataRoot
from cellfeed.server.reading.omezarr import open_plate
from tests.fixtures.plates import expected_origin, make_dynaclr_data

PATCH = (32, 32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dynaclr_data(tmp_path_factory.mktemp("dynaclr-index") / "data")


def _index(data, tau=(0.5, 2.0), **kwargs):
    registry = ExperimentRegistry.from_yaml(data.yaml_text)
    paths = registry.resolve_paths(DataRoot(data.root))
    plates = {name: open_plate(plate, name) for name, (plate, _) in paths.items()}
    tracks = {name: t for name, (_, t) in paths.items()}
    return build_index(registry, plates, tracks, patch_yx=PATCH, z_range=(0, 3), tau_range_hours=tau, **kwargs)


def _rows(index, experiment: str, fov: str, track: int) -> np.ndarray:
    e = index.experiments.index(experiment)
    fov_codes = [i for i, ref in enumerate(index.fovs) if ref.experiment == e and ref.fov.name == fov]
    r = index.rows
    return np.flatnonzero(np.isin(r["fov"], fov_codes) & (r["track_id"] == track))


def test_lineage_roots_follow_parents_and_survive_cycles():
    group = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    track = np.array([1, 2, 3, 4, 9, 5, 1, 2, 3, 7])
    parent = np.array([np.nan, 1, 2, 2, 99, -1, 3, 1, 2, 7])
    roots, cyclic = lineage_roots(group, track, parent)
    # FOV 0: 1 <- 2 <- {3, 4}; 9's parent 99 is absent; 5 is a root (ultrack's -1).
    assert roots[:6].tolist() == [1, 1, 1, 1, 9, 5]
    # FOV 1: 1 -> 3 -> 2 -> 1 is a cycle (root: its smallest id); 7 names itself.
    assert roots[6:].tolist() == [1, 1, 1, 7]
    assert cyclic.tolist() == [False] * 6 + [True, True, True, False]


def test_rows_carry_experiment_condition_and_hpi(data):
    index = _index(data)
    r = index.rows
    assert index.experiments == ["sec61", "tomm20"] and index.conditions == ["infected", "uninfected"]
    assert len(index) == 2 * 4 * 63  # 67 rows per FOV, 4 of which (track 7) leave the image
    sec61 = _rows(index, "sec61", "B/1/0", 1)
    assert r["hpi"][sec61].tolist() == [3.0 + 0.5 * t for t in range(10)]
    tomm20 = _rows(index, "tomm20", "B/1/0", 1)
    assert r["hpi"][tomm20].tolist() == [2.0 + 0.25 * t for t in range(10)]
    assert (r["condition"][sec61] == index.conditions.index("infected")).all()
    assert (r["condition"][_rows(index, "tomm20", "A/1/1", 1)] == index.conditions.index("uninfected")).all()
    assert index.warnings == ["32 track rows have centroids outside their image; dropped"]


def test_equal_fov_names_stay_apart(data):
    index = _index(data)
    assert len(index.fovs) == 8
    assert {(index.experiments[ref.experiment], ref.fov.name) for ref in index.fovs} == {
        (e, f) for e in ("sec61", "tomm20") for f in ("A/1/0", "A/1/1", "B/1/0", "B/1/1")
    }
    a, b = _rows(index, "sec61", "A/1/0", 1), _rows(index, "tomm20", "A/1/0", 1)
    assert not set(index.rows["lineage"][a]) & set(index.rows["lineage"][b])


def test_division_and_missing_parent_lineages(data):
    index = _index(data)
    r = index.rows
    family = np.concatenate([_rows(index, "sec61", "A/1/0", k) for k in (2, 3, 4)])
    assert len(set(r["lineage"][family])) == 1 and set(r["lineage_track_id"][family]) == {2}
    orphan = _rows(index, "sec61", "A/1/0", 9)
    assert set(r["lineage_track_id"][orphan]) == {9}
    assert set(r["lineage"][orphan]).isdisjoint(r["lineage"][family])


def test_border_cells_are_clamped_and_outside_rows_dropped(data):
    index = _index(data)
    r = index.rows
    border = _rows(index, "sec61", "A/1/0", 6)
    assert len(border) == 10 and (r["y0"][border] == 0).all() and (r["x0"][border] == 0).all()
    leaving = _rows(index, "sec61", "A/1/0", 7)
    assert r["t"][leaving].tolist() == [0, 1, 2, 3, 4, 5]  # x >= 64 from t = 6 on
    assert (r["x0"][leaving] == 64 - PATCH[1]).all()  # x = 58..63: clamped to the right edge
    inner = _rows(index, "sec61", "A/1/0", 1)
    expected = [expected_origin(y, x, PATCH) for y, x in zip(r["y"][inner], r["x"][inner])]
    assert list(zip(r["y0"][inner].tolist(), r["x0"][inner].tolist())) == expected


def test_valid_anchors_need_a_future_observation_in_range(data):
    index = _index(data)
    r, valid = index.rows, index.valid
    # sec61: tau in [1, 4] frames. The last frame of a lineage is never an anchor.
    track1 = _rows(index, "sec61", "A/1/0", 1)
    assert valid[track1].tolist() == [True] * 9 + [False]
    # tomm20: tau in [2, 8] frames (15 min), so the last two frames are not anchors.
    assert valid[_rows(index, "tomm20", "A/1/0", 1)].tolist() == [True] * 8 + [False] * 2
    # Before a division the mother's positive lies in a daughter.
    mother = _rows(index, "sec61", "A/1/0", 2)
    assert valid[mother].all()
    # A gap (track 5 has no t = 3, 4) is bridged by a larger tau.
    gap = _rows(index, "sec61", "A/1/0", 5)
    assert r["t"][gap].tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    assert valid[gap].tolist() == [True] * 7 + [False]


def test_tau_of_one_frame_exactly_excludes_the_gap(data):
    index = _index(data, tau=(0.5, 0.5))
    gap = _rows(index, "sec61", "A/1/0", 5)
    assert index.valid[gap].tolist() == [True, True, False, True, True, True, True, False]
    with pytest.raises(CellfeedError, match=r"sec61.*\[0, 0\] frames at 30.0 min"):
        _index(data, tau=(0.0, 0.1))


def test_include_wells_and_exclude_fovs(data):
    index = _index(data, include_wells=["B/1"], exclude_fovs=["B/1/1"])
    assert {ref.fov.name for ref in index.fovs} == {"B/1/0"}
    assert len(index.fovs) == 2  # one per experiment
    with pytest.raises(CellfeedError, match="no FOV is left"):
        _index(data, include_wells=["C/3"])


def test_fov_without_tracks_is_skipped_with_a_warning(data, tmp_path):
    copy = make_dynaclr_data(tmp_path / "data")
    shutil.rmtree(copy.tracks("tomm20") / "A/1/1")
    index = _index(copy)
    assert len(index.fovs) == 7
    assert any("tomm20" in w and "A/1/1" in w and "skipped" in w for w in index.warnings)


def test_patch_larger_than_image_and_z_past_the_stack(data):
    registry = ExperimentRegistry.from_yaml(data.yaml_text)
    paths = registry.resolve_paths(DataRoot(data.root))
    plates = {name: open_plate(plate, name) for name, (plate, _) in paths.items()}
    tracks = {name: t for name, (_, t) in paths.items()}
    with pytest.raises(CellfeedError, match=r"sec61', FOV A/1/0: yx_patch_size \[96, 96\] is larger than the image \(64 x 64\)"):
        build_index(registry, plates, tracks, patch_yx=(96, 96), z_range=(0, 3), tau_range_hours=(0.5, 2))
    with pytest.raises(CellfeedError, match=r"z_range \[0, 9\] reaches past the image's 4 Z slices"):
        build_index(registry, plates, tracks, patch_yx=PATCH, z_range=(0, 9), tau_range_hours=(0.5, 2))


def test_positives_share_the_lineage_and_respect_tau(data):
    index = _index(data)
    r = index.rows
    sampler = PositiveSampler(index.grid, r["experiment"], index.tau_frames, decay=2.0)
    anchors = np.flatnonzero(index.valid)
    positives, tau = sampler.sample(anchors, np.random.default_rng(0))
    assert (r["lineage"][positives] == r["lineage"][anchors]).all()
    assert (r["t"][positives] - r["t"][anchors] == tau).all()
    lo = np.array([index.tau_frames[e][0] for e in r["experiment"][anchors]])
    hi = np.array([index.tau_frames[e][1] for e in r["experiment"][anchors]])
    assert ((tau >= np.maximum(lo, 1)) & (tau <= hi)).all()
    again, _ = sampler.sample(anchors, np.random.default_rng(0))
    assert (again == positives).all()
    # A daughter can be the positive of its mother: both daughters appear across draws.
    mother_last = _rows(index, "sec61", "A/1/0", 2)[-1:]
    seen = {int(r["track_id"][sampler.sample(mother_last, np.random.default_rng(s))[0][0]]) for s in range(40)}
    assert seen == {3, 4}


def test_tau_probabilities_decay():
    taus, probs = tau_probabilities(1, 4, 2.0)
    assert taus.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(probs, [0.523, 0.268, 0.138, 0.071], atol=1e-3)
    assert np.allclose(tau_probabilities(2, 8, 0.0)[1], 1 / 7)
    assert tau_probabilities(3, 3, 2.0)[0].tolist() == [3]
    assert tau_probabilities(0, 2, 1.0)[0].tolist() == [1, 2]  # tau = 0 never counts


def test_millions_of_rows_match_a_plain_reference():
    """2M rows through the vectorised lineage and anchor code, checked against dict walks."""
    rng = np.random.default_rng(3)
    n_tracks, frames = 200_000, 10
    group = np.repeat(np.arange(n_tracks // 100), 100)
    track = np.tile(np.arange(1, 101), n_tracks // 100)
    parent = np.where(rng.random(n_tracks) < 0.4, track - 1, np.nan)  # chains of divisions
    parent[track == 1] = np.nan
    roots, cyclic = lineage_roots(group, track, parent)
    assert not cyclic.any()
    for i in rng.choice(n_tracks, 500, replace=False):
        j = i
        while not np.isnan(parent[j]):
            j -= 1  # parent track_id - 1 is the previous track of the same group
        assert roots[i] == track[j]

    starts = rng.integers(0, 6, n_tracks)
    t = (starts[:, None] + np.arange(frames)[None, :]).ravel()
    keep = rng.random(len(t)) > 0.1  # random gaps
    row_track = np.repeat(np.arange(n_tracks), frames)[keep]
    t = t[keep]
    lineage_key = group * 1000 + roots
    lineage = np.unique(lineage_key, return_inverse=True)[1][row_track]
    assert len(t) > 1_700_000
    grid = LineageGrid(lineage, t)
    valid = valid_anchors(grid, np.full(len(t), 2), np.full(len(t), 3))
    present = set(zip(lineage.tolist(), t.tolist()))
    for i in rng.choice(len(t), 2000, replace=False):
        expected = any((lineage[i], t[i] + tau) in present for tau in (2, 3))
        assert valid[i] == expected
