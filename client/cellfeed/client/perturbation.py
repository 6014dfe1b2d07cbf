"""PerturbationDataModule: protoplast's/cell-load's perturbation loader, fed by a cellfeed server.

Batches follow protoplast's collated schema: `pert_cell_emb`/`ctrl_cell_emb` sparse COO
[B, S, G] float32, `pert_emb` [B, D], `pert_name`/`cell_type` numpy str [B], one-hots [B, S, ·],
`pert_idx` [B, 1], and optional barcodes [B, S]. Paths are server-side, inside its data root.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from cellfeed.client.connection import Session
from cellfeed.client.datamodule import RemoteDataModule
from cellfeed.client.loader import RemoteLoader
from cellfeed.wire import codec, csr


STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class PerturbationBatchDecoder:
    """Turns one record batch into protoplast's batch dict, with no copy of the CSR buffers."""

    def __init__(self, info: dict[str, Any], embeddings: torch.Tensor | None, controls: pa.Table | None = None) -> None:
        self.S = int(info["group_size_S"])
        self.G = int(info["n_vars"])
        self.targets = np.asarray(info["targets"], dtype=object)
        self.cell_types = np.asarray(info["cell_types"], dtype=object)
        self.n_cell_types = len(self.cell_types)
        self.n_batches = len(info["batches"])
        self.embeddings = embeddings
        self.n_targets = len(self.targets)
        # controls sent once with the session: batches name their rows (`ctrl_row`)
        self.controls = codec.csr_from_columns(controls.combine_chunks().to_batches()[0], "ctrl") if controls is not None else None

    def __call__(self, rb: pa.RecordBatch) -> dict[str, Any]:
        S = self.S
        B = rb.num_rows // S
        target = torch.from_numpy(rb.column("target").indices.to_numpy()[::S].astype(np.int64))
        cell_type = rb.column("cell_type").indices.to_numpy()
        batch = rb.column("batch").indices.to_numpy()
        out: dict[str, Any] = {
            "pert_cell_emb": self._coo(*codec.csr_from_columns(rb, "pert"), B),
            "ctrl_cell_emb": self._coo(*self._controls(rb), B),
            "pert_emb": self.embeddings[target] if self.embeddings is not None else F.one_hot(target, self.n_targets).float(),
            "pert_name": self.targets[target.numpy()].astype(str),
            "cell_type": self.cell_types[cell_type[::S]].astype(str),
            "cell_type_onehot": F.one_hot(torch.from_numpy(cell_type.astype(np.int64)), self.n_cell_types).float().view(B, S, -1),
            "batch_onehot": F.one_hot(torch.from_numpy(batch.astype(np.int64)), self.n_batches).float().view(B, S, -1),
            "pert_idx": target.view(B, 1),
        }
        if "pert_barcode" in rb.schema.names:
            out["pert_cell_barcode"] = np.asarray(rb.column("pert_barcode").to_numpy(zero_copy_only=False), dtype=str).reshape(B, S)
            out["ctrl_cell_barcode"] = np.asarray(rb.column("ctrl_barcode").to_numpy(zero_copy_only=False), dtype=str).reshape(B, S)
        return out

    def _controls(self, rb: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.controls is None:
            return codec.csr_from_columns(rb, "ctrl")
        rows = rb.column("ctrl_row").to_numpy().astype(np.int64)
        return csr.gather([(self.controls, rows)])

    def _coo(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, B: int) -> torch.Tensor:
        # numpy, not torch, for the index arithmetic: torch's intra-op threads spin after each
        # parallel op and starve the server and the training step on small machines.
        counts = np.diff(indptr)
        cells = np.arange(len(counts))
        coords = np.empty((3, len(indices)), dtype=np.int64)
        coords[0] = np.repeat(cells // self.S, counts)
        coords[1] = np.repeat(cells % self.S, counts)
        coords[2] = indices
        return torch.sparse_coo_tensor(
            torch.from_numpy(coords), torch.from_numpy(data), (B, self.S, self.G), check_invariants=False
        )


class PerturbationDataModule(RemoteDataModule):
    """Remote drop-in for protoplast's PerturbationDataModule (plus `server`, `seed`, DDP args).

    `num_workers` is the number of parallel Flight streams per loader, read in threads.
    """

    kind = "perturbation"

    def __init__(
        self,
        files: list[str] | None = None,
        pert_embedding_file: str | None = None,
        config_path: str | None = None,
        num_workers: int | None = None,
        prefetch_factor: int = 2,
        cell_type_label: str = "cell_type",
        target_label: str = "target_gene",
        control_label: str = "non-targeting",
        batch_label: str = "batch_var",
        group_size_S: int = 32,
        barcodes: bool = False,
        block_size: int = 2048,
        batch_size: int = 64,
        server: str = "grpc://127.0.0.1:8815",
        token: str | None = None,
        seed: int = 0,
        match_controls_by_batch: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        window_blocks: int = 8,
        prefix_batches_with_file: bool = False,
        control_table_max_bytes: int = 256 << 20,
    ) -> None:
        super().__init__(token)
        self.save_hyperparameters(ignore=["token"])
        self._loader_opts: dict[str, Any] = {}

    # -- setup -------------------------------------------------------------------------------
    def session_config(self) -> dict[str, Any]:
        """The session JSON (docs/protocol/perturbation.md); also reads the TOML's [loader] table."""
        hp = self.hparams
        config: dict[str, Any] = {
            "files": hp.files,
            "pert_embedding_file": hp.pert_embedding_file,
            "cell_type_label": hp.cell_type_label,
            "target_label": hp.target_label,
            "control_label": hp.control_label,
            "batch_label": hp.batch_label,
            "group_size_S": hp.group_size_S,
            "batch_size": hp.batch_size,
            "block_size": hp.block_size,
            "window_blocks": hp.window_blocks,
            "barcodes": hp.barcodes,
            "seed": hp.seed,
            "match_controls_by_batch": hp.match_controls_by_batch,
            "prefix_batches_with_file": hp.prefix_batches_with_file,
            "control_table_max_bytes": hp.control_table_max_bytes,
        }
        if hp.config_path is not None:
            text = Path(hp.config_path).read_text()
            try:
                self._loader_opts = tomllib.loads(text).get("loader", {}) or {}
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{hp.config_path}: invalid TOML: {exc}") from None
            config["toml"] = text
            config["files"] = None
        return config

    def on_session(self, session: Session) -> None:
        table = session.tables.get("pert_emb")
        embeddings = torch.from_numpy(codec.tensor_from_column(table.column("embedding")).copy()) if table is not None else None
        self.decoder = PerturbationBatchDecoder(session.info, embeddings, session.tables.get("controls"))

    @property
    def num_streams(self) -> int:
        """`num_workers`, else TOML [loader] num_workers, else 2."""
        workers = self.hparams.num_workers
        return max(1, int(workers if workers is not None else self._loader_opts.get("num_workers", 2)))

    @property
    def prefetch(self) -> int:
        factor = self.hparams.prefetch_factor
        return int(factor if factor is not None else self._loader_opts.get("prefetch_factor", 2))

    # -- facts about the data ------------------------------------------------------------------
    @property
    def var_names(self) -> list[str]:
        return self.info["var_names"]

    @property
    def cell_type_vocab(self) -> list[str]:
        return self.info["cell_types"]

    @property
    def batch_vocab(self) -> list[str]:
        return self.info["batches"]

    @property
    def target_vocab(self) -> list[str]:
        return self.info["targets"]

    @property
    def embedding_dim(self) -> int:
        return int(self.info["embedding_dim"])

    def get_var_dims(self) -> dict[str, Any]:
        """cell-load's summary of dimensions."""
        G = int(self.info["n_vars"])
        return {
            "input_dim": G,
            "gene_dim": G,
            "output_dim": G,
            "pert_dim": self.embedding_dim,
            "batch_dim": len(self.batch_vocab),
            "cell_type_dim": len(self.cell_type_vocab),
            "gene_names": self.var_names,
        }

    # -- loaders (train_dataloader and checkpoints: RemoteDataModule) --------------------------
    def val_dataloader(self) -> RemoteLoader | list:
        return self.loader_if_any("val")

    def test_dataloader(self) -> RemoteLoader | list:
        return self.loader_if_any("test")

    def predict_dataloader(self) -> RemoteLoader | list:
        return self.loader_if_any("test")
