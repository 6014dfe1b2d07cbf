"""Port of VisCy main's `applications/dynaclr/tests/test_index.py` (mehta-lab/VisCy, branch main,
commit 4b62365c0df25929bffc7f01b3bb2d1c11d69cce): MultiExperimentIndex built from a collection
and from a cell index parquet (tracks, lineage, border clamping, valid anchors, groups, summary,
the parquet path, column-match anchors).

VisCy main builds the index in process; here a collection YAML (or a parquet the server's
`build-cell-index` job wrote) opens a session on a real `cellfeed serve` over iohub plates.
`index.tracks` is the predict stream (index columns plus VisCy main's sample meta: string
`global_track_id` and `lineage_id`, `y_clamp`, `x_clamp`); `index.valid_anchors` is one unweighted
training epoch; `summary()` and the group dicts are the session's `info`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cellfeed.client import RequestError
from tests.fixtures.jobs import run_job
from tests.fixtures.viscy_main_ports import collection_text, main_entry, main_ported_server
from tests.fixtures.viscy_ports import custom_tracks, standard_tracks

TAU = (0.5, 1.5)
PATCH = (32, 32)


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with main_ported_server(tmp_path_factory, "viscy-main-index") as p:
        yield p


@pytest.fixture(scope="module")
def two(ported):
    """VisCy main's two_experiment_setup: 2 experiments x 2 wells x 2 FOVs x 5 tracks x 10 frames."""
    folder = ported.folder("two")
    a = main_entry(folder, "exp_a", ["Phase", "GFP"], ["A/1", "B/1"], {"uninfected": ["A/1"], "infected": ["B/1"]},
                   fovs_per_well=2, interval_minutes=30.0, start_hpi=0.0)
    b = main_entry(folder, "exp_b", ["Phase", "Mito"], ["A/1", "B/1"], {"control": ["A/1"], "treated": ["B/1"]},
                   fovs_per_well=2, interval_minutes=15.0, start_hpi=2.0)
    return folder, [a, b]


@pytest.fixture(scope="module")
def tracks(ported, two):
    return ported.predict_rows(two[1], tau_range=TAU)


@pytest.fixture(scope="module")
def lineage(ported):
    """Track 0 -> 1 -> 2; track 3's parent 99 is absent; track 4 a root."""
    entry = main_entry(ported.folder("lineage"), "lineage_exp", ["Phase", "GFP"], ["A/1"], {"ctrl": ["A/1"]},
                       tracks=standard_tracks(parent_map={1: 0, 2: 1, 3: 99}))
    return entry, ported.predict_rows([entry], tau_range=TAU)


def _border_tracks() -> pd.DataFrame:
    """VisCy main's border_setup: track 3 near the border (10, 10), track 4 outside (-1, -1)."""
    frame = standard_tracks(outside_track=4)
    frame.loc[frame.track_id == 3, ["y", "x"]] = 10.0
    return frame


@pytest.fixture(scope="module")
def border(ported):
    entry = main_entry(ported.folder("border"), "border_exp", ["Phase", "GFP"], ["A/1"], {"ctrl": ["A/1"]},
                       tracks=_border_tracks(), seed=3)
    return entry, ported.predict_rows([entry], tau_range=TAU)


def _single(ported, name: str, rows, n_t: int = 10, interval: float = 30.0, channels=("Phase", "GFP")) -> dict:
    return main_entry(ported.folder(name), name, list(channels), ["A/1"], {"ctrl": ["A/1"]},
                      tracks=custom_tracks(rows), n_t=n_t, interval_minutes=interval)


def _track(tid: int, ts, **extra) -> list[dict]:
    return [{"track_id": tid, "t": t, "z": 0, "y": 32.0, "x": 32.0, **extra} for t in ts]


def _well(frame: pd.DataFrame) -> pd.Series:
    return frame.fov_name.str.rsplit("/", n=1).str[0]


# -- CELL-01: unified tracks -----------------------------------------------------------------------

def test_all_observations_present(tracks):
    assert len(tracks) == 400


def test_experiment_column(tracks):
    assert set(tracks.experiment) == {"exp_a", "exp_b"}
    assert (tracks.experiment == "exp_a").sum() == 200 and (tracks.experiment == "exp_b").sum() == 200


def test_perturbation_column(tracks):
    a = tracks[tracks.experiment == "exp_a"]
    assert (a[a.well == "A/1"].perturbation == "uninfected").all()
    assert (a[a.well == "B/1"].perturbation == "infected").all()
    assert (a.well == _well(a)).all()


def test_global_track_id_format(tracks):
    row = tracks.iloc[0]
    assert row.meta_global_track_id == f"{row.experiment}_{row.fov_name}_{row.track_id}"


def test_global_track_id_unique_across_experiments(tracks):
    assert tracks.meta_global_track_id.nunique() == 40


def test_hours_post_perturbation(tracks):
    a = tracks[(tracks.experiment == "exp_a") & (tracks.t == 3)].iloc[0]
    assert a.hours_post_perturbation == pytest.approx(0.0 + 3 * 30.0 / 60.0)
    b = tracks[(tracks.experiment == "exp_b") & (tracks.t == 4)].iloc[0]
    assert b.hours_post_perturbation == pytest.approx(2.0 + 4 * 15.0 / 60.0)


def test_channel_name(ported, two):
    # Documented difference: VisCy main's per-row channel_name is the reporter (source_channel[1])
    # in all-channels mode; cellfeed reads the collection's channels together, so the reporter is
    # position 1 of each experiment's read channels (info), and a row's `marker` is the first's.
    info = ported.info(two[1], tau_range=TAU)
    assert {e["name"]: e["read_channels"][1] for e in info["experiments"]} == {"exp_a": "GFP", "exp_b": "Mito"}


def test_required_columns_present(tracks):
    required = {"track_id", "t", "y", "x", "z", "fov_name", "well", "experiment", "perturbation",
                "hours_post_perturbation", "marker", "lineage_id", "meta_global_track_id", "meta_y_clamp", "meta_x_clamp"}
    assert required <= set(tracks.columns)  # VisCy's well_name is `well`, its channel_name the marker


def test_include_wells_filter(ported, two):
    rows = ported.predict_rows(two[1], tau_range=TAU, include_wells=["A/1"])
    assert set(rows.well) == {"A/1"} and len(rows) == 200


def test_exclude_fovs_filter(ported, two):
    rows = ported.predict_rows(two[1], tau_range=TAU, exclude_fovs=["A/1/0"])
    assert "A/1/0" not in set(rows.fov_name) and len(rows) == 300


def test_parallel_load_matches_serial(ported, two, tracks):
    # VisCy's num_workers loads FOVs in parallel; here num_workers is parallel Flight streams,
    # which must not change what is served.
    key = ["experiment", "fov_name", "track_id", "t"]
    serial = ported.predict_rows(two[1], tau_range=TAU, num_workers=1).sort_values(key).reset_index(drop=True)
    parallel = tracks.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(serial, parallel, check_like=True)
    assert len(ported.anchors(two[1], tau_range=TAU, num_workers=1)) == len(ported.anchors(two[1], tau_range=TAU, num_workers=3))


# -- CELL-02: lineage ------------------------------------------------------------------------------

def _first(frame: pd.DataFrame, tid: int) -> pd.Series:
    return frame[frame.track_id == tid].iloc[0]


def test_root_track_lineage(lineage):
    row = _first(lineage[1], 0)
    assert row.meta_lineage_id == row.meta_global_track_id


def test_daughter_track_lineage(lineage):
    assert _first(lineage[1], 1).meta_lineage_id == _first(lineage[1], 0).meta_global_track_id


def test_granddaughter_lineage_chain(lineage):
    assert _first(lineage[1], 2).meta_lineage_id == _first(lineage[1], 0).meta_global_track_id


def test_missing_parent_fallback(lineage):
    row = _first(lineage[1], 3)
    assert row.meta_lineage_id == row.meta_global_track_id


def test_independent_track_lineage(lineage):
    row = _first(lineage[1], 4)
    assert row.meta_lineage_id == row.meta_global_track_id


# -- CELL-03: border clamping (main's default max_border_shift: a quarter of the patch) -------------

def test_center_cell_unchanged(border):
    row = _first(border[1], 0)
    assert (row.meta_y_clamp, row.meta_x_clamp) == (32.0, 32.0)


def test_border_cell_clamped(border):
    row = _first(border[1], 3)
    assert (row.meta_y_clamp, row.meta_x_clamp) == (16.0, 16.0)


def test_border_cell_original_preserved(border):
    row = _first(border[1], 3)
    assert (row.y, row.x) == (10.0, 10.0)


def test_outside_cell_excluded(border):
    assert (border[1].track_id == 4).sum() == 0


def test_border_cells_retained_count(border):
    assert len(border[1]) == 40


def test_edge_cell_clamped(ported):
    entry = _single(ported, "edge_exp", [{"track_id": 0, "t": t, "z": 0, "y": 10.0, "x": 10.0} for t in range(10)])
    row = ported.predict_rows([entry], tau_range=TAU).iloc[0]
    assert (row.meta_y_clamp, row.meta_x_clamp) == (16.0, 16.0)


# -- CELL-04: valid anchors ------------------------------------------------------------------------

def test_basic_anchor_validity(ported, two, tracks):
    anchors = ported.anchors(two[1], tau_range=TAU)
    assert 0 < len(anchors) <= len(tracks)


def test_anchor_is_subset_of_tracks(ported, two, tracks):
    key = ["experiment", "fov_name", "track_id", "t"]
    anchors = set(map(tuple, ported.anchors(two[1], tau_range=TAU)[key].to_numpy().tolist()))
    assert anchors <= set(map(tuple, tracks[key].to_numpy().tolist()))


def test_end_of_track_not_valid(ported):
    entry = _single(ported, "end_test", _track(0, range(10)))
    ts = set(ported.anchors([entry], tau_range=TAU).t)
    assert 9 not in ts and {7, 8} <= ts


def test_lineage_continuity_across_tracks(ported):
    entry = _single(ported, "lineage_anchor", _track(0, range(5)) + _track(1, range(5, 10), parent_track_id=0))
    anchors = ported.anchors([entry], tau_range=TAU)
    assert {3, 4} <= set(anchors[anchors.track_id == 0].t)


def test_different_tau_for_different_intervals(ported):
    fast = _single(ported, "fast_exp", _track(0, range(10)), interval=15.0)
    slow = _single(ported, "slow_exp", _track(0, range(10)), interval=30.0, channels=("Phase", "Mito"))
    anchors = ported.anchors([fast, slow], tau_range=TAU)
    fast_t, slow_t = set(anchors[anchors.experiment == "fast_exp"].t), set(anchors[anchors.experiment == "slow_exp"].t)
    assert 9 not in fast_t and 4 in fast_t
    assert 9 not in slow_t and 7 in slow_t


def test_missing_tracking_csv_raises(ported):
    # VisCy main raises FileNotFoundError("No tracking CSV in ..."); cellfeed skips a FOV without
    # a CSV with a warning, so an experiment with none has no tracks: the session is refused.
    folder = ported.folder("empty_exp")
    entry = main_entry(folder, "empty_exp", ["Phase", "GFP"], ["A/1"], {"ctrl": ["A/1"]}, tracks={}, n_t=1)
    with pytest.raises(RequestError, match="empty_exp"):
        ported.info([entry], tau_range=TAU)


def test_track_with_gap_still_valid(ported):
    entry = _single(ported, "gap_test", _track(0, [0, 1, 2, 4, 5]), n_t=6)
    assert 2 in set(ported.anchors([entry], tau_range=TAU).t)


def test_anchor_self_not_positive(ported):
    entry = _single(ported, "self_test", _track(0, [5]))
    with pytest.raises(RequestError, match="no valid anchor"):
        ported.info([entry], tau_range=(0.0, 0.5))


# -- groups and summary: the session's info --------------------------------------------------------

@pytest.fixture(scope="module")
def info(ported, two):
    return ported.info(two[1], tau_range=TAU)


def test_experiment_groups_keys(info):
    assert [e["name"] for e in info["experiments"]] == ["exp_a", "exp_b"]


def test_experiment_groups_values_are_index_arrays(tracks, info):
    # No row-index arrays leave the server; each experiment's count is its rows in the stream.
    for e in info["experiments"]:
        assert e["rows"] == (tracks.experiment == e["name"]).sum()


def test_experiment_groups_cover_all_rows(tracks, info):
    assert sum(e["rows"] for e in info["experiments"]) == len(tracks)


def test_condition_groups_keys(info, tracks):
    assert set(info["conditions"]) == set(tracks.perturbation) == {"uninfected", "infected", "control", "treated"}


def test_condition_groups_values_correct(tracks):
    for pert, rows in tracks.groupby("perturbation"):
        wells = {"uninfected": "A/1", "control": "A/1", "infected": "B/1", "treated": "B/1"}
        assert (rows.well == wells[pert]).all()


def test_summary_returns_string(info):
    assert info["experiments"] and info["splits"]["predict"]["items"] > 0  # the summary is structured


def test_summary_contains_experiment_count(info):
    assert len(info["experiments"]) == 2


def test_summary_contains_per_experiment_lines(info):
    for e in info["experiments"]:
        assert {"rows", "valid_anchors", "conditions"} <= set(e) and e["conditions"]


def test_summary_contains_total_counts(ported, two, info, tracks):
    assert info["splits"]["predict"]["items"] == len(tracks)
    assert sum(e["valid_anchors"] for e in info["experiments"]) == len(ported.anchors(two[1], tau_range=TAU))


# -- CELL-05: the parquet path (built by the server's build-cell-index job) -------------------------

def _parquet(ported, folder, entries, name: str = "cell_index.parquet") -> str:
    (folder / f"{name}.yml").write_text(collection_text(entries))
    rel = ported.relative(folder)
    job = run_job(ported.server.http_url, {"kind": "build-cell-index", "inputs": [f"{rel}/{name}.yml"],
                                           "options": {"output": f"{rel}/{name}"}})
    assert job["state"] == "succeeded", job
    return f"{rel}/{name}"


@pytest.fixture(scope="module")
def parquet(ported, two):
    return _parquet(ported, *two)


# With a parquet, VisCy main's rows are (cell, frame, channel) and it samples a channel per row:
# cellfeed's bag of channels (channels_per_sample=1) serves the same items.
BAG = dict(channels_per_sample=1, tau_range=TAU)


def test_parquet_all_observations_present(ported, parquet):
    assert len(ported.predict_rows(None, cell_index_path=parquet, **BAG)) == 800


def test_parquet_column_alignment(ported, parquet, two):
    rows = ported.predict_rows(None, cell_index_path=parquet, **BAG)
    assert {"fov_name", "well", "marker"} <= set(rows.columns) and "fov" not in rows.columns
    assert set(rows.marker) == {"Phase", "GFP", "Mito"}


def test_parquet_include_wells(ported, parquet):
    rows = ported.predict_rows(None, cell_index_path=parquet, include_wells=["A/1"], **BAG)
    assert set(rows.well) == {"A/1"} and len(rows) == 400


def test_parquet_exclude_fovs(ported, parquet):
    rows = ported.predict_rows(None, cell_index_path=parquet, exclude_fovs=["A/1/0"], **BAG)
    assert "A/1/0" not in set(rows.fov_name) and len(rows) == 600


def test_parquet_train_val_split(ported, parquet):
    # VisCy builds two indexes over one parquet with two registries; here one session splits it.
    dm = ported.datamodule(None, cell_index_path=parquet, val_experiments=["exp_b"], return_index=True, **BAG)
    dm.setup("fit")
    train = {r["experiment"] for b in dm.train_dataloader() for r in b["index"]}
    val = {r["experiment"] for b in dm.val_dataloader() for r in b["index"]}
    assert train == {"exp_a"} and val == {"exp_b"}
    assert dm.info["experiments"][0]["rows"] == dm.info["experiments"][1]["rows"] == 200  # cells x frames


def test_parquet_valid_anchors_count(ported, parquet, two):
    bag = ported.anchors(None, cell_index_path=parquet, **BAG)
    cells = ported.anchors(two[1], tau_range=TAU)
    assert len(bag) == 2 * len(cells)


def test_parquet_dims_from_columns(ported, parquet):
    table = pq.read_table(ported.root / parquet).to_pandas()
    assert (table.Y_shape == 64).all() and (table.X_shape == 64).all()
    assert "position" not in table.columns


def test_parquet_border_clamping(ported):
    folder = ported.folder("border_pq")
    entry = main_entry(folder, "border_pq", ["Phase", "GFP"], ["A/1"], {"ctrl": ["A/1"]}, tracks=_border_tracks(), seed=3)
    rows = ported.predict_rows(None, cell_index_path=_parquet(ported, folder, [entry]), **BAG)
    row = _first(rows, 3)
    assert (row.meta_y_clamp, row.meta_x_clamp) == (16.0, 16.0)
    assert (rows.track_id == 4).sum() == 0 and len(rows) == 80


def test_parquet_lineage_preserved(ported, lineage):
    entry, legacy = lineage
    folder = ported.root / ported.relative(entry["data_path"]).rsplit("/", 1)[0]
    rows = ported.predict_rows(None, cell_index_path=_parquet(ported, folder, [entry]), **BAG)

    def lineages(frame):
        return frame.drop_duplicates("meta_global_track_id").set_index("meta_global_track_id").meta_lineage_id.sort_index()

    pd.testing.assert_series_equal(lineages(legacy), lineages(rows), check_names=False)


# -- column-match anchors (VisCy's gene_name; here a column cellfeed matches on: the well) ---------

def _match_experiment(ported, name: str, singles: int) -> dict:
    """Well A/1 with the standard tracks; `singles` more wells with one observation each."""
    wells = ["A/1"] + [f"B/{i}" for i in range(1, singles + 1)]
    single = custom_tracks([{"track_id": 0, "t": 0, "z": 0, "y": 32.0, "x": 32.0}])
    frames = {"A/1/0": standard_tracks(), **{f"{w}/0": single for w in wells[1:]}}
    return main_entry(ported.folder(name), name, ["Phase", "GFP"], wells, {"ctrl": wells}, tracks=frames)


MATCH = dict(positive_cell_source="lookup", positive_match_columns=["well"], tau_range=(0.5, 2.0))


def test_singleton_gene_excluded(ported):
    anchors = ported.anchors([_match_experiment(ported, "singleton", 1)], **MATCH)
    assert set(_well(anchors)) == {"A/1"}


def test_all_unique_genes_empty(ported):
    entry = _match_experiment(ported, "all_unique", 2)
    # Every well but A/1 is a singleton; with A/1 left out, no value repeats: the session is refused.
    with pytest.raises(RequestError, match="anchor"):
        ported.info([entry], include_wells=["B/1", "B/2"], **MATCH)


def test_two_observations_per_gene_survives(ported):
    two_obs = custom_tracks([{"track_id": 0, "t": 0, "z": 0, "y": 32.0, "x": 32.0},
                             {"track_id": 1, "t": 0, "z": 0, "y": 20.0, "x": 20.0}])
    single = custom_tracks([{"track_id": 0, "t": 0, "z": 0, "y": 32.0, "x": 32.0}])
    entry = main_entry(ported.folder("two_obs"), "two_obs", ["Phase", "GFP"], ["A/1", "B/1"], {"ctrl": ["A/1", "B/1"]},
                       tracks={"A/1/0": two_obs, "B/1/0": single})
    anchors = ported.anchors([entry], **MATCH)
    assert len(anchors) == 2 and set(_well(anchors)) == {"A/1"}


# -- empty valid anchors ---------------------------------------------------------------------------

def test_single_timepoint_temporal_raises(ported):
    entry = main_entry(ported.folder("single_t"), "single_t", ["Phase", "GFP"], ["A/1"], {"ctrl": ["A/1"]}, n_t=1,
                       tracks=standard_tracks(n_t=1))
    with pytest.raises(RequestError, match="no valid anchor"):
        ported.info([entry], tau_range=(0.5, 2.0))


def test_anchor_counts_match_info(ported, two):
    # Not upstream: the anchors streamed per experiment are those info counts (no hidden filter).
    anchors = ported.anchors(two[1], tau_range=TAU)
    info = ported.info(two[1], tau_range=TAU)
    assert {e["name"]: e["valid_anchors"] for e in info["experiments"]} == anchors.experiment.value_counts().to_dict()
    assert np.all(anchors.groupby(["experiment", "fov_name", "track_id", "t"]).size() == 1)
