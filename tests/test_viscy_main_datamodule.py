"""Port of VisCy main's `applications/dynaclr/tests/test_datamodule.py` (mehta-lab/VisCy, branch
main, commit 4b62365c0df25929bffc7f01b3bb2d1c11d69cce): MultiExperimentDataModule on a cell index
parquet (hyperparameters, the experiment and FOV splits, the training sampler and its DDP
topology, the positive options); and validation drawn with the training sampler, as main's
`val_dataloader` does.

The parquet is written by the server's `build-cell-index` job from a collection over iohub
plates; sessions open on a real `cellfeed serve` on loopback. VisCy's `train_dataset.index.tracks`
is what a split streams (`return_index=True`); its sampler object is the server's plan, seen in
the batches.
"""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from cellfeed.client.loader import RemoteLoader
from tests.fixtures.jobs import run_job
from tests.fixtures.viscy_main_ports import collection_text, main_entry, main_ported_server

CHANNELS = ["Phase", "GFP"]
COMMON = dict(z_window=1, yx_patch_size=(32, 32), final_yx_patch_size=(24, 24), tau_range=(0.5, 2.0), batch_size=8)
KEY = ["experiment", "fov_name", "track_id", "t"]


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with main_ported_server(tmp_path_factory, "viscy-main-datamodule") as p:
        yield p


def _parquet(ported, name: str, specs: list[tuple[str, str, str, int]]) -> str:
    """Experiments (name, well, perturbation, FOVs), their collection, and the parquet the job builds."""
    folder = ported.folder(name)
    entries = [main_entry(folder, exp, CHANNELS, [well], {pert: [well]}, fovs_per_well=n) for exp, well, pert, n in specs]
    (folder / "collection.yml").write_text(collection_text(entries))
    rel = ported.relative(folder)
    job = run_job(ported.server.http_url, {"kind": "build-cell-index", "inputs": [f"{rel}/collection.yml"],
                                           "options": {"output": f"{rel}/cell_index.parquet"}})
    assert job["state"] == "succeeded", job
    return f"{rel}/cell_index.parquet"


@pytest.fixture(scope="module")
def four(ported):
    return _parquet(ported, "four", [(f"exp_{c}", f"{c.upper()}/1", "control", 1) for c in "abcd"])


@pytest.fixture(scope="module")
def two(ported):
    return _parquet(ported, "two", [("exp_a", "A/1", "control", 1), ("exp_b", "B/1", "treated", 1)])


@pytest.fixture(scope="module")
def multi_fov(ported):
    return _parquet(ported, "multi-fov", [("exp_a", "A/1", "control", 5), ("exp_b", "B/1", "treated", 5)])


def _dm(ported, parquet: str, **kw):
    return ported.datamodule(None, cell_index_path=parquet, **{**COMMON, **kw})


def _frames(loader, with_padding: bool = False) -> list[pd.DataFrame]:
    out = []
    for batch in loader:
        frame = pd.DataFrame(batch["index"])
        frame["padding"] = batch["padding"].numpy()
        out.append(frame if with_padding else frame[~frame.padding])
    return out


def _rows(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=KEY)


def test_init_exposes_all_hyperparameters(ported, two):
    dm = _dm(ported, two, val_experiments=["exp_b"], split_ratio=0.7, tau_decay_rate=3.0, batch_size=64, num_workers=2,
             batch_group_by=None, stratify_by=None, leaky=0.1, temporal_enrichment=True, temporal_window_hours=3.0,
             temporal_global_fraction=0.5, channel_dropout_channels=[0, 1], channel_dropout_prob=0.8,
             cache_pool_bytes=1024, seed=42)
    # VisCy keeps them as attributes; cellfeed as Lightning hyperparameters (saved in checkpoints).
    hp = dm.hparams
    assert hp.split_ratio == 0.7 and tuple(hp.tau_range) == (0.5, 2.0) and hp.tau_decay_rate == 3.0
    assert hp.batch_size == 64 and hp.num_workers == 2
    assert hp.batch_group_by is None and hp.stratify_by is None and hp.leaky == 0.1
    assert hp.temporal_enrichment is True and hp.temporal_window_hours == 3.0 and hp.temporal_global_fraction == 0.5
    assert hp.channel_dropout_channels == [0, 1] and hp.channel_dropout_prob == 0.8
    assert hp.cache_pool_bytes == 1024 and hp.seed == 42
    dm.setup("fit")  # and the server takes them all
    assert dm.info["train_experiments"] == ["exp_a"] and dm.info["batch_group_by"] == [] and dm.info["stratify_by"] == []


def test_train_val_split_by_experiment(ported, four):
    dm = _dm(ported, four, val_experiments=["exp_c", "exp_d"], return_index=True)
    dm.setup("fit")
    train, val = _rows(_frames(dm.train_dataloader())), _rows(_frames(dm.val_dataloader()))
    assert set(train.experiment) == {"exp_a", "exp_b"} and set(val.experiment) == {"exp_c", "exp_d"}
    assert set(zip(train.experiment, train.fov_name)).isdisjoint(zip(val.experiment, val.fov_name))


def test_train_dataloader_uses_flexible_batch_sampler(ported, two):
    # No sampler object on the client: the server plans the epoch; its options are in info and
    # in the batches (grouped by experiment, stratified by perturbation, no enrichment).
    dm = _dm(ported, two, val_experiments=["exp_b"], batch_group_by="experiment", stratify_by="perturbation",
             temporal_enrichment=False, return_index=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, RemoteLoader)
    assert dm.info["batch_group_by"] == ["experiment"] and dm.info["stratify_by"] == ["perturbation"]
    assert dm.info["sampling"] == "weighted" and dm.hparams.temporal_enrichment is False
    for frame in _frames(loader):
        assert frame.experiment.nunique() == 1


def test_reads_world_size_and_rank_from_trainer(ported, two):
    dm = _dm(ported, two, val_experiments=["exp_b"], batch_group_by="experiment", stratify_by="perturbation",
             temporal_enrichment=False)
    dm.trainer = SimpleNamespace(world_size=4, global_rank=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert (loader.world_size, loader.rank) == (4, 2)
    single = _dm(ported, two, val_experiments=["exp_b"], batch_group_by="experiment", stratify_by="perturbation",
                 temporal_enrichment=False)
    single.setup("fit")
    assert len(loader) == -(-len(single.train_dataloader()) // 4)  # a quarter of the batches, rounded up


def test_fov_split_no_overlap(ported, multi_fov):
    dm = _dm(ported, multi_fov, val_experiments=[], split_ratio=0.6, seed=42, return_index=True)
    dm.setup("fit")
    train, val = _rows(_frames(dm.train_dataloader())), _rows(_frames(dm.val_dataloader()))
    assert set(zip(train.experiment, train.fov_name)).isdisjoint(zip(val.experiment, val.fov_name))
    assert set(train.experiment) == {"exp_a", "exp_b"} and set(val.experiment) == {"exp_a", "exp_b"}
    assert dm.info["split_mode"] == "fov"


def test_fov_split_ratio_1_no_val(ported, multi_fov):
    dm = _dm(ported, multi_fov, val_experiments=[], split_ratio=1.0)
    dm.setup("fit")
    assert dm.info["splits"]["train"]["items"] > 0
    # VisCy: val_dataset is None; here no val loader (an empty list, which Lightning skips).
    assert dm.info["splits"]["val"]["items"] == 0 and dm.val_dataloader() == []


def test_fov_split_default_val_experiments(ported, multi_fov):
    dm = ported.datamodule(None, cell_index_path=multi_fov, return_index=True, **{**COMMON, "split_ratio": 0.8})
    dm.setup("fit")
    train, val = _rows(_frames(dm.train_dataloader())), _rows(_frames(dm.val_dataloader()))
    assert len(train) and len(val)
    assert set(zip(train.experiment, train.fov_name)).isdisjoint(zip(val.experiment, val.fov_name))


def test_positive_cell_source_self_stores_on_dm(ported, two):
    dm = _dm(ported, two, val_experiments=["exp_b"], positive_cell_source="self")
    assert dm.hparams.positive_cell_source == "self"
    dm.setup("fit")
    assert dm.info["positive_cell_source"] == "self"


def test_positive_match_columns_stored_on_dm(ported, two):
    dm = _dm(ported, two, val_experiments=["exp_b"], positive_match_columns=["perturbation"])
    assert dm.hparams.positive_match_columns == ["perturbation"]


def test_positive_channel_source_any_stored(ported, two):
    dm = _dm(ported, two, val_experiments=["exp_b"], positive_channel_source="any", channels_per_sample=1)
    assert dm.hparams.positive_channel_source == "any"
    dm.setup("fit")  # the server takes it (it draws the positive's channel among the valid ones)


def test_self_positive_all_tracks_are_valid_anchors(ported, two):
    dm = _dm(ported, two, val_experiments=["exp_b"], positive_cell_source="self", return_index=True,
             batch_group_by=None, stratify_by=None)
    dm.setup("fit")
    anchors = _rows(_frames(dm.train_dataloader()))
    # VisCy counts unique cell_id (one per cell and frame): exp_a's 5 tracks x 10 frames.
    assert len(anchors) == len(anchors.drop_duplicates(KEY)) == 50


# -- validation through the training sampler (main's val_dataloader) --------------------------------

@pytest.fixture(scope="module")
def mixed(ported):
    """Three experiments, each with a control and a treated well of 2 FOVs; exp_b and exp_c validate."""
    folder = ported.folder("mixed")
    entries = [main_entry(folder, exp, CHANNELS, ["A/1", "B/1"], {"control": ["A/1"], "treated": ["B/1"]}, fovs_per_well=2)
               for exp in ("exp_a", "exp_b", "exp_c")]
    return collection_text(entries)


def test_val_batches_are_composed_by_the_training_sampler(ported, mixed):
    # VisCy main: val_dataloader builds the FlexibleBatchSampler with the training options
    # (temporal enrichment off). Grouped by experiment and stratified by perturbation: every
    # val batch is one experiment, half control and half treated, as training batches are.
    dm = ported.datamodule(mixed, **COMMON, val_experiments=["exp_b", "exp_c"], batch_group_by="experiment", stratify_by="perturbation",
                           temporal_enrichment=True, return_index=True, seed=5)
    dm.setup("fit")
    val = _frames(dm.val_dataloader(), with_padding=True)
    assert val and set(_rows(val).experiment) == {"exp_b", "exp_c"}
    for frame in val:
        assert frame.experiment.nunique() == 1
        assert frame.condition.value_counts().to_dict() == {"control": 4, "treated": 4}
    # In index order the first batches would be one perturbation only; the flexible draw is not.
    assert any(f[KEY].values.tolist() != sorted(f[KEY].values.tolist()) for f in val)


def test_val_batches_are_the_same_every_epoch(ported, mixed):
    dm = ported.datamodule(mixed, **COMMON, val_experiments=["exp_b", "exp_c"], batch_group_by="experiment", return_index=True, seed=5)
    dm.setup("fit")
    loader = dm.val_dataloader()
    epochs = []
    for epoch in (0, 1, 2):
        loader.set_epoch(epoch)
        epochs.append([(b["anchor"].clone(), b["positive"].clone(), pd.DataFrame(b["index"])) for b in loader])
    for other in epochs[1:]:  # batches and positives alike: val loss stays comparable across epochs
        assert len(other) == len(epochs[0])
        for (a, p, f), (a2, p2, f2) in zip(epochs[0], other):
            assert f.equals(f2) and bool((a == a2).all()) and bool((p == p2).all())


def test_val_covers_every_val_anchor_once_without_weights(ported, mixed):
    # Unweighted (no strata): the val draw is a permutation of the val anchors, as for training.
    dm = ported.datamodule(mixed, **COMMON, val_experiments=["exp_b", "exp_c"], stratify_by=None, return_index=True, seed=5)
    dm.setup("fit")
    val = _rows(_frames(dm.val_dataloader()))
    assert len(val) == dm.info["splits"]["val"]["items"] == len(val.drop_duplicates(KEY))


def test_a_bag_of_one_channel_trains_with_the_default_dropout(ported, two):
    # VisCy main's channel_dropout_prob defaults to 0.0: with one channel per sample there is no
    # channel 1 to drop, so the main form's defaults must not refuse the first training batch.
    dm = _dm(ported, two, val_experiments=["exp_b"], channels_per_sample=1)
    assert dm.channel_dropout.p == 0.0
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=True, world_size=1, global_rank=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["anchor"].shape[1] == 1
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["anchor"].shape[1] == 1 and torch.isfinite(out["anchor"]).all()
