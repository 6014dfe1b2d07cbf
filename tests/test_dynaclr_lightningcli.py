"""`trainer.fit` through LightningCLI and a YAML config, as VisCy trains DynaCLR, against a real
server on iohub-written plates.

The LightningModule has the shape of VisCy's ContrastiveModule: an encoder and a loss given in
the config, `example_input_array` set from `example_input_array_shape` (so Lightning's model
summary pushes a bare tensor through `on_after_batch_transfer`), `forward` returning
(features, projections), an NT-Xent loss over `cat(anchor, positive)` with labels
`[0..B-1] * 2`. Two epochs with validation.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import nn

from tests.fixtures.ecosystem_plates import SOURCE, make_ecosystem_data

PATCH, FINAL, Z_RANGE, BATCH = (32, 32), (24, 24), (1, 4), 8


class SmallEncoder(nn.Module):
    """A tiny 3D conv stem, pooled: (features, projections) as VisCy's ContrastiveEncoder returns."""

    def __init__(self, in_channels: int = 2, features: int = 8, projection: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_channels, features, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.projection = nn.Linear(features, projection)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.stem(x)
        return features, self.projection(features)


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR) over embeddings with labels: samples sharing a label are positives.

    The calling convention of pytorch-metric-learning's `NTXentLoss(embeddings, labels)`.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = F.normalize(embeddings, dim=1)
        sim = z @ z.T / self.temperature
        self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
        positive = (labels[:, None] == labels[None, :]) & ~self_mask
        sim = sim.masked_fill(self_mask, float("-inf"))
        log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
        return -(log_prob[positive]).mean()


class ContrastiveModule(LightningModule):
    """VisCy's ContrastiveModule, reduced to what the data path touches."""

    def __init__(
        self,
        encoder: nn.Module,
        loss_function: nn.Module,
        lr: float = 1e-3,
        example_input_array_shape: tuple[int, ...] = (1, 2, 3, 24, 24),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "loss_function"])
        self.model = encoder
        self.loss_function = loss_function
        self.lr = lr
        self.example_input_array = torch.rand(*example_input_array_shape)
        self.forward_shapes: list[tuple[int, ...]] = []
        self.train_losses: list[float] = []
        self.val_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.forward_shapes.append(tuple(x.shape))
        return self.model(x)

    def _loss(self, batch: dict) -> torch.Tensor:
        anchor, positive = batch["anchor"], batch["positive"]
        _, anchor_projection = self(anchor)
        _, positive_projection = self(positive)
        embeddings = torch.cat([anchor_projection, positive_projection])
        labels = torch.arange(anchor.shape[0], device=anchor.device).repeat(2)
        return self.loss_function(embeddings, labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.train_losses.append(float(loss))
        self.log("loss/train", loss, batch_size=batch["anchor"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self._loss(batch)
        self.val_losses.append(float(loss))
        self.log("loss/val", loss, batch_size=batch["anchor"].shape[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def _config(server_uri: str, root: Path) -> dict:
    here = __name__
    return {
        "seed_everything": 42,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "limit_train_batches": 4,
            "limit_val_batches": 2,
            "num_sanity_val_steps": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(root),
        },
        "model": {
            "class_path": f"{here}.ContrastiveModule",
            "init_args": {
                "encoder": {"class_path": f"{here}.SmallEncoder", "init_args": {"in_channels": len(SOURCE)}},
                "loss_function": {"class_path": f"{here}.NTXentLoss", "init_args": {"temperature": 0.5}},
                "lr": 0.01,
                "example_input_array_shape": [2, len(SOURCE), Z_RANGE[1] - Z_RANGE[0], *FINAL],
            },
        },
        "data": {
            "class_path": "cellfeed.client.MultiExperimentDataModule",
            "init_args": {
                "experiments_yaml": "experiments.yml",
                "z_range": list(Z_RANGE),
                "yx_patch_size": list(PATCH),
                "final_yx_patch_size": list(FINAL),
                "val_experiments": ["iohub_05_sharded"],
                "tau_range": [0.5, 1.5],
                "batch_size": BATCH,
                "num_workers": 2,
                "channel_dropout_channels": [1],
                "channel_dropout_prob": 0.5,
                "normalizations": [
                    {
                        "class_path": "cellfeed.client.transforms.NormalizeSampled",
                        "init_args": {"keys": ["ch_0", "ch_1"], "level": "fov_statistics"},
                    }
                ],
                "server": server_uri,
            },
        },
    }


def test_lightningcli_fit_two_epochs_with_validation(serve, tmp_path):
    data = make_ecosystem_data(tmp_path / "data", ("iohub-0.4", "iohub-0.5-sharded"))
    server = serve(data.root)
    config = tmp_path / "fit.yml"
    config.write_text(yaml.safe_dump(_config(server.flight_uri, tmp_path / "run"), sort_keys=False))

    cli = LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["fit", "--config", str(config)],
        save_config_kwargs={"overwrite": True},
    )
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    assert trainer.state.finished and trainer.current_epoch == 2 and trainer.global_step == 8
    assert type(model).__name__ == "ContrastiveModule" and type(dm).__name__ == "MultiExperimentDataModule"
    assert dm.hparams.server == server.flight_uri and dm.normalizations[0].level == "fov_statistics"
    # The model summary ran the example input (a bare tensor) through the DataModule's hook.
    assert model.forward_shapes[0] == (2, len(SOURCE), Z_RANGE[1] - Z_RANGE[0], *FINAL)
    bare, other = torch.zeros(2, 3), {"x": torch.ones(1)}
    assert dm.on_after_batch_transfer(bare, 0) is bare and dm.on_after_batch_transfer(other, 0) is other
    batches = model.forward_shapes[1:]
    assert batches and all(s == (BATCH, len(SOURCE), Z_RANGE[1] - Z_RANGE[0], *FINAL) for s in batches)
    assert len(model.train_losses) == 8
    assert len(model.val_losses) == 1 + 2 * 2  # the sanity check, then two batches after each epoch
    assert all(torch.isfinite(torch.tensor(model.train_losses + model.val_losses)))
    assert torch.isfinite(trainer.callback_metrics["loss/val"])
    assert (tmp_path / "run" / "config.yaml").is_file()  # LightningCLI saved the resolved config
