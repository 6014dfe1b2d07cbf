"""PerturbationDataModule inside Lightning: fit, checkpoint mid-epoch, resume; YAML configuration."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
import numpy as np
import torch
import yaml

from cellfeed.client import PerturbationDataModule


class TinyModel(pl.LightningModule):
    """Predicts the mean perturbed profile of a group from its controls and target embedding."""

    def __init__(self, n_genes: int = 50, emb_dim: int = 8) -> None:
        super().__init__()
        self.net = torch.nn.Linear(n_genes + emb_dim, n_genes)
        self.seen: list[str] = []

    def training_step(self, batch, _):
        ctrl = batch["ctrl_cell_emb"].to_dense().mean(1)
        pert = batch["pert_cell_emb"].to_dense().mean(1)
        self.seen.extend(batch["pert_cell_barcode"].ravel().tolist())
        pred = self.net(torch.cat([ctrl, batch["pert_emb"]], dim=-1))
        return torch.nn.functional.mse_loss(pred, pert)

    def validation_step(self, batch, _):
        ctrl = batch["ctrl_cell_emb"].to_dense().mean(1)
        self.log("val_loss", self.net(torch.cat([ctrl, batch["pert_emb"]], -1)).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def make_dm(server, **kw) -> PerturbationDataModule:
    return PerturbationDataModule(
        files=["k562.h5ad", "rpe1.h5ad"], pert_embedding_file="emb.pt", group_size_S=4, batch_size=8,
        barcodes=True, server=server.flight_uri, **kw
    )


def trainer(tmp_path, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **kw)


def test_fit_runs_every_batch_of_each_epoch(pert_server, tmp_path):
    dm, model = make_dm(pert_server), TinyModel()
    trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(model, dm)
    n = len(dm.train_dataloader())
    assert len(model.seen) == 2 * n * 8 * 4
    first, second = model.seen[: n * 32], model.seen[n * 32 :]
    assert first != second  # Lightning's set_epoch reached the server's plan


def test_checkpoint_mid_epoch_resumes_exactly(pert_server, tmp_path):
    reference = TinyModel()
    trainer(tmp_path / "ref", max_epochs=1, enable_checkpointing=False).fit(reference, make_dm(pert_server))

    first = TinyModel()
    every5 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    trainer(tmp_path / "a", max_steps=7, callbacks=[every5]).fit(first, make_dm(pert_server))  # "crashes" after 7

    second = TinyModel()
    trainer(tmp_path / "b", max_epochs=1, enable_checkpointing=False).fit(
        second, make_dm(pert_server), ckpt_path=tmp_path / "ckpt" / "step=5.ckpt"
    )
    assert first.seen[: 5 * 32] + second.seen == reference.seen


def test_datamodule_from_yaml_hyperparameters(pert_server):
    text = yaml.safe_dump({"files": ["k562.h5ad"], "group_size_S": 2, "batch_size": 3, "seed": 5, "server": pert_server.flight_uri})
    dm = PerturbationDataModule(**yaml.safe_load(text))
    assert dm.session is None  # no side effects in __init__
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["pert_cell_emb"].shape) == (3, 2, 50)
    assert dm.hparams.seed == 5 and np.all(batch["cell_type"] == "k562")
