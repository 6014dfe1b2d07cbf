"""Small LightningModules for the recipes in this folder (examples/README.md).

Each is as small as it can be while touching every part of its DataModule's batches; none is a
model worth training for its own sake. Layers whose width depends on the data (genes, embedding
size) are built in `setup()`, after the DataModule's `setup()` has read those facts from the
server, so a recipe never repeats them. (`setup()` runs before a checkpoint is restored, so
`--ckpt_path` finds the layers in place.)
"""

from __future__ import annotations

import zlib

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


# -- perturbation: protoplast's form and the cell-load drop-in ------------------------------------
class ControlToPerturbed(pl.LightningModule):
    """Predict each perturbed cell's log1p expression from its matched control and the target's
    embedding: `perturbed = control + mlp([control, pert_emb])`.

    Reads protoplast's batches (`PerturbationDataModule`: sparse COO `[B, S, G]`, `pert_emb [B, D]`)
    and cell-load's (`cell_load...PerturbationDataModule`: dense `[B*S, G]`, `pert_emb [B*S, D]`);
    the gene and embedding widths come from the DataModule's `get_var_dims()`.

    Args:
        hidden: width of the MLP's hidden layer.
        lr: Adam's learning rate.
    """

    def __init__(self, hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Module | None = None

    def setup(self, stage: str) -> None:
        if self.net is None:
            dims = self.trainer.datamodule.get_var_dims()
            genes, emb = int(dims["input_dim"]), int(dims["pert_dim"])
            self.net = nn.Sequential(nn.Linear(genes + emb, self.hparams.hidden), nn.ReLU(), nn.Linear(self.hparams.hidden, genes))

    @staticmethod
    def _cells(x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x.to_dense() if x.is_sparse else x)

    def _loss(self, batch: dict) -> torch.Tensor:
        ctrl, pert, emb = self._cells(batch["ctrl_cell_emb"]), self._cells(batch["pert_cell_emb"]), batch["pert_emb"]
        if ctrl.dim() == 3:  # protoplast: [B, S, G] cells, one embedding per item
            emb = emb[:, None, :].expand(-1, ctrl.shape[1], -1)
        predicted = ctrl + self.net(torch.cat([ctrl, emb], dim=-1))
        return F.mse_loss(predicted, pert)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, batch_size=len(batch["pert_name"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), batch_size=len(batch["pert_name"]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


# -- DynaCLR: the shape of VisCy's ContrastiveModule -------------------------------------------------
class SmallEncoder(nn.Module):
    """A tiny 3D conv stem, pooled: `(features, projections)`, as VisCy's ContrastiveEncoder returns.

    Args:
        in_channels: source channels of a patch.
        features: width of the pooled features.
        projection: width of the projection head's output (what the loss sees).
    """

    def __init__(self, in_channels: int = 2, features: int = 16, projection: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_channels, features, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.projection = nn.Linear(features, projection)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.stem(x)
        return features, self.projection(features)


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR) over embeddings with labels: samples sharing a label are positives.

    The calling convention of pytorch-metric-learning's `NTXentLoss(embeddings, labels)`, which
    VisCy's ContrastiveModule uses.

    Args:
        temperature: softmax temperature of the cosine similarities.
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


class ContrastiveModule(pl.LightningModule):
    """VisCy's ContrastiveModule, reduced to what the data path touches: an encoder and a loss
    from the config, `forward` giving (features, projections), NT-Xent over
    `cat(anchor_projection, positive_projection)` with labels `[0..B-1] * 2`.

    Args:
        encoder: the network, `x [B, C, Z, Y, X] -> (features, projections)`.
        loss_function: `loss(embeddings, labels)`.
        lr: AdamW's learning rate.
        example_input_array_shape: shape of the input Lightning's model summary pushes through
            (a bare tensor, which the DataModule's `on_after_batch_transfer` passes through).
    """

    def __init__(
        self,
        encoder: nn.Module,
        loss_function: nn.Module,
        lr: float = 1e-3,
        example_input_array_shape: tuple[int, ...] = (1, 2, 5, 32, 32),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "loss_function"])
        self.model = encoder
        self.loss_function = loss_function
        self.example_input_array = torch.rand(*example_input_array_shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(x)

    def _loss(self, batch: dict) -> torch.Tensor:
        anchor, positive = batch["anchor"], batch["positive"]
        _, anchor_projection = self(anchor)
        _, positive_projection = self(positive)
        labels = torch.arange(anchor.shape[0], device=anchor.device).repeat(2)
        return self.loss_function(torch.cat([anchor_projection, positive_projection]), labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("loss/train", loss, batch_size=batch["anchor"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("loss/val", self._loss(batch), batch_size=batch["anchor"].shape[0], sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


# -- table: cell sentences of a preprocessed parquet dataset ----------------------------------------
class TopGenesRegressor(pl.LightningModule):
    """From a cell sentence's first `max_genes` genes (highest expressed first), predict each
    gene's log1p value from its token and the cell's mean token (a toy masked-value model).

    Reads `TableDataModule(columns=["genes", "values"])` batches: `genes` a list of gene-name
    lists, `values` one flat tensor with `values_offsets [B+1]`. Gene names are hashed into
    `buckets` token ids (crc32: the same in every process), so no vocabulary is needed.

    Args:
        max_genes: genes read per cell.
        buckets: size of the hashed token table.
        dim: token width.
        lr: Adam's learning rate.
    """

    def __init__(self, max_genes: int = 32, buckets: int = 4096, dim: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokens = nn.Embedding(buckets, dim)
        self.head = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        K, n = self.hparams.max_genes, len(batch["genes"])
        ids = torch.zeros(n, K, dtype=torch.long)
        target = torch.zeros(n, K)
        mask = torch.zeros(n, K, dtype=torch.bool)
        offsets, values = batch["values_offsets"], batch["values"]
        for i, genes in enumerate(batch["genes"]):
            k = min(K, len(genes))
            ids[i, :k] = torch.tensor([zlib.crc32(g.encode()) % self.hparams.buckets for g in genes[:k]])
            target[i, :k] = values[offsets[i] : offsets[i] + k].float()
            mask[i, :k] = True
        return ids.to(self.device), torch.log1p(target).to(self.device), mask.to(self.device)

    def _loss(self, batch: dict) -> torch.Tensor:
        ids, target, mask = self._inputs(batch)
        tokens = self.tokens(ids)
        weights = mask.unsqueeze(-1).float()
        context = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
        predicted = self.head(torch.cat([tokens, context[:, None, :].expand_as(tokens)], dim=-1)).squeeze(-1)
        return F.mse_loss(predicted[mask], target[mask])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, batch_size=len(batch["genes"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), batch_size=len(batch["genes"]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
