"""The DynaCLR stream: anchor and positive patches of the same lineage, from OME-Zarr plates.

Splits: "train" (flexible sampler over valid anchors of the training experiments), "val"
(in order over valid anchors of `val_experiments`, same batches every epoch) and "predict"
(in order over every tracked cell of every experiment, anchors only). One record batch is one
training batch; the schema is written out in docs/protocol/dynaclr.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cellfeed.server.context import ServerContext
from cellfeed.server.dynaclr.config import DynaCLRConfig
from cellfeed.server.dynaclr.index import CellIndex, build_index
from cellfeed.server.dynaclr.positives import PositiveSampler
from cellfeed.server.dynaclr.registry import ExperimentRegistry, check_plate
from cellfeed.server.errors import CellfeedError
from cellfeed.server.paths import DataRoot
from cellfeed.server.reading.omezarr import (
    NORM_LEVELS,
    NORM_STATS,
    ImageReader,
    PatchRequest,
    normalization_table,
    open_plate,
)
from cellfeed.server.samplers.base import Sampler, check_batch_index
from cellfeed.server.samplers.flexible import (
    FlexibleBatchSampler,
    FlexibleOptions,
    PlannedBatch,
)
from cellfeed.server.samplers.sequential import SequentialSampler
from cellfeed.server.sources.base import Alloc, Source
from cellfeed.wire import codec

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "predict")
_SPLIT_KEY = {"train": 0, "val": 1, "predict": 2}
_DICT = pa.dictionary(pa.int32(), pa.string())
# Index columns: (name, Arrow type, source row column or None when derived).
_INDEX_NUMERIC = (
    ("track_id", pa.int64(), "track_id"),
    ("t", pa.int32(), "t"),
    ("id", pa.int64(), "id"),
    ("parent_track_id", pa.float64(), "parent_track_id"),
    ("parent_id", pa.float64(), "parent_id"),
    ("lineage_id", pa.int64(), "lineage_track_id"),
    ("hours_post_infection", pa.float32(), "hpi"),
    ("z", pa.float32(), "z"),
    ("y", pa.float32(), "y"),
    ("x", pa.float32(), "x"),
)


class DynaCLRSource(Source):
    kind = "dynaclr"

    def __init__(self, config: DynaCLRConfig, registry: ExperimentRegistry, index: CellIndex, reader: ImageReader) -> None:
        self.config = config
        self.registry = registry
        self.index = index
        self.reader = reader
        rows = index.rows
        names = registry.names
        self.val_experiments = [n for n in names if n in set(config.val_experiments)]
        self.train_experiments = [n for n in names if n not in set(config.val_experiments)]
        if not self.train_experiments:
            raise CellfeedError("dynaclr config: val_experiments holds every experiment; none is left to train on")
        codes = {n: i for i, n in enumerate(names)}
        in_train = np.isin(rows["experiment"], [codes[n] for n in self.train_experiments])
        self.items = {
            "train": np.flatnonzero(index.valid & in_train),
            "val": np.flatnonzero(index.valid & ~in_train),
            "predict": np.arange(len(index)),
        }
        if len(self.items["train"]) == 0:
            raise CellfeedError(
                "no valid anchor in the training experiments: no track has an observation tau_range later "
                f"(tau in frames per experiment: {dict(zip(names, index.tau_frames))})"
            )
        train = self.items["train"]
        options = FlexibleOptions(
            batch_size=config.batch_size,
            experiment_aware=config.experiment_aware,
            condition_balanced=config.condition_balanced,
            leaky=config.leaky,
            temporal_enrichment=config.temporal_enrichment,
            temporal_window_hours=config.temporal_window_hours,
            temporal_global_fraction=config.temporal_global_fraction,
            experiment_weights=_by_code(config.experiment_weights, names, "experiment_weights", missing=0.0),
            condition_ratio=_by_code(
                config.condition_ratio, index.conditions, "condition_ratio", missing=1.0 / len(index.conditions)
            ),
            seed=config.seed,
        )
        self.options = options
        self.samplers: dict[str, Sampler] = {
            "train": FlexibleBatchSampler(rows["experiment"][train], rows["condition"][train], rows["hpi"][train], options),
            "val": SequentialSampler(len(self.items["val"]), config.batch_size),
            "predict": SequentialSampler(len(self.items["predict"]), config.batch_size),
        }
        self.positives = PositiveSampler(index.grid, rows["experiment"], index.tau_frames, config.tau_decay_rate)
        self.fov_names = index.fov_names
        fov_name_code = {n: i for i, n in enumerate(self.fov_names)}
        self._fov_name_code = np.array([fov_name_code[ref.fov.name] for ref in index.fovs], dtype=np.int32)
        self._channels = [tuple(registry.experiments[ref.experiment].channel_map) for ref in index.fovs]
        self._norm_static, self._norm_t = self._norm_tables()
        z0, z1 = config.z_range
        self.patch_shape = (registry.num_source_channels, z1 - z0, *config.patch_yx)
        self.channel_keys = [f"ch_{i}" for i in range(registry.num_source_channels)]
        self._dicts = {
            "experiment": pa.array(names, pa.string()),
            "condition": pa.array(index.conditions, pa.string()),
            "fov_name": pa.array(self.fov_names, pa.string()),
        }
        self._schemas = {split: self._build_schema(split) for split in SPLITS}

    @classmethod
    def open(cls, config: dict[str, Any], ctx: ServerContext) -> "DynaCLRSource":
        cfg = DynaCLRConfig.parse(config)
        text, where = _yaml_text(cfg.experiments_yaml, ctx.data_root)
        registry = ExperimentRegistry.from_yaml(text, where)
        for name in cfg.val_experiments:
            registry.get(name)
        paths = registry.resolve_paths(ctx.data_root)
        plates = {}
        for exp in registry.experiments:
            path = paths[exp.name][0]
            plate = ctx.handles.get(path, lambda p: open_plate(p, ctx.data_root.relative(p)), name="omezarr-plate")
            check_plate(exp, plate)
            plates[exp.name] = plate
        index = build_index(
            registry,
            plates,
            {name: tracks for name, (_, tracks) in paths.items()},
            patch_yx=cfg.patch_yx,
            z_range=cfg.z_range,
            tau_range_hours=cfg.tau_range,
            include_wells=cfg.include_wells,
            exclude_fovs=cfg.exclude_fovs,
            tracks_label={name: ctx.data_root.relative(tracks) for name, (_, tracks) in paths.items()},
            root=ctx.data_root,
        )
        return cls(cfg, registry, index, ctx.image_reader(cfg.cache_pool_bytes))

    def info(self) -> dict[str, Any]:
        rows, index = self.index.rows, self.index
        experiments = []
        for e, exp in enumerate(self.registry.experiments):
            mine = rows["experiment"] == e
            experiments.append(
                {
                    "name": exp.name,
                    "channel_names": exp.channel_names,
                    "source_channel": exp.source_channel,
                    "interval_minutes": exp.interval_minutes,
                    "start_hpi": exp.start_hpi,
                    "organelle": exp.organelle,
                    "date": exp.date,
                    "moi": exp.moi,
                    "conditions": sorted(exp.condition_wells),
                    "tau_range_frames": list(index.tau_frames[e]),
                    "fovs": sum(1 for ref in index.fovs if ref.experiment == e),
                    "rows": int(np.count_nonzero(mine)),
                    "valid_anchors": int(np.count_nonzero(mine & index.valid)),
                }
            )
        return {
            "experiments": experiments,
            "train_experiments": self.train_experiments,
            "val_experiments": self.val_experiments,
            "conditions": index.conditions,
            "fov_names": self.fov_names,
            "channel_keys": self.channel_keys,
            "patch_shape": list(self.patch_shape),
            "norm_levels": list(NORM_LEVELS),
            "norm_stats": list(NORM_STATS),
            "batch_size": self.config.batch_size,
            "sampling": "weighted" if self.options.weighted else "permutation",
            "splits": {s: {"items": int(len(self.items[s]))} for s in SPLITS},
            "warnings": index.warnings,
        }

    def schema(self, split: str) -> pa.Schema:
        self.sampler(split)
        return self._schemas[split]

    def batch(self, split: str, epoch: int, rank: int, world_size: int, index: int, *, alloc: Alloc | None = None) -> pa.RecordBatch:
        sampler = self.sampler(split)
        check_batch_index(index, rank, world_size, sampler.num_batches(world_size))
        planned: PlannedBatch = sampler.batch(epoch, rank, world_size, index)
        anchors = self.items[split][planned.items]
        n = len(anchors)
        columns: dict[str, pa.Array] = {}
        if split == "predict":
            images = self._read(anchors, alloc)
            columns["anchor"] = codec.tensor_column(images)
            columns["anchor_norm"] = codec.tensor_column(self._norm(anchors))
        else:
            # Positives are a function of (seed, split, epoch, global batch); val ignores the epoch.
            rng = np.random.default_rng(
                [self.config.seed, _SPLIT_KEY[split], epoch if split == "train" else 0, planned.global_index]
            )
            positives, _ = self.positives.sample(anchors, rng)
            images = self._read(np.concatenate([anchors, positives]), alloc)
            columns["anchor"] = codec.tensor_column(images[:n])
            columns["positive"] = codec.tensor_column(images[n:])
            columns["anchor_norm"] = codec.tensor_column(self._norm(anchors))
            columns["positive_norm"] = codec.tensor_column(self._norm(positives))
        columns["padding"] = pa.array(planned.padding, pa.bool_())
        if split == "predict" or self.config.return_index:
            columns.update(self._index_columns(anchors))
            if split != "predict":
                columns["positive_track_id"] = pa.array(self.index.rows["track_id"][positives], pa.int64())
                columns["positive_t"] = pa.array(self.index.rows["t"][positives].astype(np.int32), pa.int32())
        return pa.RecordBatch.from_arrays(list(columns.values()), schema=self._schemas[split])

    def _read(self, rows: np.ndarray, alloc: Alloc | None = None) -> np.ndarray:
        out = alloc((len(rows), *self.patch_shape), np.dtype(np.float32)) if alloc is not None else None
        return self.reader.read(self.patches(rows), self.patch_shape[1:], out=out)

    def patches(self, rows: np.ndarray) -> list[PatchRequest]:
        """The patch of each index row: its FOV, frame, source channels, z_range and clamped origin."""
        r, fovs = self.index.rows, self.index.fovs
        z0 = self.config.z_range[0]
        return [
            PatchRequest(fovs[f].fov, int(t), self._channels[f], z0, int(y0), int(x0))
            for f, t, y0, x0 in zip(r["fov"][rows], r["t"][rows], r["y0"][rows], r["x0"][rows])
        ]

    def _norm(self, rows: np.ndarray) -> np.ndarray:
        """[n, C, levels, stats]: dataset and FOV statistics, then those of the row's timepoint."""
        fov, t = self.index.rows["fov"][rows], self.index.rows["t"][rows]
        return np.concatenate([self._norm_static[fov], self._norm_t[fov, t][:, :, None, :]], axis=2)

    def _norm_tables(self) -> tuple[np.ndarray, np.ndarray]:
        t_max = max(ref.fov.shape[0] for ref in self.index.fovs)
        static, per_t = [], []
        for ref in self.index.fovs:
            exp = self.registry.experiments[ref.experiment]
            s, pt = normalization_table(ref.fov, exp.source_channel, t_max)
            static.append(s)
            per_t.append(pt)
        return np.stack(static), np.stack(per_t)

    def _index_columns(self, rows: np.ndarray) -> dict[str, pa.Array]:
        r = self.index.rows
        out: dict[str, pa.Array] = {
            "experiment": pa.DictionaryArray.from_arrays(r["experiment"][rows].astype(np.int32), self._dicts["experiment"]),
            "condition": pa.DictionaryArray.from_arrays(r["condition"][rows].astype(np.int32), self._dicts["condition"]),
            "fov_name": pa.DictionaryArray.from_arrays(self._fov_name_code[r["fov"][rows]], self._dicts["fov_name"]),
        }
        for name, dtype, column in _INDEX_NUMERIC:
            out[name] = pa.array(r[column][rows].astype(dtype.to_pandas_dtype()), dtype)
        return out

    def _build_schema(self, split: str) -> pa.Schema:
        C, Z, Y, X = self.patch_shape
        image = codec.tensor_type((C, Z, Y, X))
        norm = codec.tensor_type((C, len(NORM_LEVELS), len(NORM_STATS)))
        fields = [pa.field("anchor", image, nullable=False)]
        if split != "predict":
            fields.append(pa.field("positive", image, nullable=False))
        fields.append(pa.field("anchor_norm", norm, nullable=False))
        if split != "predict":
            fields.append(pa.field("positive_norm", norm, nullable=False))
        fields.append(pa.field("padding", pa.bool_(), nullable=False))
        if split == "predict" or self.config.return_index:
            fields += [pa.field(n, _DICT, nullable=False) for n in ("experiment", "condition", "fov_name")]
            fields += [pa.field(n, t, nullable=False) for n, t, _ in _INDEX_NUMERIC]
            if split != "predict":
                fields += [
                    pa.field("positive_track_id", pa.int64(), nullable=False),
                    pa.field("positive_t", pa.int32(), nullable=False),
                ]
        meta = {
            "kind": self.kind,
            "split": split,
            "patch_shape": list(self.patch_shape),
            "channel_keys": self.channel_keys,
            "source_channels": {e.name: e.source_channel for e in self.registry.experiments},
            "norm_levels": list(NORM_LEVELS),
            "norm_stats": list(NORM_STATS),
        }
        return codec.with_metadata(pa.schema(fields), meta)


def _yaml_text(value: str, root: DataRoot) -> tuple[str, str]:
    """The experiments YAML: inline text (it has a newline or starts with `experiments:`), else a path."""
    if "\n" in value or value.lstrip().startswith("experiments:"):
        return value, "experiments YAML"
    path = root.resolve(value)
    if not path.is_file():
        raise CellfeedError(f"experiments_yaml {value!r} is not a file")
    return path.read_text(), root.relative(Path(path))


def _by_code(weights: dict[str, float] | None, names: list[str], key: str, missing: float) -> tuple[float, ...] | None:
    """Weights keyed by name as a tuple indexed by code; unknown names are an error."""
    if weights is None:
        return None
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise CellfeedError(f"dynaclr config: {key} names {unknown[0]!r}, which is not one of {', '.join(names)}")
    return tuple(float(weights.get(n, missing)) for n in names)
