"""Port of VisCy's `packages/viscy-data/tests/test_sampler.py` (mehta-lab/VisCy, branch app-dynaclr,
commit 0d04b3504d6c621191e88a98ab0de7e6baa7e8e0): FlexibleBatchSampler (experiment-aware
batches, condition balance, leak, small groups, determinism, length, DDP, temporal enrichment).

VisCy's tests hand the sampler a DataFrame of anchors; cellfeed's sampler runs in the server, so
each table becomes iohub plates whose valid anchors have the same experiments, conditions and
HPI (tau is one frame, so every frame but the last is an anchor), and the batches are those a
real server on loopback streams (`return_index=True`). A batch is identified by its rows
(experiment, FOV, track, t).

Documented differences (docs/dynaclr.md): an unweighted epoch is every anchor once, so `len` is
`sum_e ceil(N_e / B)` rather than `N // B`, and a short experiment's last batch is completed
with repeats flagged `padding` instead of a replacement-sampling warning; condition balance also
holds with temporal enrichment. The column guards have no counterpart (the server always has
those columns); refusals of out-of-range options stand for them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellfeed.client import RequestError
from tests.fixtures.viscy_ports import batch_frame, make_experiment, ported_server, standard_tracks

SMALL = dict(zyx=(1, 16, 16), seed=7)
KEY = ["experiment", "fov_name", "track_id", "t"]


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with ported_server(tmp_path_factory, "viscy-sampler") as p:
        yield p


def _experiment(folder, name, conditions, n_tracks=5, n_t=11, interval=30.0):
    """One well per condition (A/1, A/2, ...), n_tracks tracks seen in n_t frames: n_tracks * (n_t - 1) anchors each."""
    wells = {c: [f"A/{i + 1}"] for i, c in enumerate(conditions)}
    return make_experiment(folder, name, ["Phase", "GFP"], [w for ws in wells.values() for w in ws], wells, n_t=n_t,
                           tracks=standard_tracks(n_tracks=n_tracks, n_t=n_t, y=8.0, x=8.0), interval_minutes=interval, **SMALL)


@pytest.fixture(scope="module")
def two_experiments(ported):
    """2 experiments x 2 conditions x 50 anchors (200)."""
    folder = ported.folder("two")
    return [_experiment(folder, n, ["infected", "uninfected"]) for n in ("exp_A", "exp_B")]


@pytest.fixture(scope="module")
def three_experiments(ported):
    folder = ported.folder("three")
    return [_experiment(folder, n, ["ctrl", "treated"]) for n in ("exp_X", "exp_Y", "exp_Z")]


@pytest.fixture(scope="module")
def three_conditions(ported):
    return [_experiment(ported.folder("conditions"), "exp_single", ["ctrl", "low_moi", "high_moi"])]


@pytest.fixture(scope="module")
def small_group(ported):
    """tiny_exp: 5 anchors; big_exp: 100."""
    folder = ported.folder("small")
    return [_experiment(folder, "tiny_exp", ["ctrl"], n_tracks=1, n_t=6), _experiment(folder, "big_exp", ["ctrl"], n_tracks=10)]


@pytest.fixture(scope="module")
def temporal(ported):
    """2 experiments x 2 conditions x 100 anchors, HPI 0, 2, ..., 48 (2 h per frame)."""
    folder = ported.folder("temporal")
    return [_experiment(folder, n, ["infected", "uninfected"], n_tracks=4, n_t=26, interval=120.0) for n in ("exp_A", "exp_B")]


def _tau(entries) -> tuple[float, float]:
    interval = entries[0]["interval_minutes"]
    return (interval / 60, interval / 60)  # one frame


def _batches(ported, entries, epoch=0, rank=None, world_size=None, **kw):
    kw.setdefault("experiment_aware", True)
    kw.setdefault("condition_balanced", False)
    kw.setdefault("seed", 42)
    dm = ported.datamodule(entries, yx_patch_size=(8, 8), tau_range=_tau(entries), return_index=True, rank=rank,
                           world_size=world_size, **kw)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.set_epoch(epoch)
    frames = [batch_frame(b, with_padding=True) for b in loader]
    assert len(frames) == len(loader)
    return frames


def _ids(frames) -> list[list[tuple]]:
    return [[tuple(r) for r in f[KEY].itertuples(index=False)] for f in frames]


# -- experiment-aware ------------------------------------------------------------------------------

def test_batch_indices_from_single_experiment(ported, two_experiments):
    frames = _batches(ported, two_experiments, batch_size=8)
    assert frames and all(f.experiment.nunique() == 1 for f in frames)


def test_all_experiments_appear(ported, three_experiments):
    frames = _batches(ported, three_experiments, batch_size=8)
    assert set().union(*(set(f.experiment) for f in frames)) == {"exp_X", "exp_Y", "exp_Z"}


def test_experiment_aware_false_allows_mixing(ported, two_experiments):
    frames = _batches(ported, two_experiments, batch_size=8, experiment_aware=False)
    assert any(f.experiment.nunique() > 1 for f in frames)


# -- condition balance -----------------------------------------------------------------------------

def test_two_conditions_balanced(ported, two_experiments):
    for f in _batches(ported, two_experiments, batch_size=16, condition_balanced=True):
        fractions = f.condition.value_counts(normalize=True)
        assert len(fractions) == 2 and fractions.between(0.3, 0.7).all()
        assert (fractions == 0.5).all()  # cellfeed: exact shares (largest remainder)


def test_three_conditions_balanced(ported, three_conditions):
    for f in _batches(ported, three_conditions, batch_size=18, condition_balanced=True):
        counts = f.condition.value_counts()
        assert len(counts) == 3 and (counts / 18).between(0.13, 0.54).all()
        assert (counts == 6).all()


def test_condition_balanced_false_no_constraint(ported, two_experiments):
    assert _batches(ported, two_experiments, batch_size=8, condition_balanced=False)


# -- leak ------------------------------------------------------------------------------------------

def test_leaky_zero_no_cross_experiment(ported, two_experiments):
    assert all(f.experiment.nunique() == 1 for f in _batches(ported, two_experiments, batch_size=10, leaky=0.0))


def test_leaky_injects_cross_experiment(ported, two_experiments):
    frames = _batches(ported, two_experiments, batch_size=10, leaky=0.2)
    assert frames
    for f in frames:
        counts = f.experiment.value_counts()
        assert len(counts) == 2 and counts.min() == int(10 * 0.2)  # VisCy: <= 4; cellfeed: exactly int(B * leaky)


def test_leaky_ignored_when_not_experiment_aware(ported, two_experiments):
    frames = _batches(ported, two_experiments, batch_size=10, experiment_aware=False, leaky=0.5)
    assert frames and all(len(f) == 10 for f in frames)


# -- small groups ----------------------------------------------------------------------------------

def test_small_group_does_not_crash(ported, small_group):
    frames = _batches(ported, small_group, batch_size=32)
    assert frames and all(len(f) == 32 for f in frames)


def test_small_group_emits_warning(ported, small_group):
    # Documented difference: VisCy warns and samples the 5 tiny_exp anchors with replacement; in
    # cellfeed's epoch each of them comes once and the batch is completed with repeats flagged
    # `padding` (no warning: nothing is resampled silently, the repeats are marked).
    frames = _batches(ported, small_group, batch_size=32)
    tiny = next(f for f in frames if (f.experiment == "tiny_exp").all())
    real = tiny[~tiny.padding]
    assert len(real) == 5 and len(set(map(tuple, real[KEY].to_numpy()))) == 5
    assert tiny.padding.sum() == 27


# -- determinism -----------------------------------------------------------------------------------

def test_same_seed_same_result(ported, two_experiments):
    kw = dict(batch_size=8, condition_balanced=True, seed=123)
    assert _ids(_batches(ported, two_experiments, **kw)) == _ids(_batches(ported, two_experiments, **kw))


def test_set_epoch_changes_sequence(ported, two_experiments):
    assert _ids(_batches(ported, two_experiments, batch_size=8, epoch=0)) != _ids(_batches(ported, two_experiments, batch_size=8, epoch=1))


def test_set_epoch_same_epoch_same_result(ported, two_experiments):
    assert _ids(_batches(ported, two_experiments, batch_size=8, epoch=5)) == _ids(_batches(ported, two_experiments, batch_size=8, epoch=5))


# -- batches and length ----------------------------------------------------------------------------

def test_yields_list_of_int(ported, two_experiments):
    for f in _batches(ported, two_experiments, batch_size=8):
        assert len(f) == 8
        assert all(isinstance(v, int) for v in f.track_id.tolist() + f.t.tolist())


def test_len_returns_expected_value(ported, two_experiments):
    # Documented difference: VisCy's len is 200 // 8 = 25 (the epoch need not cover every anchor);
    # cellfeed's unweighted experiment-aware epoch is each experiment's anchors once: 2 * ceil(100 / 8).
    frames = _batches(ported, two_experiments, batch_size=8)
    assert len(frames) == 2 * math.ceil(100 / 8) == 26
    real = [r for ids, f in zip(_ids(frames), frames) for r, pad in zip(ids, f.padding) if not pad]
    assert len(real) == len(set(real)) == 200


def test_len_with_replicas(ported, two_experiments):
    frames = _batches(ported, two_experiments, batch_size=8, rank=0, world_size=2)
    assert len(frames) == 13  # VisCy: ceil(25 / 2) = 13; cellfeed: 26 / 2


# -- DDP -------------------------------------------------------------------------------------------

def test_two_ranks_disjoint_batches(ported, two_experiments):
    r0 = _batches(ported, two_experiments, batch_size=8, rank=0, world_size=2)
    r1 = _batches(ported, two_experiments, batch_size=8, rank=1, world_size=2)
    assert len(r0) + len(r1) >= 25 and _ids(r0) != _ids(r1)
    real = lambda frames: {r for ids, f in zip(_ids(frames), frames) for r, pad in zip(ids, f.padding) if not pad}  # noqa: E731
    assert real(r0).isdisjoint(real(r1))


def test_ddp_same_seed_deterministic(ported, two_experiments):
    kw = dict(batch_size=8, rank=0, world_size=2, epoch=3)
    assert _ids(_batches(ported, two_experiments, **kw)) == _ids(_batches(ported, two_experiments, **kw))


def test_two_ranks_cover_all_batches(ported, two_experiments):
    r0 = _batches(ported, two_experiments, batch_size=8, rank=0, world_size=2)
    r1 = _batches(ported, two_experiments, batch_size=8, rank=1, world_size=2)
    assert len(r0) + len(r1) == 26 and len(r0) == len(r1)  # VisCy: 25, split 13 + 12
    real = [r for frames in (r0, r1) for ids, f in zip(_ids(frames), frames) for r, pad in zip(ids, f.padding) if not pad]
    assert len(real) == len(set(real)) == 200  # together: every anchor once


def test_two_ranks_disjoint_by_interleaving(ported, two_experiments):
    full = _ids(_batches(ported, two_experiments, batch_size=8, rank=0, world_size=1))
    assert _ids(_batches(ported, two_experiments, batch_size=8, rank=0, world_size=2)) == full[0::2]
    assert _ids(_batches(ported, two_experiments, batch_size=8, rank=1, world_size=2)) == full[1::2]


def test_set_epoch_changes_ddp_sequences(ported, two_experiments):
    kw = dict(batch_size=8, rank=0, world_size=2)
    assert _ids(_batches(ported, two_experiments, epoch=0, **kw)) != _ids(_batches(ported, two_experiments, epoch=1, **kw))


def test_set_epoch_reproducible(ported, two_experiments):
    kw = dict(batch_size=8, rank=0, world_size=2, epoch=0)
    assert _ids(_batches(ported, two_experiments, **kw)) == _ids(_batches(ported, two_experiments, **kw))


def test_len_with_ddp(ported, two_experiments):
    assert len(_batches(ported, two_experiments, batch_size=8, rank=0, world_size=2)) == 13


# -- temporal enrichment ---------------------------------------------------------------------------

def _enriched(ported, temporal, **kw):
    kw.setdefault("temporal_window_hours", 2.0)
    return _batches(ported, temporal, batch_size=20, temporal_enrichment=True, **kw)


def test_enriched_batches_concentrate_near_focal(ported, temporal):
    fractions = []
    for f in _enriched(ported, temporal, temporal_global_fraction=0.3):
        hpi = f.hours_post_infection.to_numpy()
        values, counts = np.unique(hpi, return_counts=True)
        fractions.append(np.mean(np.abs(hpi - values[counts.argmax()]) <= 2.0))
    assert np.mean(fractions) >= 0.55


def test_global_fraction_one_no_enrichment(ported, temporal):
    assert _enriched(ported, temporal, temporal_global_fraction=1.0)


def test_global_fraction_zero_all_focal(ported, temporal):
    for f in _enriched(ported, temporal, temporal_global_fraction=0.0):
        assert np.ptp(f.hours_post_infection.to_numpy()) <= 4.01


def test_enrichment_false_no_temporal_filtering(ported, two_experiments):
    assert _batches(ported, two_experiments, batch_size=10, temporal_enrichment=False)


# test_enrichment_requires_hpi_column: no counterpart (the server computes hours_post_infection
# for every row from start_hpi and interval_minutes).


def test_enrichment_combined_with_condition_balance(ported, temporal):
    frames = _enriched(ported, temporal, temporal_window_hours=4.0, temporal_global_fraction=0.3, condition_balanced=True)
    assert frames
    for f in frames:
        assert len(f) == 20
        assert (f.condition.value_counts() == 10).all()  # documented difference: both apply


# -- validation guards -----------------------------------------------------------------------------
# VisCy's guards check that the anchor table has the columns a feature needs; cellfeed's index
# always has them. What the server does check are the options themselves:

@pytest.mark.parametrize("option, value", [("leaky", 1.0), ("leaky", -0.1), ("temporal_global_fraction", 1.5),
                                           ("temporal_window_hours", -1.0)])
def test_sampler_options_out_of_range_are_refused(ported, two_experiments, option, value):
    with pytest.raises(RequestError, match=option):
        _batches(ported, two_experiments, batch_size=8, **{option: value})
