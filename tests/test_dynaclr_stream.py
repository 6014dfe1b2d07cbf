"""MultiExperimentDataModule against a real `cellfeed serve` on loopback: training, DDP shares,
determinism, resume, reconnect, predict, and bad input failing one request only."""

from __future__ import annotations

import threading

import httpx
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from cellfeed.client import MultiExperimentDataModule, RequestError
from cellfeed.client.connection import Connection
from cellfeed.client.transforms import NormalizeSampled
from tests.conftest import ServerProcess
from tests.fixtures.plates import make_dynaclr_data

PATCH, FINAL = (32, 32), (24, 24)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dynaclr_data(tmp_path_factory.mktemp("dynaclr-stream") / "data")


@pytest.fixture(scope="module")
def server(data):
    process = ServerProcess(data.root)
    process.start()
    yield process
    process.stop()


def _dm(server, **kwargs) -> MultiExperimentDataModule:
    options = dict(
        experiments_yaml="experiments.yml",
        z_range=(0, 3),
        yx_patch_size=PATCH,
        final_yx_patch_size=FINAL,
        val_experiments=["tomm20"],
        batch_size=8,
        num_workers=2,
        return_index=True,
        server=server.flight_uri,
    )
    options.update(kwargs)
    dm = MultiExperimentDataModule(**options)
    dm.setup("fit")
    return dm


def _keys(batches: list[dict]) -> list[tuple]:
    """(experiment, fov, track, t) of every non-padding sample, in order."""
    out = []
    for b in batches:
        for row, pad in zip(b["index"], b["padding"].tolist()):
            if not pad:
                out.append((row["experiment"], row["fov_name"], row["track_id"], row["t"]))
    return out


class TinyContrastive(pl.LightningModule):
    """A small 3D encoder trained with NT-Xent on (anchor, positive); records what it was fed."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(4, 8)
        )
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def _loss(self, batch: dict) -> torch.Tensor:
        z = F.normalize(self.encoder(torch.cat([batch["anchor"], batch["positive"]])), dim=1)
        n = batch["anchor"].shape[0]
        sim = z @ z.T / 0.5
        sim.fill_diagonal_(float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
        return F.cross_entropy(sim, target)

    def training_step(self, batch, batch_idx):
        self.seen["train"].append(batch["anchor"].detach())
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(batch["anchor"].detach())
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_fit_with_validation_dropout_only_in_training(server):
    dm = _dm(
        server,
        channel_dropout_channels=[1],
        channel_dropout_prob=1.0,
        normalizations=[NormalizeSampled(["ch_0", "ch_1"], level="fov_statistics")],
        augmentations=[lambda sample: {**sample, "ch_0": sample["ch_0"] + 100.0}],
    )
    model = TinyContrastive()
    trainer = pl.Trainer(
        max_steps=6,
        limit_val_batches=3,
        val_check_interval=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 6
    train, val = model.seen["train"], model.seen["val"]
    assert len(train) == 6 and len(val) >= 3
    for anchor in train:
        assert anchor.shape == (8, 2, 3, *FINAL)
        assert (anchor[:, 1] == 0).all()  # dropped: p = 1 while training
        assert anchor[:, 0].mean() > 50  # the augmentation ran
    for anchor in val:
        assert (anchor[:, 1] != 0).any()  # never dropped in validation
        assert abs(float(anchor[:, 0].mean())) < 5  # normalised, not augmented
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


def test_ddp_ranks_get_equal_disjoint_shares(server):
    options = dict(experiment_aware=True, condition_balanced=False)  # a permutation per epoch
    ranks = [_dm(server, rank=r, world_size=2, **options) for r in range(2)]
    loaders = [dm.train_dataloader() for dm in ranks]
    assert len(loaders[0]) == len(loaders[1]) > 0
    shares = [_keys(list(loader)) for loader in loaders]
    assert not set(shares[0]) & set(shares[1])
    solo = _keys(list(_dm(server, **options).train_dataloader()))
    assert sorted(shares[0] + shares[1]) == sorted(solo) and len(set(solo)) == len(solo)
    assert len(solo) == ranks[0].info["splits"]["train"]["items"]


def test_same_seed_same_batches_and_epochs_differ(server):
    a, b = _dm(server).train_dataloader(), _dm(server).train_dataloader()
    first_a, first_b = list(a), list(b)
    assert _keys(first_a) == _keys(first_b)
    assert all(torch.equal(x["positive"], y["positive"]) for x, y in zip(first_a, first_b))
    assert a.epoch == 1
    assert _keys(list(a)) != _keys(first_a)
    other = _dm(server, seed=3).train_dataloader()
    assert _keys(list(other)) != _keys(first_a)


def test_validation_is_sequential_and_fixed(server):
    dm = _dm(server)
    val = dm.val_dataloader()
    first, second = list(val), list(val)
    assert _keys(first) == _keys(second)
    assert all(torch.equal(x["positive"], y["positive"]) for x, y in zip(first, second))
    keys = _keys(first)
    assert keys == sorted(keys, key=lambda k: (k[1], k[2], k[3])) and {k[0] for k in keys} == {"tomm20"}
    assert len(keys) == dm.info["splits"]["val"]["items"]


def test_resume_mid_epoch_from_state_dict(server):
    full = list(_dm(server).train_dataloader())
    dm = _dm(server)
    seen = []
    for i, batch in enumerate(dm.train_dataloader()):
        seen.append(batch)
        if i == 4:
            state = dm.state_dict()
            break
    fresh = _dm(server)
    fresh.load_state_dict(state)
    rest = list(fresh.train_dataloader())
    assert _keys(seen + rest) == _keys(full)
    assert torch.equal(rest[0]["positive"], full[5]["positive"])


def test_reconnects_after_the_server_is_killed_mid_epoch(serve, data):
    server = serve(data.root)
    reference = list(_dm(server).train_dataloader())
    dm = _dm(server, prefetch=1)
    got = []
    for i, batch in enumerate(dm.train_dataloader()):
        got.append(batch)
        if i == 3:
            server.kill()
            threading.Timer(1.0, server.start).start()  # same ports, no memory of the session
    assert _keys(got) == _keys(reference)
    assert all(torch.equal(x["anchor"], y["anchor"]) for x, y in zip(got, reference))


def test_predict_returns_every_cell_with_its_index(server):
    dm = MultiExperimentDataModule(
        "experiments.yml", z_range=(0, 3), yx_patch_size=PATCH, final_yx_patch_size=FINAL, batch_size=16, server=server.flight_uri
    )
    dm.setup("predict")
    batches = [dm.on_after_batch_transfer(b, 0) for b in dm.predict_dataloader()]
    assert all("positive" not in b and b["anchor"].shape[1:] == (2, 3, *FINAL) for b in batches)
    keys = _keys(batches)
    assert len(keys) == len(set(keys)) == dm.info["splits"]["predict"]["items"] == 504
    row = batches[0]["index"][0]
    assert set(row) >= {"experiment", "fov_name", "track_id", "t", "lineage_id", "hours_post_infection", "y", "x", "id"}
    assert np.isfinite(row["y"]) and row["experiment"] in ("sec61", "tomm20")
    plates = {d["path"]: d for d in httpx.get(f"{server.http_url}/v1/datasets").json() if d["format"] == "ome-zarr"}
    assert plates["sec61.zarr"]["open"] and plates["tomm20.zarr"]["open"]  # opened once, shared by sessions


def test_bad_input_fails_that_request_and_the_server_keeps_serving(server):
    conn = Connection(server.flight_uri)
    with pytest.raises(RequestError, match=r"yx_patch_size \[128, 128\] is larger than the image \(64 x 64\)"):
        conn.open_session("dynaclr", {"experiments_yaml": "experiments.yml", "z_range": [0, 3], "yx_patch_size": [128, 128]})
    with pytest.raises(RequestError, match=r"unknown key 'tau_rnge'"):
        conn.open_session("dynaclr", {"experiments_yaml": "experiments.yml", "z_range": [0, 3], "tau_rnge": [0, 1]})
    dm = _dm(server)
    assert len(next(iter(dm.train_dataloader()))["index"]) == 8


def test_sampler_fractions_through_the_server(server):
    """Experiment purity, leak size and condition balance, then temporal focus, as served."""
    dm = _dm(server, val_experiments=[], experiment_aware=True, condition_balanced=True, leaky=0.25)
    for batch in dm.train_dataloader():
        rows = batch["index"]
        main, leak = rows[:6], rows[6:]  # int(8 * 0.25) = 2 leaked rows come last
        assert len({r["experiment"] for r in main}) == 1
        assert len(leak) == 2 and {r["experiment"] for r in leak}.isdisjoint({main[0]["experiment"]})
        conditions = [r["condition"] for r in main]
        assert conditions.count("infected") == conditions.count("uninfected") == 3

    focused = _dm(server, val_experiments=[], temporal_enrichment=True, temporal_window_hours=0.5, temporal_global_fraction=0.0)
    for batch in focused.train_dataloader():
        hpi = [r["hours_post_infection"] for r in batch["index"]]
        assert max(hpi) - min(hpi) <= 1.0 + 1e-6
        conditions = [r["condition"] for r in batch["index"]]
        assert conditions.count("infected") == conditions.count("uninfected") == 4


class RecordingModel(TinyContrastive):
    """Remembers which anchors it trained on, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.keys += _keys([batch])
        return super().training_step(batch, batch_idx)


def test_lightning_checkpoint_mid_epoch_resumes_exactly(server, tmp_path):
    def fit(model, root, ckpt=None, **kw):
        trainer = pl.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=root,
            **kw,
        )
        trainer.fit(model, _dm(server), ckpt_path=ckpt)

    reference = RecordingModel()
    fit(reference, tmp_path / "ref", max_epochs=1, enable_checkpointing=False)
    first = RecordingModel()
    every5 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    fit(first, tmp_path / "a", max_steps=7, callbacks=[every5])  # "crashes" after step 7
    second = RecordingModel()
    fit(second, tmp_path / "b", ckpt=tmp_path / "ckpt" / "step=5.ckpt", max_epochs=1, enable_checkpointing=False)
    assert first.keys[: 5 * 8] + second.keys == reference.keys
