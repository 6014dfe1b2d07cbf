"""Port of VisCy main's `applications/dynaclr/tests/test_flat_parquet_e2e.py` (mehta-lab/VisCy,
branch main, commit 4b62365c0df25929bffc7f01b3bb2d1c11d69cce): the flat parquet pipeline end to
end (parquet -> registry -> index -> sampler -> dataset -> batches): channel modes, sampler
groupings, anchor/positive composition, pixel sizes.

The flat parquet is written by the server's `build-cell-index` job from a collection over iohub
plates (exp_a: Phase3D, GFP as markers Phase3D, SEC61; exp_b: Phase3D, GFP, mCherry as Phase3D,
G3BP1, pAL17); every step after it runs in a real `cellfeed serve` on loopback, so the sampler
and the dataset are seen together in the batches it streams.

Documented difference: the job indexes experiments with different channel counts, as VisCy main
does, but a session streams one [B, C, ...] tensor and refuses them (in every channel mode,
bag of channels included, for now); the pipeline tests run on the same plates with exp_b's
collection naming two of its three channels (Phase3D, GFP as G3BP1), so channel counts agree.
"""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from cellfeed.client import RequestError
from tests.fixtures.ecosystem_plates import IohubPlate
from tests.fixtures.jobs import run_job
from tests.fixtures.plates import expected_origin
from tests.fixtures.viscy_main_ports import collection_text, main_entry, main_ported_server
from tests.fixtures.viscy_ports import standard_tracks

PATCH = (32, 32)
BATCH = 4
TAU = (0.5, 4.0)
MARKERS = {"exp_a": {"Phase3D": "Phase3D", "GFP": "SEC61"}, "exp_b": {"Phase3D": "Phase3D", "GFP": "G3BP1", "mCherry": "pAL17"}}


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with main_ported_server(tmp_path_factory, "viscy-main-flat") as p:
        yield p


def _build(ported, folder, entries: list[dict], name: str) -> str:
    (folder / f"{name}.yml").write_text(collection_text(entries))
    rel = ported.relative(folder)
    job = run_job(ported.server.http_url, {"kind": "build-cell-index", "inputs": [f"{rel}/{name}.yml"],
                                           "options": {"output": f"{rel}/{name}.parquet"}})
    assert job["state"] == "succeeded", job.get("files", job)
    return f"{rel}/{name}.parquet"


def _channels(exp: str, names: list[str]) -> list[dict]:
    return [{"name": c, "marker": MARKERS[exp][c]} for c in names]


@pytest.fixture(scope="module")
def plates(ported):
    """VisCy main's flat_parquet_setup: the plates and tracks, and exp_a's collection entry."""
    folder = ported.folder("flat")
    a = main_entry(folder, "exp_a", ["Phase3D", "GFP"], ["A/1", "B/1"], {"ctrl": ["A/1"], "treated": ["B/1"]},
                   tracks=standard_tracks(n_tracks=5, n_t=10), n_t=10, interval_minutes=30.0, start_hpi=0.0, seed=1,
                   channels=_channels("exp_a", ["Phase3D", "GFP"]), pixel_size_xy_um=0.108, pixel_size_z_um=0.3)
    b = main_entry(folder, "exp_b", ["Phase3D", "GFP", "mCherry"], ["A/1"], {"ctrl": ["A/1"]},
                   tracks=standard_tracks(n_tracks=3, n_t=8), n_t=8, interval_minutes=15.0, start_hpi=1.0, seed=2,
                   channels=_channels("exp_b", ["Phase3D", "GFP", "mCherry"]), pixel_size_xy_um=0.108, pixel_size_z_um=0.3)
    return folder, a, b


@pytest.fixture(scope="module")
def mixed(ported, plates):
    """The upstream parquet: exp_a with 2 channels, exp_b with 3."""
    folder, a, b = plates
    return _build(ported, folder, [a, b], "mixed")


@pytest.fixture(scope="module")
def flat(ported, plates):
    """The parquet the pipeline tests stream: exp_b's collection names Phase3D and GFP only."""
    folder, a, b = plates
    b2 = {**b, "channels": _channels("exp_b", ["Phase3D", "GFP"])}
    return _build(ported, folder, [a, b2], "flat"), {"exp_a": a, "exp_b": b2}


def _dm(ported, flat, **kw):
    kw.setdefault("channels_per_sample", 1)
    kw.setdefault("stratify_by", None)
    kw.setdefault("return_index", True)
    dm = ported.datamodule(None, cell_index_path=flat[0], tau_range=TAU, batch_size=BATCH, yx_patch_size=PATCH,
                           reference_pixel_size_xy_um=0.108, reference_pixel_size_z_um=0.3, **kw)
    dm.setup("fit")
    return dm


def _epoch(dm) -> list[dict]:
    return list(dm.train_dataloader())


def _meta(batches: list[dict], key: str = "anchor_meta") -> pd.DataFrame:
    return pd.DataFrame([m for b in batches for m, pad in zip(b[key], b["padding"].tolist()) if not pad])


@pytest.fixture(scope="module")
def bag(ported, flat):
    dm = _dm(ported, flat)
    return dm, _epoch(dm)


# -- registry + index ------------------------------------------------------------------------------

def test_experiments_discovered(bag):
    assert {e["name"] for e in bag[0].info["experiments"]} == {"exp_a", "exp_b"}


def test_source_channel_labels_from_markers(ported, mixed, bag):
    # The upstream parquet holds every marker; a session over it reads them from its rows.
    table = pq.read_table(ported.root / mixed).to_pandas()
    assert set(table.marker) == {"Phase3D", "SEC61", "G3BP1", "pAL17"}
    assert table.groupby("experiment").channel_name.nunique().to_dict() == {"exp_a": 2, "exp_b": 3}
    labels = {m for e in bag[0].info["experiments"] for m in e["markers"]}
    assert {"Phase3D", "SEC61", "G3BP1"} <= labels


def test_pixel_sizes_round_trip(bag):
    for e in bag[0].info["experiments"]:
        assert e["pixel_size_xy_um"] == pytest.approx(0.108) and e["pixel_size_z_um"] == pytest.approx(0.3)
        assert e["scale_zyx"] == [1.0, 1.0, 1.0]  # the reference size: no rescaling


def test_valid_anchors_have_channel_name(bag, flat):
    # VisCy's per-row channel_name: here the marker names the channel; both map back to the plate.
    markers = set(_meta(bag[1]).marker)
    channels = {c for exp in ("exp_a", "exp_b") for c, m in MARKERS[exp].items() if m in markers}
    assert {"Phase3D", "GFP"} <= channels


def test_valid_anchors_have_marker(bag):
    assert {"Phase3D", "SEC61"} <= set(_meta(bag[1]).marker)


def test_every_marker_of_every_experiment_is_served(bag, flat):
    # Not upstream: in bag of channels each listed channel of each experiment is its own item.
    meta = _meta(bag[1])
    for exp, entry in flat[1].items():
        assert set(meta[meta.experiment == exp].marker) == {c["marker"] for c in entry["channels"]}


def test_different_channel_counts_are_refused(ported, mixed):
    # Documented difference (see the module docstring): refused, naming the counts.
    for cps in (1, None):
        with pytest.raises(RequestError, match=r"same number of source channels.*'exp_a': 2, 'exp_b': 3"):
            ported.info(None, cell_index_path=mixed, tau_range=TAU, channels_per_sample=cps)


# -- channel modes ---------------------------------------------------------------------------------

def test_bag_of_channels(bag):
    assert all(b["anchor"].shape[1] == 1 for b in bag[1])


def test_all_channels(ported, flat):
    # VisCy reads N rows per cell and dedups to one per cell; here a cell and frame is one item
    # whatever the channels: half the bag's items, every channel in each.
    dm = _dm(ported, flat, channels_per_sample=None)
    bag = _dm(ported, flat)
    assert 2 * dm.info["splits"]["train"]["items"] == bag.info["splits"]["train"]["items"]
    batches = _epoch(dm)
    assert all(b["anchor"].shape[1] == 2 for b in batches)
    frame = pd.DataFrame([r for b in batches for r, pad in zip(b["index"], b["padding"].tolist()) if not pad])
    assert not frame.duplicated(["experiment", "fov_name", "track_id", "t"]).any()


def test_fixed_channels(ported, flat):
    dm = _dm(ported, flat, channels_per_sample=["Phase3D"])
    batches = _epoch(dm)
    assert all(b["anchor"].shape[1] == 1 for b in batches)
    assert set(_meta(batches).marker) == {"Phase3D"}


# -- sampler groupings -----------------------------------------------------------------------------

def _groups(batches: list[dict], columns: list[str]) -> list[int]:
    return [len(pd.DataFrame(b["anchor_meta"])[~b["padding"].numpy()][columns].drop_duplicates()) for b in batches]


def test_group_by_marker(ported, flat):
    assert set(_groups(_epoch(_dm(ported, flat, batch_group_by=["marker"], seed=42)), ["marker"])) == {1}


def test_group_by_experiment(ported, flat):
    assert set(_groups(_epoch(_dm(ported, flat, batch_group_by=["experiment"], seed=42)), ["experiment"])) == {1}


def test_group_by_experiment_and_marker(ported, flat):
    batches = _epoch(_dm(ported, flat, batch_group_by=["experiment", "marker"], seed=42))
    assert set(_groups(batches, ["experiment", "marker"])) == {1}


def test_no_grouping_with_stratify_perturbation(ported, flat):
    dm = ported.datamodule(None, cell_index_path=flat[0], tau_range=TAU, batch_size=8, channels_per_sample=1,
                           batch_group_by=None, stratify_by=["perturbation"], seed=42)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        # Stratified, and both perturbations have anchors: exactly half each (largest remainder).
        assert pd.DataFrame(batch["anchor_meta"]).perturbation.value_counts().to_dict() == {"ctrl": 4, "treated": 4}


def test_marker_groups_cover_all_markers(ported, flat):
    batches = _epoch(_dm(ported, flat, batch_group_by=["marker"], seed=42))
    assert set(_meta(batches).marker) == {"Phase3D", "SEC61", "G3BP1"}


# -- anchor -> positive ----------------------------------------------------------------------------

def test_positive_same_channel_in_bag_mode(bag, flat):
    for batch in bag[1]:
        assert batch["positive"].shape[1] == 1
        assert [m["marker"] for m in batch["positive_meta"]] == [m["marker"] for m in batch["anchor_meta"]]
    _check_pixels(flat[1], bag[1][0])


def _check_pixels(entries, batch) -> None:
    """Anchor and positive are the plate's pixels of the item's channel at their frames."""
    import numpy as np

    for i, (row, meta) in enumerate(zip(batch["index"], batch["anchor_meta"])):
        if batch["padding"][i]:
            continue
        channel = next(c for c, m in MARKERS[row["experiment"]].items() if m == meta["marker"])
        plate = IohubPlate(entries[row["experiment"]]["data_path"])
        try:
            y0, x0 = expected_origin(row["y"], row["x"], PATCH)
            np.testing.assert_array_equal(batch["anchor"][i].numpy(), plate.patch(row["fov_name"], row["t"], [channel], (0, 1), y0, x0, PATCH))
            pt = int(batch["positive_index"]["t"][i])
            np.testing.assert_array_equal(batch["positive"][i].numpy(), plate.patch(row["fov_name"], pt, [channel], (0, 1), y0, x0, PATCH))
        finally:
            plate.close()


def test_positive_exists_for_all_anchors(bag):
    n = sum(int((~b["padding"]).sum()) for b in bag[1])
    assert n == bag[0].info["splits"]["train"]["items"]  # every anchor streamed with a positive


def test_sampler_to_dataset_integration(ported, flat):
    batches = _epoch(_dm(ported, flat, batch_group_by=["marker"], seed=42))
    for batch in batches:
        assert batch["anchor"].shape == batch["positive"].shape == (BATCH, 1, 1, *PATCH)
        assert len(batch["anchor_meta"]) == BATCH


def test_temporal_positive_different_timepoint(ported, flat):
    batches = _epoch(_dm(ported, flat, positive_match_columns=["lineage_id"]))
    a, p = _meta(batches), _meta(batches, "positive_meta")
    assert (a.lineage_id == p.lineage_id).all() and (a.t != p.t).all()


def test_temporal_positive_bag_of_channels_sampler_integration(ported, flat):
    batches = _epoch(_dm(ported, flat, positive_match_columns=["lineage_id"], batch_group_by=["marker"], seed=42))
    assert set(_groups(batches, ["marker"])) == {1}
    a, p = _meta(batches), _meta(batches, "positive_meta")
    assert (a.lineage_id == p.lineage_id).all() and (a.marker == p.marker).all()


def test_batch_meta_contains_marker(bag):
    meta = bag[1][0]["anchor_meta"][0]
    assert {"experiment", "perturbation", "marker"} <= set(meta)
