"""MultiExperimentDataModule: VisCy's DynaCLR multi-experiment loader, fed by a cellfeed server.

Same constructor as VisCy's (plus `server`, `token`), same batch dict: `anchor`, `positive`
[B, C, Z, Y, X] float32 and, in predict, `index` (a list of per-sample dicts). Plates, tracks
and the experiments YAML are server-side paths, inside the server's data root.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import torch

from cellfeed.client.connection import Session
from cellfeed.client.datamodule import RemoteDataModule
from cellfeed.client.loader import RemoteLoader
from cellfeed.client.transforms import BatchedCenterSpatialCropd, ChannelDropout
from cellfeed.wire import codec


IMAGE_KEYS = ("anchor", "positive")
INDEX_COLUMNS = (
    "experiment",
    "condition",
    "fov_name",
    "track_id",
    "t",
    "id",
    "parent_track_id",
    "parent_id",
    "lineage_id",
    "hours_post_infection",
    "z",
    "y",
    "x",
)

class TripletBatchDecoder:
    """One record batch to a batch dict, the image tensors being views of the received buffers."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.channel_keys = list(info["channel_keys"])
        self.levels = list(info["norm_levels"])
        self.stats = list(info["norm_stats"])

    def __call__(self, rb: pa.RecordBatch) -> dict[str, Any]:
        names = rb.schema.names
        out: dict[str, Any] = {}
        for key in IMAGE_KEYS:
            if key in names:
                out[key] = torch.from_numpy(codec.tensor_from_column(rb.column(key)))
                out[f"{key}_norm_meta"] = torch.from_numpy(codec.tensor_from_column(rb.column(f"{key}_norm")))
        out["padding"] = torch.from_numpy(rb.column("padding").to_numpy(zero_copy_only=False))
        if "track_id" in names:
            columns = {c: _values(rb.column(c)) for c in INDEX_COLUMNS}
            out["index"] = [{c: columns[c][i] for c in INDEX_COLUMNS} for i in range(rb.num_rows)]
            if "positive_track_id" in names:
                out["positive_index"] = {
                    "track_id": torch.from_numpy(rb.column("positive_track_id").to_numpy()),
                    "t": torch.from_numpy(rb.column("positive_t").to_numpy()),
                }
        return out

    def norm_meta(self, stats: torch.Tensor) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """[B, C, levels, stats] as VisCy's collated norm_meta: {ch_i: {level: {stat: [B]}}}."""
        return {
            key: {level: {stat: stats[:, c, lv, s] for s, stat in enumerate(self.stats)} for lv, level in enumerate(self.levels)}
            for c, key in enumerate(self.channel_keys)
        }


def _values(column: pa.Array) -> list[Any]:
    if pa.types.is_dictionary(column.type):
        return column.dictionary.to_numpy(zero_copy_only=False)[column.indices.to_numpy()].tolist()
    return column.to_numpy(zero_copy_only=False).tolist()


class MultiExperimentDataModule(RemoteDataModule):
    """Remote drop-in for VisCy's DynaCLR MultiExperimentDataModule (plus `server` and `token`).

    `num_workers` is the number of parallel Flight streams per loader. Validation is in order
    and identical every epoch; augmentations and channel dropout run only while training.
    `shared_memory`: patches come in shared-memory slots rather than over gRPC when the server
    runs on this host (None: when available; True: required; False: never).
    """

    kind = "dynaclr"

    def __init__(
        self,
        experiments_yaml: str,
        z_range: tuple[int, int],
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
        channel_dropout_prob: float = 0.5,
        normalizations: Sequence[Callable] | None = None,
        augmentations: Sequence[Callable] | None = None,
        hcl_beta: float = 0.5,
        cache_pool_bytes: int = 0,
        seed: int = 0,
        include_wells: list[str] | None = None,
        exclude_fovs: list[str] | None = None,
        server: str = "grpc://127.0.0.1:8815",
        token: str | None = None,
        prefetch: int = 2,
        return_index: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        shared_memory: bool | None = None,
    ) -> None:
        super().__init__(token)
        self.save_hyperparameters(ignore=["token", "normalizations", "augmentations"])
        self.normalizations = list(normalizations or [])
        self.augmentations = list(augmentations or [])
        self.channel_dropout = ChannelDropout(
            channels=channel_dropout_channels if channel_dropout_channels is not None else [1], p=channel_dropout_prob
        )

    # -- setup -------------------------------------------------------------------------------
    def session_config(self) -> dict[str, Any]:
        """The JSON the server receives (docs/protocol/dynaclr.md): everything that shapes batches."""
        hp = self.hparams
        return {
            "experiments_yaml": hp.experiments_yaml,
            "z_range": list(hp.z_range),
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

    def on_session(self, session: Session) -> None:
        self.decoder = TripletBatchDecoder(session.info)
        z = self.hparams.z_range[1] - self.hparams.z_range[0]
        crop = BatchedCenterSpatialCropd(self.decoder.channel_keys, (z, *self.hparams.final_yx_patch_size))
        self._train_transforms = [*self.normalizations, *self.augmentations, crop]
        self._eval_transforms = [*self.normalizations, crop]

    @property
    def prefetch(self) -> int:
        return int(self.hparams.prefetch)

    @property
    def channel_keys(self) -> list[str]:
        """The transform keys of the source channels, by position: ch_0, ch_1, ..."""
        return list(self.info["channel_keys"])

    # -- loaders (train_dataloader and checkpoints: RemoteDataModule) --------------------------
    def val_dataloader(self) -> RemoteLoader | list:
        return self.loader_if_any("val")

    def predict_dataloader(self) -> RemoteLoader:
        return self.loader("predict")

    # -- on the device -------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise, augment (training only), centre-crop; then channel dropout (training only).

        Anything that is not a batch dict of this DataModule (a bare tensor, as Lightning's model
        summary sends `example_input_array` through this hook) is returned untouched.
        """
        if not isinstance(batch, dict) or not any(f"{key}_norm_meta" in batch for key in IMAGE_KEYS):
            return batch
        training = self.trainer is not None and self.trainer.training
        transforms = self._train_transforms if training else self._eval_transforms
        keys = self.decoder.channel_keys
        for key in IMAGE_KEYS:
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
