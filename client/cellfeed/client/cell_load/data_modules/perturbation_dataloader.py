"""cell-load 0.10.4's `PerturbationDataModule`, fed by a cellfeed server.

A cell-load user changes one import and adds `server=`:

    from cellfeed.client.cell_load.data_modules import PerturbationDataModule
    dm = PerturbationDataModule(toml_config_path="exp.toml", server="grpc://feeder:8815", ...)

The constructor takes cell-load's arguments, names and defaults. It is built on cellfeed's own
perturbation client (`cellfeed.client.perturbation.PerturbationDataModule`): the arguments are
mapped onto that session config, and each decoded batch is turned into the batch that cell-load's
`PerturbationDataset.collate_fn` gives, flat over the batch's `batch_size * cell_sentence_len`
cells:

| key | cell-load | here |
|---|---|---|
| `pert_cell_emb`, `ctrl_cell_emb` | float32 [B*S, G] dense X rows (obsm[embed_key] rows) | same |
| `pert_cell_counts`, `ctrl_cell_counts` | float32 (int32 with exp_counts) X or X_hvg rows | same |
| `pert_emb` | float32 [B*S, D] (one-hot or `perturbation_features_file`) | same |
| `cell_type_onehot`, `batch` | float32 [B*S, C] / [B*S, NB] one-hots | same |
| `pert_name`, `cell_type`, `batch_name`, `dataset_name` | list[str] of B*S | same |
| `pert_cell_barcode`, `ctrl_cell_barcode` | list[str] (barcode=True) | same |
| each of `additional_obs` | list[str], or a tensor for numbers | same |

`test_dataloader()` / `predict_dataloader()` give one unpadded sentence per batch, as cell-load
does (batch size 1, no padding); train and val give B padded sentences.

cell-load's options that change what is served (embed_key, should_yield_control_cells,
additional_obs, drop_last, downsample, ...) become session config keys (`_session_options`).
Every argument is honoured (docs/cell-load.md lists each); arguments that have no effect in
cell-load either are accepted.
"""

from __future__ import annotations

import logging
import os
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import torch

from cellfeed.client.connection import Session
from cellfeed.client.loader import RemoteLoader
from cellfeed.client.perturbation import PerturbationDataModule as _CellfeedPerturbationDataModule
from cellfeed.wire import codec
from cellfeed.wire import perturbation as wire

log = logging.getLogger(__name__)

DEFAULT_SERVER = "grpc://127.0.0.1:8815"

# cell-load's **kwargs that it reads (perturbation_dataloader.py), with their defaults
_CELL_LOAD_KWARGS = {
    "perturbation_features_file": None,
    "barcode": False,
    "store_raw_basal": False,
    "exp_counts": False,
    "map_controls": True,
    "normalize_counts": False,
}

def _loaded_datasets(toml_text: str, path: str) -> list[str]:
    """The datasets cell-load loads: those named in [training], [zeroshot] or [fewshot]."""
    try:
        doc = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None
    names = set((doc.get("training") or {}).keys())
    for table in ("zeroshot", "fewshot"):
        names |= {str(key).split(".")[0] for key in (doc.get(table) or {})}
    return sorted(names)


class _Stream(_CellfeedPerturbationDataModule):
    """cellfeed's perturbation module whose decoder gives cell-load's flat batches.

    Built on the protoplast-format decoder of the parent (its documented output), so the wire
    handling (controls table, shared memory, CSR checks) stays in one place."""

    dataset_name: str = ""
    exp_counts: bool = False
    cell_load_options: dict[str, Any] = {}

    def session_config(self) -> dict[str, Any]:
        return {**super().session_config(), **self.cell_load_options}

    def on_session(self, session: Session) -> None:
        super().on_session(session)
        self.decoder = CellLoadBatchDecoder(self.decoder, session.info, self.dataset_name, self.exp_counts)


class CellLoadBatchDecoder:
    """A record batch -> cell-load's collated batch, plus `cell_mask` [B*S] (True: a real cell of
    the pass; False: padding), which the loaders take off. Rows are made dense by the parent
    decoder's `dense` (a dense column as sent, CSR scattered in one pass, controls gathered from
    the session's table); names, one-hots and embeddings are gathered per row from the batch's
    dictionary codes, names as the session's own str objects (no per-batch string conversion)."""

    def __init__(self, inner: Any, info: dict[str, Any], dataset_name: str, exp_counts: bool = False) -> None:
        self.inner = inner
        self.targets = np.asarray([str(t) for t in info["targets"]], dtype=object)
        self.cell_types = np.asarray([str(c) for c in info["cell_types"]], dtype=object)
        self.batches = np.asarray([str(b) for b in info["batches"]], dtype=object)
        self.datasets = np.asarray([str(d) for d in info.get("datasets") or [dataset_name]], dtype=object)
        self.dataset_name = dataset_name
        self.exp_counts = exp_counts

    def __call__(self, rb: Any) -> dict[str, Any]:
        n = rb.num_rows
        names = rb.schema.names
        target = rb.column(wire.TARGET).indices.to_numpy()
        cell_type = rb.column(wire.CELL_TYPE).indices.to_numpy()
        exp_batch = rb.column(wire.EXP_BATCH).indices.to_numpy()
        if wire.DATASET in names:
            dataset_name = self.datasets[rb.column(wire.DATASET).indices.to_numpy()].tolist()
        else:
            dataset_name = [self.dataset_name] * n
        inner = self.inner
        out: dict[str, Any] = {
            "pert_cell_emb": torch.from_numpy(inner.dense(rb, wire.PERT)),
            "ctrl_cell_emb": torch.from_numpy(inner.dense(rb, wire.CTRL)),
            "pert_emb": torch.from_numpy(inner.embeddings[target]),
            "pert_name": self.targets[target].tolist(),
            "cell_type": self.cell_types[cell_type].tolist(),
            "cell_type_onehot": torch.from_numpy(inner.cell_type_eye[cell_type]),
            "batch": torch.from_numpy(inner.batch_eye[exp_batch]),
            "batch_name": self.batches[exp_batch].tolist(),
            "dataset_name": dataset_name,
            "cell_mask": torch.from_numpy(rb.column(wire.CELL_MASK).to_numpy(zero_copy_only=False)),
        }
        if wire.PERT_BARCODE in names:
            out["pert_cell_barcode"] = rb.column(wire.PERT_BARCODE).to_numpy(zero_copy_only=False).tolist()
            out["ctrl_cell_barcode"] = rb.column(wire.CTRL_BARCODE).to_numpy(zero_copy_only=False).tolist()
        for prefix in ("pert", "ctrl"):
            if f"{prefix}_counts_data" in names or f"{prefix}_counts_dense" in names or (
                prefix == "ctrl" and "ctrl_counts" in self.inner.control_rows
            ):
                out[f"{prefix}_cell_counts"] = self._counts(torch.from_numpy(self.inner.dense(rb, f"{prefix}_counts")))
        for name in names:
            if not name.startswith("obs."):
                continue
            column = rb.column(name)
            if pa.types.is_dictionary(column.type):  # strings and categories: cell-load's list[str]
                out[name[4:]] = np.asarray(column.dictionary.to_pylist(), dtype=object)[column.indices.to_numpy()].tolist()
            else:  # numbers: a tensor of the file's dtype, as cell-load's collate
                out[name[4:]] = torch.from_numpy(column.to_numpy(zero_copy_only=False).copy())
        return out

    def _counts(self, counts: torch.Tensor) -> torch.Tensor:
        """cell-load's collate of `*_cell_counts`: with exp_counts, expm1 when they look logged
        (not whole row sums, max < 15), then clamped, rounded, int32."""
        if not self.exp_counts:
            return counts
        top = counts[:100].sum(dim=1)
        discrete = bool(torch.all(torch.abs(top - top.floor()) < 1e-7))
        logged = (not discrete) and counts.max().item() < 15.0
        if logged:
            counts = torch.expm1(counts)
        return torch.nan_to_num(counts, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0).round().to(torch.int32)


class CellLoadLoader:
    """A split's RemoteLoader seen as cell-load's DataLoader.

    `sentences=False` (train, val): B sentences of S cells a batch, as sent (padding included:
    cell-load pads short sentences by resampling too). `sentences=True` (test, predict): one
    sentence a batch with its padding removed, as cell-load's batch-size-1 test loader."""

    def __init__(
        self,
        inner: RemoteLoader,
        *,
        batch_size: int,
        num_workers: int,
        group_size: int,
        sentences: bool,
        n_sentences: int | None = None,
        n_cells: int | None = None,
    ) -> None:
        self.inner = inner
        # STATE's predict reads `loader.batch_sampler.tot_num` (cell-load's sampler: the cells of
        # the split); Lightning finds no set_epoch on it, so it leaves it alone
        self._counts = SplitCounts(n_cells, n_sentences) if sentences else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.group_size = group_size
        self.sentences = sentences
        self._n_sentences = n_sentences
        self.drop_last = False

    # what Lightning and STATE read of a DataLoader
    @property
    def sampler(self) -> Any:
        return self.inner.sampler

    @property
    def batch_sampler(self) -> "SplitCounts | None":
        return self._counts

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def __len__(self) -> int:
        if not self.sentences:
            return len(self.inner)
        if self._n_sentences is None:
            raise TypeError("the number of test sentences per rank is known only after a pass (world_size > 1)")
        return self._n_sentences

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.inner:
            mask = batch.pop("cell_mask")
            if not self.sentences:
                yield batch
                continue
            yield from sentences(batch, mask.numpy(), self.group_size)


class SplitCounts:
    """What STATE reads of cell-load's batch sampler on a test loader: `tot_num` cells."""

    def __init__(self, tot_num: int | None, n_sentences: int | None) -> None:
        self.tot_num = tot_num
        self._n = n_sentences

    def __len__(self) -> int:
        if self._n is None:
            raise TypeError("the number of test sentences per rank is known only after a pass (world_size > 1)")
        return self._n


def sentences(batch: dict[str, Any], mask: np.ndarray, S: int) -> Iterator[dict[str, Any]]:
    """One batch dict per item (S rows) of a flat batch, its real cells only; all-padding items skipped."""
    for b in range(len(mask) // S):
        keep = np.flatnonzero(mask[b * S : (b + 1) * S]) + b * S
        if not len(keep):
            continue
        rows = torch.from_numpy(keep)
        picked = keep.tolist()
        yield {
            key: value.index_select(0, rows) if torch.is_tensor(value) else [value[i] for i in picked]
            for key, value in batch.items()
        }



class PerturbationDataModule(pl.LightningDataModule):
    """cell-load 0.10.4's PerturbationDataModule (its arguments, names and defaults) fed by cellfeed.

    Extra arguments: `server` (default: env CELLFEED_SERVER, else grpc://127.0.0.1:8815) and
    `token` (default: env CELLFEED_TOKEN). Paths inside the TOML and `perturbation_features_file`
    are the server's, inside its data root; the TOML file itself is read here and sent.
    `num_workers` is the number of parallel Flight streams (0 counts as 1).

    Args:
        toml_config_path: local TOML in cell-load's schema ([datasets], [training], [zeroshot],
            [fewshot]); read here and sent, its paths are the server's.
        batch_size: cell sentences per batch (B); a batch holds B * cell_sentence_len cells.
        num_workers: parallel Flight streams per loader, read in threads (0 counts as 1).
        random_seed: seed of the epoch plans and control draws.
        pert_col: obs column of perturbations.
        batch_col: obs column of batches (e.g. gem groups).
        cell_type_key: obs column of cell types.
        control_pert: the `pert_col` value of control cells.
        embed_key: obsm matrix whose rows are the cells (e.g. "X_hvg"); None: X rows.
        output_space: cell-load's output space: "gene", "all" or "embedding".
        downsample: cell-load's downsampling of counts (with output_space "all").
        downsample_cells: cap on cells per (cell type, perturbation) group.
        is_log1p: whether X holds log1p values (cell-load's downsampling undoes and redoes it).
        basal_mapping_strategy: how controls are matched to perturbed cells: "random", or "batch"
            (from the same `batch_col` value).
        n_basal_samples: cell-load's argument; its batches use one control per cell whatever it is.
        should_yield_control_cells: also yield control cells as items (cell-load's default).
        cell_sentence_len: cells per sentence (S).
        cache_perturbation_control_pairs: each cell's control drawn once per split and reused every
            epoch (with basal_mapping_strategy "random"; cell-load's "batch" ignores it).
        drop_last: drop partial sentences instead of padding them.
        val_subsample_fraction: share of the val (dataset, cell type) subsets kept.
        additional_obs: obs columns added to every batch.
        use_consecutive_loading: cell-load's contiguous-read mode; accepted, no effect (the server
            always reads contiguous runs).
        h5_open_kwargs: cell-load's h5py.File options; accepted, no effect (the server opens files).
        server: Flight address of the cellfeed server, or several replicas (a list or a
            comma-separated string; every connection uses them all); None: $CELLFEED_SERVER, else
            grpc://127.0.0.1:8815.
        token: bearer token, when the server has one; None: $CELLFEED_TOKEN. Never saved.
        connect_timeout: seconds the first setup() gives the server to answer before it fails,
            saying why; None: $CELLFEED_CONNECT_TIMEOUT, else 5.
        retry_seconds: retry budget once connected (mid-epoch reconnection); None:
            $CELLFEED_RETRY_SECONDS, else 60.

    Which values the server serves, and what differs from cell-load: docs/cell-load.md.
    """

    def __init__(
        self,
        toml_config_path: str,
        batch_size: int = 128,
        num_workers: int = 8,
        random_seed: int = 42,
        pert_col: str = "gene",
        batch_col: str = "gem_group",
        cell_type_key: str = "cell_type",
        control_pert: str = "non-targeting",
        embed_key: Literal["X_hvg", "X_state"] | None = None,
        output_space: Literal["gene", "all", "embedding"] = "gene",
        downsample: float | None = None,
        downsample_cells: int | None = None,
        is_log1p: bool = True,
        basal_mapping_strategy: Literal["batch", "random"] = "random",
        n_basal_samples: int = 1,
        should_yield_control_cells: bool = True,
        cell_sentence_len: int = 512,
        cache_perturbation_control_pairs: bool = False,
        drop_last: bool = False,
        val_subsample_fraction: float | None = None,
        additional_obs: list[str] | None = None,
        use_consecutive_loading: bool = False,
        h5_open_kwargs: dict | None = None,
        server: str | list[str] | None = None,
        token: str | None = None,
        connect_timeout: float | None = None, retry_seconds: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.toml_config_path = toml_config_path
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.random_seed = random_seed
        self.pert_col = pert_col
        self.batch_col = batch_col
        self.cell_type_key = cell_type_key
        self.control_pert = control_pert
        self.embed_key = embed_key
        self.output_space = output_space
        self.downsample = downsample
        self.downsample_cells = downsample_cells
        self.is_log1p = bool(is_log1p)
        self.basal_mapping_strategy = basal_mapping_strategy
        self.n_basal_samples = n_basal_samples
        self.should_yield_control_cells = should_yield_control_cells
        self.cell_sentence_len = int(cell_sentence_len)
        self.cache_perturbation_control_pairs = cache_perturbation_control_pairs
        self.drop_last = drop_last
        self.val_subsample_fraction = val_subsample_fraction
        self.additional_obs = additional_obs
        self.use_consecutive_loading = use_consecutive_loading
        self.h5_open_kwargs = h5_open_kwargs
        self.server = server or os.environ.get("CELLFEED_SERVER") or DEFAULT_SERVER
        token = token if token is not None else os.environ.get("CELLFEED_TOKEN")
        opts = {k: kwargs.pop(k, default) for k, default in _CELL_LOAD_KWARGS.items()}
        self.perturbation_features_file = opts["perturbation_features_file"]
        self.barcode = bool(opts["barcode"])
        self.store_raw_basal = bool(opts["store_raw_basal"])
        self.exp_counts = bool(opts["exp_counts"])
        self.map_controls = opts["map_controls"]
        self.normalize_counts = opts["normalize_counts"]
        # keys cell-load takes in **kwargs and never reads (STATE passes pert_rep, basal_rep, ...)
        self.ignored_kwargs = sorted(kwargs)
        if kwargs:
            warnings.warn(
                f"PerturbationDataModule: {', '.join(self.ignored_kwargs)} ha{'s' if len(kwargs) == 1 else 've'} no effect "
                "(cell-load does not read them either; listed in dm.ignored_kwargs)",
                stacklevel=2,
            )
        self._check_supported()
        text = Path(toml_config_path).read_text()
        datasets = _loaded_datasets(text, toml_config_path)
        self._stream = _Stream(
            config_path=toml_config_path,
            pert_embedding_file=self.perturbation_features_file,
            num_workers=max(1, self.num_workers),
            cell_type_label=cell_type_key,
            target_label=pert_col,
            control_label=control_pert,
            batch_label=batch_col,
            group_size_S=self.cell_sentence_len,
            barcodes=self.barcode,
            batch_size=self.batch_size,
            server=self.server,
            token=token,
            connect_timeout=connect_timeout, retry_seconds=retry_seconds,
            seed=int(random_seed),
            basal_mapping_strategy=basal_mapping_strategy,
            toml_schema="cell-load",
        )
        self._stream.dataset_name = datasets[0] if datasets else ""
        self._stream.exp_counts = self.exp_counts
        self._stream.cell_load_options = self._session_options(len(datasets))
        self._shared: set[str] | None = None

    def _check_supported(self) -> None:
        """Check values as cell-load does (each error names the argument)."""
        if self.basal_mapping_strategy not in ("random", "batch"):
            raise ValueError(f"basal_mapping_strategy={self.basal_mapping_strategy!r}: use 'random' or 'batch' (as cell-load)")
        if self.output_space not in ("gene", "all", "embedding"):
            raise ValueError(f"output_space must be one of 'gene', 'all', or 'embedding'; got {self.output_space!r}")
        if self.downsample is not None:
            try:
                self.downsample = float(self.downsample)
            except (TypeError, ValueError):
                raise ValueError(f"downsample must be a positive float; got {self.downsample!r}") from None
            if not self.downsample > 0:
                raise ValueError(f"downsample must be > 0; got {self.downsample!r}")
        if self.downsample_cells is not None:
            cells = self.downsample_cells
            if isinstance(cells, bool) or (isinstance(cells, float) and not cells.is_integer()) or not isinstance(cells, (int, float, np.integer)) or int(cells) <= 0:
                raise ValueError("downsample_cells must be a positive integer or None.")
            self.downsample_cells = int(cells)
        if self.additional_obs is not None:
            if isinstance(self.additional_obs, str) or not all(isinstance(k, str) for k in self.additional_obs):
                raise ValueError(f"additional_obs must be a list of obs column names; got {self.additional_obs!r}")
        if self.val_subsample_fraction is not None and not 0 < float(self.val_subsample_fraction) <= 1:
            raise ValueError(f"val_subsample_fraction must be in (0, 1]; got {self.val_subsample_fraction!r}")

    def _session_options(self, n_datasets: int) -> dict[str, Any]:
        """cell-load's options as session config (docs/protocol/perturbation.md)."""
        gene_or_all = {"gene": "X_hvg", "all": "X"}.get(self.output_space)
        # cell-load's store_raw_expression: counts beside an embedding, for "gene" (unless the
        # embedding is X_hvg itself) and "all"
        raw = bool(self.embed_key and ((self.embed_key != "X_hvg" and self.output_space == "gene") or self.output_space == "all"))
        return {
            "embed_key": self.embed_key,
            "pert_counts": gene_or_all if raw else None,
            "ctrl_counts": gene_or_all if self.store_raw_basal else None,
            "control_items": bool(self.should_yield_control_cells),
            "obs_columns": list(self.additional_obs or []),
            "dataset_column": n_datasets > 1,
            "drop_last": bool(self.drop_last),
            "max_cells_per_group": self.downsample_cells,
            # cell-load thins only the X rows it reads for output_space "all"
            "downsample": self.downsample if self.output_space == "all" and self.downsample not in (None, 1.0) else None,
            "is_log1p": self.is_log1p,
            "val_subsample_fraction": None if self.val_subsample_fraction is None else float(self.val_subsample_fraction),
            # cell-load caches pairs in its random strategy only (its batch strategy ignores the flag)
            "fixed_control_pairs": bool(self.cache_perturbation_control_pairs) and self.basal_mapping_strategy == "random",
        }

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Opens the session once (cell-load too builds everything once, whatever the stage)."""
        self._stream.trainer = self.trainer
        self._stream.setup(stage)

    def teardown(self, stage: str) -> None:
        self._stream.teardown(stage)

    @property
    def info(self) -> dict[str, Any]:
        return self._stream.info

    # -- loaders ---------------------------------------------------------------------------------
    def _loader(self, split: str, *, sentences: bool, batch_size: int) -> CellLoadLoader:
        if split == "train" and sentences:
            # cell-load's train_dataloader(test=True): a pass over train on a loader of its own,
            # so the training loader's epoch and position stay as they are
            stream = self._stream
            replicas = stream._connect_replicas()  # every replica `server` names, as the other loaders
            inner = RemoteLoader(
                replicas.primary, stream.session, "train", stream.decoder,
                rank=stream.rank, world_size=stream.world_size, num_streams=stream.num_streams,
                prefetch=stream.prefetch, fixed_epoch=True, replicas=replicas,
            )
        else:
            inner = self._stream.loader(split)
        counts = self.info["splits"][split]
        alone = self._stream.world_size == 1
        return CellLoadLoader(
            inner,
            batch_size=batch_size,
            num_workers=self.num_workers,
            group_size=self.cell_sentence_len,
            sentences=sentences,
            n_sentences=int(counts["items"]) if alone else None,
            n_cells=int(counts["cells"]) if alone else None,
        )

    def _has(self, split: str) -> bool:
        return int(self.info["splits"][split]["items"]) > 0

    def train_dataloader(self, test: bool = False) -> CellLoadLoader:
        if self._stream.session is None:
            raise ValueError("No training datasets available. Please call setup() first.")
        if not self._has("train"):
            raise ValueError("No training datasets available: the TOML puts no perturbed cell in train")
        return self._loader("train", sentences=test, batch_size=1 if test else self.batch_size)

    def val_dataloader(self) -> CellLoadLoader | list:
        """The val split; the test split when there is no val split; else [] (as cell-load)."""
        for split in ("val", "test"):
            if self._has(split):
                return self._loader(split, sentences=False, batch_size=self.batch_size)
        return []

    def test_dataloader(self) -> CellLoadLoader | list:
        return self._loader("test", sentences=True, batch_size=1) if self._has("test") else []

    def predict_dataloader(self) -> CellLoadLoader | list:
        return self._loader("test", sentences=True, batch_size=1) if self._has("test") else []

    # -- facts about the data (cell-load's methods) ------------------------------------------------
    def get_var_names(self) -> list[str]:
        """cell-load's gene names of the first file: var/gene_name when it has one, filtered to the
        highly variable genes (or uns/hvg_names) for output_space="gene" (docs/cell-load.md)."""
        genes = self.info.get("cell_load_genes") or {}
        if self.output_space == "gene" and genes.get("hvg") is not None:
            return list(genes["hvg"])
        return list(genes.get("names") or self.info["var_names"])

    def get_var_dims(self) -> dict[str, Any]:
        G = int(self.info["n_vars"])
        width = int(self.info.get("input_dim", G))  # obsm[embed_key]'s with an embed_key, else X's
        return {
            "input_dim": width,
            "gene_dim": G,
            "hvg_dim": int(self.info.get("hvg_dim", 0)),  # obsm["X_hvg"]'s width, 0 without one (as cell-load)
            "output_dim": width,
            "pert_dim": int(self.info["embedding_dim"]),
            "gene_names": self.get_var_names(),
            "batch_dim": len(self.info["batches"]),
            "pert_names": list(self.pert_onehot_map),
        }

    def get_control_pert(self) -> str:
        return self.control_pert

    def get_shared_perturbations(self) -> set[str]:
        """Perturbations with cells in train and in test (as cell-load, without control cells).

        The session does not list each split's perturbations, so this reads one pass of the
        train and test splits (their `target` column) the first time it is called."""
        if self._shared is None:
            self._shared = self._split_targets("train") & self._split_targets("test")
        return set(self._shared)

    def _split_targets(self, split: str) -> set[str]:
        if not self._has(split):
            return set()
        session = self._stream.session
        targets = np.asarray(self.info["targets"], dtype=object)

        def codes(rb: Any) -> np.ndarray:
            return np.unique(rb.column(wire.TARGET).indices.to_numpy()[rb.column(wire.CELL_MASK).to_numpy(zero_copy_only=False)])

        replicas = self._stream._connect_replicas()  # every replica `server` names, as the loaders
        loader = RemoteLoader(
            replicas.primary, session, split, codes, num_streams=max(1, self.num_workers), fixed_epoch=True, replicas=replicas
        )
        seen = np.unique(np.concatenate([c for c in loader] or [np.zeros(0, np.int64)])).astype(np.int64)
        return {str(t) for t in targets[seen]}

    # -- one-hot maps (STATE saves them with its checkpoints) -------------------------------------
    @property
    def pert_onehot_map(self) -> dict[str, torch.Tensor]:
        targets = self.info["targets"]
        table = self._stream.session.tables.get("pert_emb") if self._stream.session is not None else None
        if table is not None:
            emb = codec.tensor_from_column(table.column("embedding"))
            names = table.column("target").to_pylist()
            return {str(t): torch.from_numpy(np.array(emb[i], dtype=np.float32)) for i, t in enumerate(names)}
        eye = torch.eye(len(targets))
        return {str(t): eye[i].clone() for i, t in enumerate(targets)}

    @property
    def batch_onehot_map(self) -> dict[str, torch.Tensor]:
        return _onehots(self.info["batches"])

    @property
    def cell_type_onehot_map(self) -> dict[str, torch.Tensor]:
        return _onehots(self.info["cell_types"])

    celltype_onehot_map = cell_type_onehot_map

    # -- configuration files (cell-load's semantics: the arguments, not the splits) -----------------
    def _saved(self) -> dict[str, Any]:
        return {
            "toml_config_path": self.toml_config_path,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "random_seed": self.random_seed,
            "pert_col": self.pert_col,
            "batch_col": self.batch_col,
            "cell_type_key": self.cell_type_key,
            "control_pert": self.control_pert,
            "embed_key": self.embed_key,
            "output_space": self.output_space,
            "downsample": self.downsample,
            "downsample_cells": self.downsample_cells,
            "is_log1p": self.is_log1p,
            "basal_mapping_strategy": self.basal_mapping_strategy,
            "n_basal_samples": self.n_basal_samples,
            "should_yield_control_cells": self.should_yield_control_cells,
            "cell_sentence_len": self.cell_sentence_len,
            "cache_perturbation_control_pairs": self.cache_perturbation_control_pairs,
            "map_controls": self.map_controls,
            "perturbation_features_file": self.perturbation_features_file,
            "exp_counts": self.exp_counts,
            "normalize_counts": self.normalize_counts,
            "store_raw_basal": self.store_raw_basal,
            "barcode": self.barcode,
            "val_subsample_fraction": self.val_subsample_fraction,
            "additional_obs": self.additional_obs,
            "use_consecutive_loading": self.use_consecutive_loading,
            "h5_open_kwargs": self.h5_open_kwargs,
            "server": self.server,  # cellfeed's; the token is never written
        }

    def save_state(self, filepath: Any) -> None:
        """cell-load's save_state: the constructor arguments (plus `server`), with torch.save."""
        torch.save(self._saved(), filepath)

    @classmethod
    def load_state(cls, filepath: Any, server: str | list[str] | None = None, token: str | None = None) -> "PerturbationDataModule":
        """A new module from save_state's file (cell-load's or this one's); call setup() after.
        `server` overrides the saved one; the token comes from `token` or CELLFEED_TOKEN."""
        saved = dict(torch.load(filepath, map_location="cpu", weights_only=False))
        if not Path(saved["toml_config_path"]).exists():
            log.warning("TOML config file not found at %s", saved["toml_config_path"])
        saved.setdefault("barcode", True)  # cell-load's load_state default
        if server is not None or "server" not in saved:
            saved["server"] = server
        return cls(**saved, token=token)

    # -- checkpoints: where the train loader stands ----------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self._stream.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stream.load_state_dict(state_dict)


def _onehots(names: list[str]) -> dict[str, torch.Tensor]:
    eye = torch.eye(len(names))
    return {str(n): eye[i].clone() for i, n in enumerate(names)}
