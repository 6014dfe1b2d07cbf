"""Port of VisCy's `applications/dynaclr/tests/test_experiment.py` (mehta-lab/VisCy, branch
app-dynaclr, commit 0d04b3504d6c621191e88a98ab0de7e6baa7e8e0): ExperimentConfig and
ExperimentRegistry.

VisCy builds an `ExperimentRegistry` in process; here each check is a session opened on a real
cellfeed server on loopback over plates written by iohub: a registry VisCy accepts is a session
cellfeed opens (its `info` lists the experiments, tau in frames, source channels), one VisCy
refuses is a session cellfeed refuses (`RequestError` naming the field). The channel map is
checked on the pixels themselves: channel i of each plate holds the value i + 1.

Differences (docs/dynaclr.md, "Differences from VisCy"): cellfeed refuses a condition naming a
well the plate lacks, and a tau range with no offset of at least one frame (VisCy warns); the
registry is checked when a session opens, so the plates here have tracks.
"""

from __future__ import annotations

import numpy as np
import pytest

from cellfeed.client import RequestError
from tests.fixtures.viscy_ports import make_experiment, ported_server, yaml_text

WELLS = ["A/1", "B/1"]


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with ported_server(tmp_path_factory, "viscy-experiment") as p:
        yield p


@pytest.fixture(scope="module")
def exp_a(ported):
    """Experiment A: channels Phase, GFP, RFP; source Phase, RFP; 30 min per frame."""
    return make_experiment(ported.folder("exp_a"), "exp_a", ["Phase", "GFP", "RFP"], WELLS,
                           {"uninfected": ["A/1"], "infected": ["B/1"]}, source_channel=["Phase", "RFP"],
                           interval_minutes=30.0, channel_value=True, seed=None)


@pytest.fixture(scope="module")
def exp_b(ported):
    """Experiment B: channels Phase, Mito; source Phase, Mito; 15 min per frame."""
    return make_experiment(ported.folder("exp_b"), "exp_b", ["Phase", "Mito"], ["A/1"], {"control": ["A/1"]},
                           source_channel=["Phase", "Mito"], interval_minutes=15.0, channel_value=True, seed=None)


def _refused(ported, entries, pattern: str, **kw) -> None:
    with pytest.raises(RequestError, match=pattern):
        ported.info(entries, **kw)


def _with(entry: dict, **changes) -> dict:
    out = {**entry, **changes}
    return {k: v for k, v in out.items() if v is not ...}


def _channel_values(ported, entries, **kw) -> dict[str, list[int]]:
    """Per experiment, which plate channel (1-based value) each source-channel position streams."""
    out: dict[str, list[int]] = {}
    for batch in ported.train_batches(entries, **kw):
        anchor = batch["anchor"].numpy()
        for i, row in enumerate(batch["index"]):
            values = [int(v) for v in np.unique(anchor[i].reshape(anchor.shape[1], -1), axis=1)[:, 0]]
            assert out.setdefault(row["experiment"], values) == values
    return out


# -- ExperimentConfig ----------------------------------------------------------------------------

def test_experiment_config_creation(ported, exp_a):
    exp = ported.info([exp_a])["experiments"][0]
    assert exp["name"] == "exp_a"
    assert exp["channel_names"] == ["Phase", "GFP", "RFP"]
    assert exp["source_channel"] == ["Phase", "RFP"]
    assert sorted(exp["conditions"]) == ["infected", "uninfected"]
    assert exp["interval_minutes"] == 30.0


def test_experiment_config_defaults(ported, exp_a):
    entry = _with(exp_a, interval_minutes=..., start_hpi=...)
    exp = ported.info([entry])["experiments"][0]
    assert exp["interval_minutes"] == 30.0
    assert exp["start_hpi"] == 0.0
    assert exp["organelle"] == "" and exp["date"] == "" and exp["moi"] == 0.0


# -- ExperimentRegistry --------------------------------------------------------------------------

def test_registry_channel_maps(ported, exp_a):
    # source ["Phase", "RFP"] in ["Phase", "GFP", "RFP"]: position 0 -> channel 0, position 1 -> channel 2
    assert _channel_values(ported, [exp_a]) == {"exp_a": [1, 3]}


def test_registry_channel_maps_different_names(ported, exp_a, exp_b):
    assert _channel_values(ported, [exp_a, exp_b]) == {"exp_a": [1, 3], "exp_b": [1, 2]}


def test_registry_source_channel_not_in_channel_names(ported, exp_a):
    _refused(ported, [_with(exp_a, source_channel=["Phase", "DAPI"])], "DAPI")


def test_registry_mismatched_source_channel_count(ported, exp_a, exp_b):
    _refused(ported, [exp_a, _with(exp_b, source_channel=["Phase"])], r"source.channel")


def test_registry_duplicate_names(ported, exp_a):
    _refused(ported, [exp_a, dict(exp_a)], r"exp_a.*(more than once|[Dd]uplicate)")


def test_registry_empty_experiments(ported):
    _refused(ported, "experiments: []\n", "non-empty")


def test_registry_zarr_validation(ported, exp_a):
    info = ported.info([exp_a])
    assert info["patch_shape"][0] == 2  # num_source_channels
    assert info["channel_keys"] == ["ch_0", "ch_1"]


def test_registry_zarr_channel_mismatch(ported, exp_a):
    _refused(ported, [_with(exp_a, channel_names=["Phase", "GFP", "Mito"], source_channel=["Phase"])], "channel")


def test_registry_data_path_not_exists(ported, exp_a):
    missing = exp_a["data_path"].replace("exp_a.zarr", "nonexistent.zarr")
    _refused(ported, [_with(exp_a, data_path=missing)], "nonexistent.zarr")


def test_from_yaml(ported, exp_a):
    """A YAML file inside the data root, named by its path (relative to the root)."""
    folder = ported.folder("yaml")
    entry = _with(exp_a, name="yaml_exp", source_channel=["Phase", "GFP"], start_hpi=3.0)
    (folder / "experiments.yml").write_text(yaml_text([entry]))
    dm = ported.datamodule(str((folder / "experiments.yml").relative_to(ported.root)))
    dm.setup("fit")
    (exp,) = dm.info["experiments"]
    assert exp["name"] == "yaml_exp" and exp["start_hpi"] == 3.0
    assert _channel_values(ported, [entry]) == {"yaml_exp": [1, 2]}


def test_tau_range_frames_30min(ported, exp_a):
    assert ported.info([exp_a], tau_range=(0.5, 2.0))["experiments"][0]["tau_range_frames"] == [1, 4]


def test_tau_range_frames_15min(ported, exp_b):
    assert ported.info([exp_b], tau_range=(0.5, 2.0))["experiments"][0]["tau_range_frames"] == [2, 8]


def test_tau_range_frames_warns_few_frames(ported, exp_a):
    # Documented difference: VisCy warns that (0.0, 0.0) h is fewer than 2 frames and goes on with
    # no anchors; cellfeed refuses the session, naming the experiment and the frames.
    _refused(ported, [exp_a], r"exp_a.*\[0, 0\] frames", tau_range=(0.0, 0.0))


def test_get_experiment(ported, exp_a, exp_b):
    info = ported.info([exp_a, exp_b])
    by_name = {e["name"]: e for e in info["experiments"]}
    assert by_name["exp_a"]["interval_minutes"] == 30.0 and by_name["exp_b"]["interval_minutes"] == 15.0


def test_get_experiment_not_found(ported, exp_a, exp_b):
    # No lookup API on the client: the place a name is looked up is val_experiments.
    _refused(ported, [exp_a, exp_b], "nonexistent", val_experiments=["nonexistent"])


def test_negative_interval_minutes(ported, exp_a):
    _refused(ported, [_with(exp_a, interval_minutes=-5.0)], "interval_minutes")


def test_empty_condition_wells(ported, exp_a):
    _refused(ported, [_with(exp_a, condition_wells={})], "condition_wells")


def test_condition_naming_a_well_the_plate_lacks_is_refused(ported, exp_b):
    # Documented difference: VisCy's fixtures list infected: ["B/1"] on a plate with only A/1 and
    # VisCy accepts it (the well is silently empty); cellfeed refuses it, naming the well.
    _refused(ported, [_with(exp_b, condition_wells={"control": ["A/1"], "infected": ["B/1"]})], "B/1")
