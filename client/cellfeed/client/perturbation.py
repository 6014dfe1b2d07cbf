"""PerturbationDataModule: protoplast's/cell-load's perturbation loader, fed by a cellfeed server.

Batches follow protoplast's collated schema: `pert_cell_emb`/`ctrl_cell_emb` sparse COO
[B, S, G] float32, `pert_emb` [B, D], `pert_name`/`cell_type` numpy str [B], one-hots [B, S, ·],
`pert_idx` [B, 1], and optional barcodes [B, S]. Paths are server-side, inside its data root.
"""

from __future__ import annotations

import tomllib
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cellfeed.client.connection import Session
from cellfeed.client.datamodule import RemoteDataModule, ServerAddress
from cellfeed.client.loader import RemoteLoader
from cellfeed.wire import codec, csr
from cellfeed.wire import perturbation as wire

# values per chunk of the cell-coordinate work (512 KiB of int64): it stays in L2 between passes
CHUNK_VALUES = 1 << 16


LOADER_KEYS = {"num_workers", "prefetch_factor"}  # protoplast's [loader] table, read on the client

class PerturbationBatchDecoder:
    """Turns one record batch into protoplast's batch dict, with no copy of the CSR buffers.

    Index work is numpy, not torch: torch's intra-op threads spin after each parallel op and
    starve the server and the training step on small machines; numpy also holds the GIL less.
    """

    def __init__(
        self,
        info: dict[str, Any],
        embeddings: torch.Tensor | None,
        controls: pa.Table | None = None,
        genes: np.ndarray | None = None,
    ) -> None:
        self.S = int(info["group_size_S"])
        # the width of the rows served: X's genes, or obsm[embed_key]'s (cell-load)
        self.G = int(info.get("input_dim", info["n_vars"]))
        # `genes` (hvg_file): the gene axis becomes these positions of var_names, in this order
        self.gene_map: np.ndarray | None = None
        self.out_G = self.G
        if genes is not None:
            self.gene_map = np.full(self.G, -1, dtype=np.int64)
            self.gene_map[genes] = np.arange(len(genes))
            self.out_G = len(genes)
        self.targets = np.asarray(info["targets"], dtype=object)
        self.cell_types = np.asarray(info["cell_types"], dtype=object)
        n_targets = len(self.targets)
        self.embeddings = (
            embeddings.numpy().astype(np.float32, copy=False) if embeddings is not None else np.eye(n_targets, dtype=np.float32)
        )
        self.cell_type_eye = np.eye(len(self.cell_types), dtype=np.float32)
        self.batch_eye = np.eye(len(info["batches"]), dtype=np.float32)
        # controls sent once with the session: batches name their rows (`ctrl_row`). Kept as
        # sent (narrow gene indices): each batch reads half the bytes it would as int64.
        self.controls = None
        # prefix -> the controls table's rows of that matrix: CSR (indptr, indices, data) or dense
        self.control_rows: dict[str, Any] = {}
        if controls is not None:
            table = controls.combine_chunks().to_batches()[0]
            for prefix in wire.CONTROL_MATRICES:
                if wire.dense(prefix) in table.schema.names:
                    self.control_rows[prefix] = codec.tensor_from_column(table.column(wire.dense(prefix)))
                elif wire.csr_data(prefix) in table.schema.names:
                    self.control_rows[prefix] = codec.csr_from_columns(table, prefix)
            ctrl = self.control_rows.get(wire.CTRL)
            self.controls = ctrl if isinstance(ctrl, tuple) else None
        self.widths = {wire.PERT: self.G, wire.CTRL: self.G}
        for name, width in (info.get("counts_dims") or {}).items():
            self.widths[name] = int(width)

    def __call__(self, rb: pa.RecordBatch) -> dict[str, Any]:
        B = rb.num_rows // self.S
        out = {"pert_cell_emb": self._pert(rb, B), "ctrl_cell_emb": self._ctrl(rb, B)}
        out.update(self.meta(rb))
        return out

    def dense(self, rb: pa.RecordBatch, prefix: str) -> np.ndarray:
        """Rows of matrix `prefix` ("pert", "ctrl", "pert_counts", "ctrl_counts") as a dense
        float32 [rows, width] array: a dense column as sent, CSR rows scattered in one pass, a
        control's rows gathered from the controls table by `ctrl_row`."""
        names = rb.schema.names
        if wire.dense(prefix) in names:  # a view of the batch's buffer (a shared-memory slot's, say), as sent
            return codec.tensor_from_column(rb.column(wire.dense(prefix)))
        if wire.csr_data(prefix) in names:
            indptr, indices, data = codec.csr_from_columns(rb, prefix)
        else:
            table = self.control_rows[prefix]  # a control matrix sent once: the batch names rows
            rows = rb.column(wire.CTRL_ROW).to_numpy()
            if not isinstance(table, tuple):
                if len(rows) and (rows.min() < 0 or rows.max() >= len(table)):
                    raise ValueError(f"perturbation batch: ctrl_row outside the {len(table)} rows of the controls table")
                return table[rows]  # a new array
            indptr, indices, data = csr.gather([(table, rows)])
        width = self.widths.get(prefix, self.G)
        csr.check(indptr, indices, data, width, "perturbation batch")
        return csr.to_dense(indptr, indices, data, width)

    def meta(self, rb: pa.RecordBatch) -> dict[str, Any]:
        """Everything of a batch but the cells' rows: names, one-hots, mask, barcodes."""
        S = self.S
        B = rb.num_rows // S
        target = rb.column(wire.TARGET).indices.to_numpy()[::S].astype(np.int64)
        cell_type = rb.column(wire.CELL_TYPE).indices.to_numpy()
        exp_batch = rb.column(wire.EXP_BATCH).indices.to_numpy()
        out: dict[str, Any] = {
            "pert_emb": torch.from_numpy(self.embeddings[target]),
            "pert_name": self.targets[target].astype(str),
            "cell_type": self.cell_types[cell_type[::S]].astype(str),
            "cell_type_onehot": torch.from_numpy(self.cell_type_eye[cell_type].reshape(B, S, -1)),
            "batch_onehot": torch.from_numpy(self.batch_eye[exp_batch].reshape(B, S, -1)),
            "pert_idx": torch.from_numpy(target.reshape(B, 1)),
            # True: a real cell of this pass; False: padding (a repeat that fills the [B, S] shape)
            "cell_mask": torch.from_numpy(rb.column(wire.CELL_MASK).to_numpy(zero_copy_only=False).reshape(B, S)),
        }
        if wire.PERT_BARCODE in rb.schema.names:
            out["pert_cell_barcode"] = np.asarray(rb.column(wire.PERT_BARCODE).to_numpy(zero_copy_only=False), dtype=str).reshape(B, S)
            out["ctrl_cell_barcode"] = np.asarray(rb.column(wire.CTRL_BARCODE).to_numpy(zero_copy_only=False), dtype=str).reshape(B, S)
        return out

    def _pert(self, rb: pa.RecordBatch, B: int) -> torch.Tensor:
        return self._coo(*codec.csr_from_columns(rb, wire.PERT), B)

    def _ctrl(self, rb: pa.RecordBatch, B: int) -> torch.Tensor:
        if self.controls is None:
            return self._coo(*codec.csr_from_columns(rb, wire.CTRL), B)
        return self._coo(*csr.gather([(self.controls, rb.column(wire.CTRL_ROW).to_numpy())]), B)

    def _cell_coordinates(self, indptr: np.ndarray) -> np.ndarray:
        """A [3, nnz] int64 array whose first two rows hold each value's (item, cell).

        Memory traffic bounds this, not arithmetic (the server shares the memory bus): the item
        row is written once, from the items' row pointers; the cell row a few items at a time,
        as row numbers reduced mod S while the chunk is still in the core's cache."""
        S = self.S
        indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        coords = np.empty((3, int(indptr[-1])), dtype=np.int64)
        csr.row_numbers(indptr[::S], out=coords[0])
        n_items = (len(indptr) - 1) // S
        step = max(1, CHUNK_VALUES * n_items // max(1, coords.shape[1]))  # items per chunk
        for b0 in range(0, n_items, step):
            rows = indptr[b0 * S : min(n_items, b0 + step) * S + 1]
            csr.row_numbers(rows, out=coords[1])  # numbered from the chunk's first row, an item's first
            cell = coords[1, rows[0] : rows[-1]]
            if S & (S - 1) == 0:
                np.bitwise_and(cell, S - 1, out=cell)
            else:
                np.remainder(cell, S, out=cell)
        return coords

    def _coo(self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, B: int) -> torch.Tensor:
        """The [B, S, G] sparse COO tensor of B*S CSR rows (values not copied)."""
        csr.check(indptr, indices, values, self.G, "perturbation batch")  # before any write by these numbers
        coords = self._cell_coordinates(indptr)
        if self.gene_map is not None:  # hvg_file: keep the listed genes' values, renumbered
            gene = self.gene_map[indices]
            keep = gene >= 0
            coords, values = coords[:, keep], values[keep]
            coords[2] = gene[keep]
        else:
            coords[2] = indices
        return torch.sparse_coo_tensor(
            torch.from_numpy(coords), torch.from_numpy(values), (B, self.S, self.out_G), check_invariants=False
        )


def _read_gene_list(path: str) -> list[str]:
    """hvg_file: one gene name per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"hvg_file {path!r}: cannot read it: {exc.strerror or exc}") from None
    genes = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not genes:
        raise ValueError(f"hvg_file {path!r} lists no genes (one gene name per line)")
    repeated = sorted(g for g, n in Counter(genes).items() if n > 1)
    if repeated:
        raise ValueError(f"hvg_file {path!r} lists genes more than once: {', '.join(repeated[:5])}")
    return genes


class PerturbationDataModule(RemoteDataModule):
    """Remote drop-in for protoplast's PerturbationDataModule (plus `server`, `seed`, DDP args).

    The arguments are protoplast's, in its order, then cellfeed's. `num_workers` is the number of
    parallel Flight streams per loader, read in threads. `shared_memory`: the CSR rows come in
    shared-memory slots rather than over gRPC when the server runs on this host (None: when
    available; True: required; False: never).

    Controls matched by batch: `match_controls_by_batch=True`, or protoplast's `use_batches=True`,
    or cell-load's `basal_mapping_strategy="batch"` (any one; given together they must agree).
    `hvg_file` (a local text file, one gene name per line; protoplast accepts it and never applies
    it): the batches' gene axis becomes those genes, in the file's order (`var_names` says so);
    the server still sends every gene, the client drops the others. `toml_schema`: how `config_path` is read ("auto": cell-load's schema if
    the TOML has a [training] table, else protoplast's; see docs/protocol/perturbation.md).
    Other keyword arguments (protoplast's `sparse_key`, `pin_memory`, ...) have no effect here:
    each is warned about and listed in `ignored_kwargs`.

    Args:
        files: server-side .h5ad files (inside its --data-root), sorted by target then batch; or
            give `config_path`.
        pert_embedding_file: server-side torch.load-able dict target -> vector (`pert_emb`);
            None: one-hot targets.
        hvg_file: local text file, one gene name per line: the batches' gene axis becomes those
            genes, in that order (the client drops the others).
        config_path: local TOML (protoplast's or cell-load's schema) naming the datasets and
            splits; its paths are server-side. Its [loader] table may set num_workers and
            prefetch_factor.
        num_workers: parallel Flight streams per loader, read in threads; None: the TOML's
            [loader] num_workers, else 2.
        prefetch_factor: decoded batches queued per stream; None: the TOML's [loader]
            prefetch_factor, else 2.
        cell_type_label: obs column of cell types.
        target_label: obs column of perturbation targets.
        control_label: the `target_label` value of control cells.
        batch_label: obs column of batches (for one-hots and batch-matched controls).
        use_batches: protoplast's name for `match_controls_by_batch`.
        group_size_S: cells per item (S): perturbed cells of one target, each with a matched control.
        barcodes: add `pert_cell_barcode` / `ctrl_cell_barcode` (obs_names) to batches.
        block_size: rows per contiguous read block (adjacent groups merge up to this).
        batch_size: items per batch (B); a batch holds B * S perturbed cells.
        server: Flight address of the cellfeed server, or several replicas (a list, or a
            comma-separated string); None: $CELLFEED_SERVER, else grpc://127.0.0.1:8815.
        token: bearer token, when the server has one; None: $CELLFEED_TOKEN. Never saved.
        tls_root_certs: PEM file of the root certificates that sign a TLS server's (grpc+tls://);
            None: $CELLFEED_TLS_ROOT_CERTS, else the system's.
        tls_cert_chain: PEM client certificate, for a server that requires one (mutual TLS);
            None: $CELLFEED_TLS_CERT_CHAIN.
        tls_private_key: PEM key of tls_cert_chain; None: $CELLFEED_TLS_PRIVATE_KEY.
        connect_timeout: seconds the first setup() gives the server to answer before it fails,
            saying why; None: $CELLFEED_CONNECT_TIMEOUT, else 5.
        retry_seconds: retry budget once connected (mid-epoch reconnection); None:
            $CELLFEED_RETRY_SECONDS, else 60.
        seed: seed of the epoch plans and control draws (a batch is a function of it and the epoch).
        match_controls_by_batch: draw each item's controls from its own batch.
        rank: this process's DDP rank; None: from the trainer or torch.distributed.
        world_size: DDP world size; None: from the trainer or torch.distributed.
        window_blocks: blocks whose items are shuffled together.
        prefix_batches_with_file: batch vocabulary entries become "<file stem>:<batch>".
        control_table_max_bytes: when all control rows fit in this many bytes, they are sent once
            with the session and batches name their rows (0: always inline).
        shared_memory: CSR rows in shared-memory slots when the server is on this host (None: when
            available; True: required; False: never).
        basal_mapping_strategy: cell-load's name: "batch" (= match_controls_by_batch) or "random".
        toml_schema: how `config_path` is read: "auto" (cell-load's if it has a [training] table,
            else protoplast's), "protoplast" or "cell-load".
    """

    kind = wire.KIND

    def __init__(
        self,
        files: list[str] | None = None,
        pert_embedding_file: str | None = None,
        hvg_file: str | None = None,
        config_path: str | None = None,
        num_workers: int | None = None,
        prefetch_factor: int | None = None,
        cell_type_label: str = "cell_type",
        target_label: str = "target_gene",
        control_label: str = "non-targeting",
        batch_label: str = "batch_var",
        use_batches: bool | None = None,
        group_size_S: int = 32,
        barcodes: bool = False,
        block_size: int = 2048,
        batch_size: int = 64,
        server: ServerAddress = None,
        token: str | None = None,
        tls_root_certs: str | None = None,
        tls_cert_chain: str | None = None,
        tls_private_key: str | None = None,
        seed: int = 0,
        connect_timeout: float | None = None, retry_seconds: float | None = None,
        match_controls_by_batch: bool | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        window_blocks: int = 8,
        prefix_batches_with_file: bool = False,
        control_table_max_bytes: int = 256 << 20,
        shared_memory: bool | None = None,
        basal_mapping_strategy: str | None = None,
        toml_schema: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(token)
        self._hvg = _read_gene_list(hvg_file) if hvg_file is not None else None
        if basal_mapping_strategy not in (None, "batch", "random"):
            raise ValueError(f"basal_mapping_strategy={basal_mapping_strategy!r}: use 'batch' or 'random'")
        asked = {
            name: value
            for name, value in (
                ("match_controls_by_batch", match_controls_by_batch),
                ("use_batches", use_batches),
                ("basal_mapping_strategy", None if basal_mapping_strategy is None else basal_mapping_strategy == "batch"),
            )
            if value is not None
        }
        if len(set(asked.values())) > 1:
            raise ValueError(f"batch matching asked both ways: {', '.join(f'{k}={v}' for k, v in asked.items())}")
        self.controls_by_batch = bool(next(iter(asked.values()), False))
        self.ignored_kwargs = sorted(kwargs)
        if kwargs:
            warnings.warn(
                f"PerturbationDataModule: {', '.join(self.ignored_kwargs)} ha{'s' if len(kwargs) == 1 else 've'} no effect "
                "with a cellfeed server (listed in dm.ignored_kwargs)",
                stacklevel=2,
            )
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
            "match_controls_by_batch": self.controls_by_batch,
            "prefix_batches_with_file": hp.prefix_batches_with_file,
            "control_table_max_bytes": hp.control_table_max_bytes,
            "toml_schema": hp.toml_schema,
        }
        if hp.config_path is not None:
            text = Path(hp.config_path).read_text()
            try:
                self._loader_opts = tomllib.loads(text).get("loader", {}) or {}
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{hp.config_path}: invalid TOML: {exc}") from None
            unknown = sorted(set(self._loader_opts) - LOADER_KEYS)
            if unknown:
                raise ValueError(f"{hp.config_path}: unknown key {unknown[0]!r} in [loader] (known: {', '.join(sorted(LOADER_KEYS))})")
            config["toml"] = text
            config["files"] = None
        return config

    def on_session(self, session: Session) -> None:
        table = session.tables.get(wire.EMBEDDINGS_TABLE)
        embeddings = torch.from_numpy(codec.tensor_from_column(table.column(wire.EMBEDDING)).copy()) if table is not None else None
        genes = None
        if self._hvg is not None:
            position = {name: i for i, name in enumerate(session.info["var_names"])}
            missing = [g for g in self._hvg if g not in position]
            if missing:
                raise ValueError(
                    f"hvg_file {self.hparams.hvg_file!r}: {len(missing)} of its {len(self._hvg)} genes are not among the "
                    f"files' var_names (first: {', '.join(missing[:5])})"
                )
            genes = np.array([position[g] for g in self._hvg], dtype=np.int64)
        self.decoder = PerturbationBatchDecoder(session.info, embeddings, session.tables.get(wire.CONTROLS_TABLE), genes)

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
        """The genes of the batches' last axis: the files' var_names, or hvg_file's list."""
        return list(self._hvg) if self._hvg is not None else self.info["var_names"]

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
        G = len(self.var_names)
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
    # val, test and predict serve every cell exactly once per pass (`cell_mask` marks padding)
    def val_dataloader(self) -> RemoteLoader | list:
        """The val split; the test split when there is no val split (as cell-load); else []."""
        loader = self.loader_if_any("val")
        return self.loader_if_any("test") if isinstance(loader, list) else loader

    def test_dataloader(self) -> RemoteLoader | list:
        return self.loader_if_any("test")

    def predict_dataloader(self) -> RemoteLoader | list:
        return self.loader_if_any("test")

    # -- pickling: the decoder is rebuilt from the session's facts, not carried ---------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("decoder", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.session is not None:
            self.on_session(self.session)
