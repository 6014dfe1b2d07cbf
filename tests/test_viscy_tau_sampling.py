"""Port of VisCy's `applications/dynaclr/tests/test_tau_sampling.py` (mehta-lab/VisCy, branch
app-dynaclr, commit 0d04b3504d6c621191e88a98ab0de7e6baa7e8e0): variable tau with exponential decay.

VisCy calls `sample_tau(tau_min, tau_max, rng, decay_rate)` directly; cellfeed draws tau on the
server for each anchor, so here the taus are the ones a real server on loopback streamed:
`positive_t - t` of each training pair (`return_index=True`). The plate (iohub) has 40 tracks
seen in all 30 frames, 30 min per frame, and `tau_range=(0.5, 5.0)` h is (1, 10) frames; only
anchors with t <= 19 are counted, where every offset 1..10 was observed, so the draw is the bare
decay distribution (cellfeed restricts tau to offsets where the lineage was observed).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.fixtures.viscy_ports import batch_frame, make_experiment, ported_server, standard_tracks

T = 30
TAU_MIN, TAU_MAX = 1, 10


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with ported_server(tmp_path_factory, "viscy-tau") as p:
        yield p


@pytest.fixture(scope="module")
def entry(ported):
    return make_experiment(ported.folder("tau"), "tau_exp", ["Phase", "GFP"], ["A/1"], {"ctrl": ["A/1"]}, n_t=T,
                           zyx=(1, 16, 16), tracks=standard_tracks(n_tracks=40, n_t=T, y=8.0, x=8.0), seed=1)


def _pairs(ported, entry, tau_range=(0.5, 5.0), decay=2.0, epochs=(0, 1), seed=0) -> pd.DataFrame:
    batches = ported.train_batches([entry], epochs=epochs, tau_range=tau_range, tau_decay_rate=decay, seed=seed,
                                   yx_patch_size=(8, 8), batch_size=128, condition_balanced=False, experiment_aware=False)
    frame = pd.concat([batch_frame(b).assign(epoch=b["epoch"]) for b in batches], ignore_index=True)
    frame["tau"] = frame.positive_t - frame.t
    return frame


def _taus(frame: pd.DataFrame) -> np.ndarray:
    return frame[frame.t <= T - 1 - TAU_MAX].tau.to_numpy()


@pytest.fixture(scope="module")
def decay2(ported, entry):
    return _pairs(ported, entry, decay=2.0)


def test_sample_tau_within_range(decay2):
    assert decay2.tau.between(TAU_MIN, TAU_MAX).all()
    assert (decay2.positive_track_id == decay2.track_id).all()  # no divisions here: the same track


def test_sample_tau_exponential_favors_small(decay2):
    taus = _taus(decay2)
    assert len(taus) > 1000
    assert np.median(taus) < (TAU_MIN + TAU_MAX) / 2


def test_sample_tau_uniform_when_zero_decay(ported, entry):
    taus = _taus(_pairs(ported, entry, decay=0.0))
    assert abs(taus.mean() - (TAU_MIN + TAU_MAX) / 2) < 0.5


def test_sample_tau_strong_decay(ported, entry):
    taus = _taus(_pairs(ported, entry, decay=5.0))
    assert (taus <= TAU_MIN + 1).mean() > 0.5


def test_sample_tau_single_value(ported, entry):
    frame = _pairs(ported, entry, tau_range=(2.0, 2.0), epochs=(0,))  # 4 frames at 30 min
    assert (frame.tau == 4).all()


def test_sample_tau_deterministic(ported, entry, decay2):
    again = _pairs(ported, entry, decay=2.0)
    pd.testing.assert_frame_equal(again, decay2)
    other_seed = _pairs(ported, entry, decay=2.0, seed=1)
    assert not other_seed.tau.equals(decay2.tau)


def test_sample_tau_returns_int(ported, entry):
    dm = ported.datamodule([entry], tau_range=(0.5, 5.0), return_index=True, yx_patch_size=(8, 8))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert not batch["positive_index"]["t"].dtype.is_floating_point
    assert all(type(r["t"]) is int for r in batch["index"])
