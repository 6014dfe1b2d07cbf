"""MultiExperimentDataModule: VisCy's DynaCLR multi-experiment loader, fed by a cellfeed server.

Two forms in one class (docs/dynaclr.md): VisCy app-dynaclr's (`experiments_yaml`, `z_range`)
and VisCy main's (`collection_yaml` or `cell_index_path`, `z_window`, ...). Same batch dict:
`anchor`, `positive` [B, C, Z, Y, X] float32, `anchor_meta` / `positive_meta` in the main form,
and, in predict, `index` (a list of per-sample dicts). Plates, tracks, YAML and parquet files are
server-side paths, inside the server's data root.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import pyarrow as pa
import torch

from cellfeed.client.connection import Session
from cellfeed.client.datamodule import RemoteDataModule, ServerAddress
from cellfeed.client.loader import RemoteLoader
from cellfeed.client.transforms import BatchedCenterSpatialCropd, ChannelDropout
from cellfeed.wire import codec
from cellfeed.wire import dynaclr as wire


Z_REDUCTION_CLASSES = ("BatchedChannelWiseZReductiond",)  # kept in val and predict, as VisCy main does

class PairBatchDecoder:
    """One record batch of anchor/positive pairs to a batch dict, the image tensors being views
    of the received buffers."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.channel_keys = list(info["channel_keys"])
        self.levels = list(info["norm_levels"])
        self.stats = list(info["norm_stats"])
        self.store_path = {e["name"]: e.get("data_path", "") for e in info.get("experiments", [])}
        self.labels = list(info.get("label_encoders") or {})

    def __call__(self, rb: pa.RecordBatch) -> dict[str, Any]:
        names = rb.schema.names
        out: dict[str, Any] = {}
        for key in wire.IMAGES:
            if key in names:
                out[key] = torch.from_numpy(codec.tensor_from_column(rb.column(key)))
                out[f"{key}_norm_meta"] = torch.from_numpy(codec.tensor_from_column(rb.column(wire.norm(key))))
        out["padding"] = torch.from_numpy(rb.column(wire.PADDING).to_numpy(zero_copy_only=False))
        if wire.INDEX_MARKER in names:
            # VisCy main's index columns (perturbation, marker, ...) only when the server sends them
            present = [c for c in wire.INDEX_COLUMNS if c in names]
            columns = {c: _values(rb.column(c)) for c in present}
            index = [{c: columns[c][i] for c in present} for i in range(rb.num_rows)]
            for row in index:
                row["hours_post_perturbation"] = row["hours_post_infection"]
            out["index"] = index
            if wire.POSITIVE_TRACK_ID in names:
                out["positive_index"] = {
                    "track_id": torch.from_numpy(rb.column(wire.POSITIVE_TRACK_ID).to_numpy()),
                    "t": torch.from_numpy(rb.column(wire.POSITIVE_T).to_numpy()),
                }
        for key in wire.IMAGES:
            prefix = wire.META_PREFIXES[key]
            if wire.meta(prefix, wire.INDEX_MARKER) in names:
                out[prefix] = self.sample_meta(rb, prefix)
        return out

    def sample_meta(self, rb: pa.RecordBatch, prefix: str) -> list[dict[str, Any]]:
        """VisCy main's per-sample metadata dicts (`anchor_meta`), labels as class ids."""
        columns = {c: _values(rb.column(wire.meta(prefix, c))) for c in wire.META_COLUMNS}
        labels = {k: rb.column(wire.label(prefix, k)).to_numpy().tolist() for k in self.labels}
        out = []
        for i in range(rb.num_rows):
            row = {c: columns[c][i] for c in wire.META_COLUMNS}
            exp, fov = row["experiment"], row["fov_name"]
            row["store_path"] = self.store_path.get(exp, "")
            row["global_track_id"] = f"{exp}_{fov}_{row['track_id']}"
            row["lineage_id"] = f"{exp}_{fov}_{row['lineage_id']}"
            row["labels"] = {k: v[i] for k, v in labels.items() if v[i] >= 0}
            out.append(row)
        return out

    def norm_meta(self, stats: torch.Tensor) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """[B, C, levels, stats] as VisCy's collated norm_meta: {ch_i: {level: {stat: [B]}}}."""
        return {
            key: {level: {stat: stats[:, c, lv, s] for s, stat in enumerate(self.stats)} for lv, level in enumerate(self.levels)}
            for c, key in enumerate(self.channel_keys)
        }


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class _MaxIntensityProjection:
    """`z_reduction="mip"`: each channel's maximum over Z, keeping a Z axis of length 1."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = list(keys)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        for key in self.keys:
            sample[key] = sample[key].amax(dim=2, keepdim=True)
        return sample


def _values(column: pa.Array) -> list[Any]:
    if pa.types.is_dictionary(column.type):
        return column.dictionary.to_numpy(zero_copy_only=False)[column.indices.to_numpy()].tolist()
    return column.to_numpy(zero_copy_only=False).tolist()


class MultiExperimentDataModule(RemoteDataModule):
    """Remote drop-in for VisCy's DynaCLR MultiExperimentDataModule (plus `server` and `token`).

    `num_workers` is the number of parallel Flight streams per loader. Validation is identical
    every epoch (in index order, or in the main form epoch 0's training-sampler plan);
    augmentations and channel dropout run only while training.
    `shared_memory`: patches come in shared-memory slots rather than over gRPC when the server
    runs on this host (None: when available; True: required; False: never).
    """

    kind = wire.KIND

    def __init__(
        self,
        experiments_yaml: str | None = None,
        z_range: tuple[int, int] | None = None,
        yx_patch_size: tuple[int, int] = (192, 192),
        final_yx_patch_size: tuple[int, int] = (160, 160),
        val_experiments: list[str] | None = None,
        tau_range: tuple[float, float] = (0.5, 2.0),
        tau_decay_rate: float = 2.0,
        batch_size: int = 128,
        num_workers: int = 1,
        experiment_aware: bool = True,
        condition_balanced: bool = True,
        leaky: float = 0.0,
        temporal_enrichment: bool = False,
        temporal_window_hours: float = 2.0,
        temporal_global_fraction: float = 0.3,
        experiment_weights: dict[str, float] | None = None,
        condition_ratio: dict[str, float] | None = None,
        channel_dropout_channels: list[int] | None = None,
        channel_dropout_prob: float | None = None,
        normalizations: Sequence[Callable] | None = None,
        augmentations: Sequence[Callable] | None = None,
        hcl_beta: float = 0.5,
        cache_pool_bytes: int = 0,
        seed: int = 0,
        include_wells: list[str] | None = None,
        exclude_fovs: list[str] | None = None,
        server: ServerAddress = None,
        token: str | None = None,
        tls_root_certs: str | None = None,
        tls_cert_chain: str | None = None,
        tls_private_key: str | None = None,
        connect_timeout: float | None = None, retry_seconds: float | None = None,
        prefetch: int | None = None,
        return_index: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        shared_memory: bool | None = None,
        collection_yaml: str | None = None,
        cell_index_path: str | None = None,
        z_window: int | None = None,
        z_extraction_window: int | None = None,
        z_focus_offset: float = 0.5,
        focus_channel: str | None = None,
        z_reduction: Literal["mip"] | None = None,
        max_border_shift: int | None = None,
        reference_pixel_size_xy_um: float | None = None,
        reference_pixel_size_z_um: float | None = None,
        split_ratio: float | None = None,
        batch_group_by: str | list[str] | None = None,
        stratify_by: str | list[str] | None = "perturbation",
        group_weights: dict[str, float] | None = None,
        channels_per_sample: int | list[str] | None = None,
        positive_cell_source: Literal["lookup", "lineage", "self"] = "lookup",
        positive_match_columns: list[str] | None = None,
        positive_channel_source: Literal["same", "any"] = "same",
        label_columns: dict[str, str] | None = None,
        recheck_cached_data: str | bool | None = None,
        file_io_concurrency: int | None = None,
        shuffle_val: bool = False,
        pin_memory: bool = True,
        prefetch_factor: int | None = None,
        buffer_size: int = 4,
    ) -> None:
        """VisCy's arguments, both forms (docs/dynaclr.md); give one of `experiments_yaml`
        (app-dynaclr form, with `z_range`), `collection_yaml` or `cell_index_path` (main form,
        with `z_window`).

        The main form's arguments (from `collection_yaml` on) default, in the experiments_yaml
        form, to app-dynaclr's behaviour.

        Args:
            experiments_yaml: app-dynaclr's experiments registry (server-side path, inside its
                --data-root): plates, tracks, channels, conditions, intervals.
            z_range: [start, stop) Z slices read (experiments_yaml form; the main form uses z_window).
            yx_patch_size: YX patch read around each cell (before augmentations).
            final_yx_patch_size: YX size after the final centre crop (what the model sees).
            val_experiments: experiments held out for validation (whole experiments).
            tau_range: (min, max) hours between an anchor and its positive.
            tau_decay_rate: exponential decay of the tau draw over that range (favours short tau).
            batch_size: anchor/positive pairs per batch.
            num_workers: parallel Flight streams per loader, read in threads (the server reads).
            experiment_aware: every training batch from one experiment.
            condition_balanced: balance conditions within each training batch.
            leaky: share of an experiment-aware batch drawn from other experiments.
            temporal_enrichment: oversample anchors near a focal time (hours post perturbation).
            temporal_window_hours: half-width of the focal window, in hours.
            temporal_global_fraction: share of each enriched batch drawn from all times.
            experiment_weights: sampling weight per experiment name.
            condition_ratio: share of each condition in a condition-balanced batch.
            channel_dropout_channels: channels ChannelDropout may zero while training (default [1]).
            channel_dropout_prob: probability of dropping each of those channels per sample; None:
                0.5 in the experiments_yaml form (app-dynaclr's default), 0.0 in the main form
                (VisCy main's, where a bag of one channel per sample has no channel 1 to drop).
            normalizations: transforms on VisCy's batch dict, on the device, in every split.
            augmentations: transforms on VisCy's batch dict, on the device, training only.
            hcl_beta: stored as a hyperparameter only (the loss belongs to the model), as in VisCy.
            cache_pool_bytes: the server's tensorstore chunk cache for these plates (0: the
                server's one pool for all plates).
            seed: seed of the epoch plans (a batch is a function of it and the epoch).
            include_wells: only these wells ("A/1"); None: all.
            exclude_fovs: skip these FOVs ("A/1/0").
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
            prefetch: deprecated alias of `prefetch_factor` (warns).
            return_index: add `index` (and `positive_index`) to train and val batches.
            rank: this process's DDP rank; None: from the trainer or torch.distributed.
            world_size: DDP world size; None: from the trainer or torch.distributed.
            shared_memory: patches in shared-memory slots when the server is on this host (None:
                when available; True: required; False: never).
            collection_yaml: VisCy main's collection YAML (server-side path or the text itself).
            cell_index_path: a cell index parquet (VisCy main's schema; `cellfeed build-cell-index`).
            z_window: Z slices the model consumes (the final crop); replaces `z_range`.
            z_extraction_window: Z slices read around the focus plane (>= z_window; default z_window).
            z_focus_offset: share of the read window below the focus plane (0.5: symmetric).
            focus_channel: channel whose plate `focus_slice` centres the window (default: the first).
            z_reduction: "mip" takes the maximum over Z after the crop, in train, val and predict
                (for 2D models); an augmentation named `BatchedChannelWiseZReductiond` is also
                kept in val and predict, as VisCy main does.
            max_border_shift: drop cells whose patch must move more than this many pixels to fit
                (-1: a quarter of the patch, 0: any that does not fit); None: -1 in the main form,
                clamp every border cell in the experiments_yaml form.
            reference_pixel_size_xy_um: rescale every experiment's patches to this pixel size
                (needs `pixel_size_xy_um` per experiment).
            reference_pixel_size_z_um: the same in Z.
            split_ratio: with no `val_experiments`, the share of each experiment's FOVs that train
                (the rest validate); None: 0.8 in the main form, 1.0 (no validation) otherwise.
            batch_group_by: column(s) every batch shares (main form; the experiments_yaml form uses
                `experiment_aware`). Columns: experiment, perturbation, marker, channel_name,
                organelle, microscope, well, fov_name.
            stratify_by: column(s) each batch is balanced over (main form; else `condition_balanced`).
            group_weights: sampling weight per `batch_group_by` value ("|"-joined for several columns).
            channels_per_sample: None: every source channel; 1: one channel per sample (bag of
                channels); a list of markers or channel names: those channels.
            positive_cell_source: "lookup" (or "lineage"): positives by `positive_match_columns`;
                "self": the anchor's own crop (two views from the augmentations).
            positive_match_columns: columns a positive shares with its anchor; None or containing
                "lineage_id": the same lineage tau frames later.
            positive_channel_source: with channels_per_sample=1, "same" channel as the anchor or "any".
            label_columns: {batch key: column}: class ids in `anchor_meta[i]["labels"]`.
            recheck_cached_data, file_io_concurrency: VisCy main's tensorstore settings; accepted,
                no effect here (the server opens each plate read-only once, with its own I/O settings).
            shuffle_val: accepted; VisCy main stores it unused. Validation is in index order in the
                experiments_yaml form, and drawn by the training sampler (epoch 0's plan every
                epoch) in the main form.
            pin_memory, buffer_size: VisCy main's ThreadDataLoader settings; accepted, no effect
                (batches arrive decoded from the server; move them with the trainer as usual).
            prefetch_factor: decoded batches queued per stream (default 2); `prefetch` is its deprecated alias.
        """
        super().__init__(token)
        self.warn_prefetch_alias(prefetch, prefetch_factor)
        self.save_hyperparameters(ignore=["token", "normalizations", "augmentations"])
        forms = [k for k, v in (("experiments_yaml", experiments_yaml), ("collection_yaml", collection_yaml), ("cell_index_path", cell_index_path)) if v]
        if len(forms) != 1:
            raise ValueError("give exactly one of experiments_yaml, collection_yaml, cell_index_path" + (f" (got {', '.join(forms)})" if forms else ""))
        if (z_range is None) == (z_window is None):
            raise ValueError("give either z_range or z_window")
        self.form = forms[0]
        self.normalizations = list(normalizations or [])
        self.augmentations = list(augmentations or [])
        self.channel_dropout = ChannelDropout(
            channels=channel_dropout_channels if channel_dropout_channels is not None else [1],
            p=channel_dropout_prob if channel_dropout_prob is not None else (0.5 if self.form == "experiments_yaml" else 0.0),
        )

    # -- setup -------------------------------------------------------------------------------
    def session_config(self) -> dict[str, Any]:
        """The JSON the server receives (docs/protocol/dynaclr.md): everything that shapes batches."""
        hp = self.hparams
        main = self.form != "experiments_yaml"
        config = {
            self.form: hp[self.form],
            "yx_patch_size": list(hp.yx_patch_size),
            "val_experiments": list(hp.val_experiments or []),
            "tau_range": list(hp.tau_range),
            "tau_decay_rate": hp.tau_decay_rate,
            "batch_size": hp.batch_size,
            "experiment_aware": hp.experiment_aware,
            "condition_balanced": hp.condition_balanced,
            "leaky": hp.leaky,
            "temporal_enrichment": hp.temporal_enrichment,
            "temporal_window_hours": hp.temporal_window_hours,
            "temporal_global_fraction": hp.temporal_global_fraction,
            "experiment_weights": hp.experiment_weights,
            "condition_ratio": hp.condition_ratio,
            "cache_pool_bytes": hp.cache_pool_bytes,
            "seed": hp.seed,
            "include_wells": hp.include_wells,
            "exclude_fovs": hp.exclude_fovs,
            "return_index": hp.return_index,
        }
        if hp.z_range is not None:
            config["z_range"] = list(hp.z_range)
        else:
            config.update(
                z_window=hp.z_window,
                z_extraction_window=hp.z_extraction_window,
                z_focus_offset=hp.z_focus_offset,
                focus_channel=hp.focus_channel,
            )
        border = hp.max_border_shift if hp.max_border_shift is not None else (-1 if main else None)
        split = hp.split_ratio if hp.split_ratio is not None else (0.8 if main else 1.0)
        extra = {
            "max_border_shift": border,
            "reference_pixel_size_xy_um": hp.reference_pixel_size_xy_um,
            "reference_pixel_size_z_um": hp.reference_pixel_size_z_um,
            "split_ratio": split,
            "group_weights": hp.group_weights,
            "channels_per_sample": hp.channels_per_sample,
            "positive_cell_source": hp.positive_cell_source,
            "positive_match_columns": hp.positive_match_columns,
            "positive_channel_source": hp.positive_channel_source,
            "label_columns": hp.label_columns,
            "return_meta": main,
        }
        if main:  # main's grouping names replace app-dynaclr's booleans
            extra["batch_group_by"] = _as_list(hp.batch_group_by)
            extra["stratify_by"] = _as_list(hp.stratify_by)
        defaults = {"max_border_shift": None, "reference_pixel_size_xy_um": None, "reference_pixel_size_z_um": None,
                    "split_ratio": 1.0, "group_weights": None, "channels_per_sample": None, "positive_cell_source": "lookup",
                    "positive_match_columns": None, "positive_channel_source": "same", "label_columns": None, "return_meta": False}
        config.update({k: v for k, v in extra.items() if k not in defaults or v != defaults[k]})
        return config

    def on_session(self, session: Session) -> None:
        self.decoder = PairBatchDecoder(session.info)
        hp = self.hparams
        z = hp.z_window if hp.z_window is not None else hp.z_range[1] - hp.z_range[0]
        mip = [_MaxIntensityProjection(self.decoder.channel_keys)] if hp.z_reduction == "mip" else []
        crop = BatchedCenterSpatialCropd(self.decoder.channel_keys, (1 if mip else z, *hp.final_yx_patch_size))
        z_reductions = [t for t in self.augmentations if type(t).__name__ in Z_REDUCTION_CLASSES]
        # The projection runs over the whole extraction window, before the final crop (VisCy
        # main's 2D models: BatchedChannelWiseZReductiond among the augmentations, z_window 1).
        self._train_transforms = [*self.normalizations, *self.augmentations, *mip, crop]
        self._eval_transforms = [*self.normalizations, *z_reductions, *mip, crop]

    @property
    def channel_keys(self) -> list[str]:
        """The transform keys of the source channels, by position: ch_0, ch_1, ..."""
        return list(self.info["channel_keys"])

    # -- loaders (train_dataloader and checkpoints: RemoteDataModule) --------------------------
    def val_dataloader(self) -> RemoteLoader | list:
        return self.loader_if_any("val")

    def predict_dataloader(self) -> RemoteLoader:
        return self.loader(wire.PREDICT)

    # -- on the device -------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise, augment (training only), centre-crop; then channel dropout (training only).

        Anything that is not a batch dict of this DataModule (a bare tensor, as Lightning's model
        summary sends `example_input_array` through this hook) is returned untouched.
        """
        if not isinstance(batch, dict) or not any(f"{key}_norm_meta" in batch for key in wire.IMAGES):
            return batch
        training = self.trainer is not None and self.trainer.training
        transforms = self._train_transforms if training else self._eval_transforms
        keys = self.decoder.channel_keys
        for key in wire.IMAGES:
            if f"{key}_norm_meta" not in batch:
                continue
            images = batch[key]
            sample: dict[str, Any] = {k: images[:, i : i + 1] for i, k in enumerate(keys)}
            sample["norm_meta"] = self.decoder.norm_meta(batch.pop(f"{key}_norm_meta"))
            for transform in transforms:
                sample = transform(sample)
            images = torch.cat([sample[k] for k in keys], dim=1)
            self.channel_dropout.train(training)
            batch[key] = self.channel_dropout(images)
        return batch
