"""Port of VisCy's `applications/dynaclr/tests/test_datamodule.py` (mehta-lab/VisCy, branch
app-dynaclr, commit 0d04b3504d6c621191e88a98ab0de7e6baa7e8e0): MultiExperimentDataModule
(hyperparameters, train/val split by experiment, the training sampler, sequential validation,
the device hook with transforms and ChannelDropout).

cellfeed's `MultiExperimentDataModule` is the client of a real server on loopback; plates are
written by iohub. VisCy's hook tests feed it hand-made tensors with `norm_meta = [None] * B`;
here the hook gets batches the server streamed, and a real Lightning `Trainer` says whether it is
training (cellfeed applies ChannelDropout only then: docs/dynaclr.md, "Differences from VisCy").
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from cellfeed.client import RemoteLoader
from tests.fixtures.viscy_ports import batch_frame, make_experiment, ported_server

PATCH = (32, 32)
FINAL = (24, 24)
TAU = (0.5, 2.0)


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with ported_server(tmp_path_factory, "viscy-datamodule") as p:
        yield p


@pytest.fixture(scope="module")
def four(ported):
    """exp_a..exp_d, one well each (A/1, B/1, C/1, D/1), condition "control"."""
    folder = ported.folder("four")
    return [make_experiment(folder, f"exp_{c}", ["Phase", "GFP"], [f"{r}/1"], {"control": [f"{r}/1"]}, seed=i)
            for i, (c, r) in enumerate(zip("abcd", "ABCD"))]


@pytest.fixture(scope="module")
def two(ported):
    folder = ported.folder("two")
    return [make_experiment(folder, "exp_a", ["Phase", "GFP"], ["A/1"], {"control": ["A/1"]}, seed=1),
            make_experiment(folder, "exp_b", ["Phase", "GFP"], ["B/1"], {"treated": ["B/1"]}, seed=2)]


def _dm(ported, entries, **kw):
    kw.setdefault("val_experiments", ["exp_b"])
    return ported.datamodule(entries, z_range=(0, 1), yx_patch_size=PATCH, final_yx_patch_size=FINAL, tau_range=TAU, **kw)


def _trainer(training: bool) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.training = training
    return trainer


def test_init_exposes_all_hyperparameters(ported, two):
    dm = _dm(ported, two, tau_decay_rate=3.0, batch_size=64, num_workers=2, experiment_aware=False, condition_balanced=False,
             leaky=0.1, temporal_enrichment=True, temporal_window_hours=3.0, temporal_global_fraction=0.5, hcl_beta=0.7,
             channel_dropout_channels=[0, 1], channel_dropout_prob=0.8, cache_pool_bytes=1024, seed=42)
    # VisCy keeps them as attributes; cellfeed as Lightning hyperparameters (saved in checkpoints).
    hp = dm.hparams
    assert tuple(hp.tau_range) == (0.5, 2.0) and hp.tau_decay_rate == 3.0
    assert hp.batch_size == 64 and hp.num_workers == 2
    assert hp.experiment_aware is False and hp.condition_balanced is False and hp.leaky == 0.1
    assert hp.temporal_enrichment is True and hp.temporal_window_hours == 3.0 and hp.temporal_global_fraction == 0.5
    assert hp.hcl_beta == 0.7
    assert hp.channel_dropout_channels == [0, 1] and hp.channel_dropout_prob == 0.8
    assert dm.channel_dropout.channels == [0, 1] and dm.channel_dropout.p == 0.8
    assert hp.cache_pool_bytes == 1024 and hp.seed == 42
    dm.setup("fit")  # and the server takes them all
    assert dm.info["train_experiments"] == ["exp_a"]


def test_train_val_split_by_experiment(ported, four):
    dm = _dm(ported, four, val_experiments=["exp_c", "exp_d"], batch_size=8, return_index=True)
    dm.setup("fit")
    assert dm.info["train_experiments"] == ["exp_a", "exp_b"] and dm.info["val_experiments"] == ["exp_c", "exp_d"]
    train = [batch_frame(b) for b in dm.train_dataloader()]
    val = [batch_frame(b) for b in dm.val_dataloader()]
    assert set().union(*(set(f.experiment) for f in train)) == {"exp_a", "exp_b"}
    assert set().union(*(set(f.experiment) for f in val)) == {"exp_c", "exp_d"}
    train_fovs = set().union(*(set(f.fov_name) for f in train))
    val_fovs = set().union(*(set(f.fov_name) for f in val))
    assert train_fovs.isdisjoint(val_fovs)


def test_train_dataloader_uses_flexible_batch_sampler(ported, four):
    # No FlexibleBatchSampler object on the client: the server plans the epoch with its semantics.
    dm = _dm(ported, four, val_experiments=["exp_d"], batch_size=8, experiment_aware=True, condition_balanced=True,
             temporal_enrichment=False, return_index=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, RemoteLoader)
    assert dm.info["sampling"] == "weighted"
    for batch in loader:
        assert batch_frame(batch).experiment.nunique() == 1  # experiment-aware


def test_val_dataloader_no_batch_sampler(ported, four):
    dm = _dm(ported, four, val_experiments=["exp_c", "exp_d"], batch_size=8, return_index=True)
    dm.setup("fit")
    loader = dm.val_dataloader()
    epochs = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        epochs.append([batch_frame(b, with_padding=True) for b in loader])
    rows = [tuple(r) for f in epochs[0] for r in f[["experiment", "fov_name", "track_id", "t"]].itertuples(index=False)]
    assert rows == sorted(rows)  # sequential: index order
    for a, b in zip(*epochs):  # and the same every epoch, positives included
        assert a.equals(b)


def _streamed_batch(dm):
    batch = next(iter(dm.train_dataloader()))
    batch.pop("index", None)
    batch.pop("positive_index", None)
    return batch


def test_on_after_batch_transfer_applies_channel_dropout_and_transforms(ported, two):
    dm = _dm(ported, two, batch_size=4, channel_dropout_channels=[1], channel_dropout_prob=0.0)
    dm.setup("fit")
    batch = _streamed_batch(dm)
    raw = batch["anchor"].clone()
    dm.trainer = _trainer(training=True)
    result = dm.on_after_batch_transfer(batch, 0)
    assert isinstance(result["anchor"], torch.Tensor) and isinstance(result["positive"], torch.Tensor)
    assert "anchor_norm_meta" not in result and "positive_norm_meta" not in result
    assert result["anchor"].shape[-2:] == FINAL
    off = ((PATCH[0] - FINAL[0]) // 2, (PATCH[1] - FINAL[1]) // 2)
    assert torch.equal(result["anchor"], raw[..., off[0] : off[0] + FINAL[0], off[1] : off[1] + FINAL[1]])  # centre crop


def test_channel_dropout_integration(ported, two):
    dm = _dm(ported, two, batch_size=4, channel_dropout_channels=[1], channel_dropout_prob=1.0)
    dm.setup("fit")
    dm.trainer = _trainer(training=True)
    train = dm.on_after_batch_transfer(_streamed_batch(dm), 0)
    assert torch.all(train["anchor"][:, 1] == 0) and torch.all(train["positive"][:, 1] == 0)
    assert not torch.all(train["anchor"][:, 0] == 0)
    dm.trainer = _trainer(training=False)
    evaluated = dm.on_after_batch_transfer(_streamed_batch(dm), 0)
    assert not torch.all(evaluated["anchor"][:, 1] == 0)
