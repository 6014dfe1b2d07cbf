"""The DynaCLR stream: anchor and positive patches of the same lineage, from OME-Zarr plates.

Splits: "train" (flexible sampler over valid anchors of the training experiments), "val"
(valid anchors of `val_experiments`, the same batches every epoch: in order in the
experiments_yaml form, epoch 0's flexible-sampler plan in VisCy main's form) and "predict"
(in order over every tracked cell of every experiment, anchors only). One record batch is one
training batch; the schema is written out in docs/protocol/dynaclr.md.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from cellfeed.server.context import ServerContext
from cellfeed.server.kinds.dynaclr.config import DynaCLRConfig
from cellfeed.server.kinds.dynaclr.geometry import Geometry, experiment_geometry, nearest_exact
from cellfeed.server.kinds.dynaclr.index import CellIndex, build_index
from cellfeed.server.kinds.dynaclr.inputs import load_inputs
from cellfeed.server.kinds.dynaclr.positives import PositiveSampler
from cellfeed.server.kinds.dynaclr.registry import ExperimentRegistry
from cellfeed.server.kinds.dynaclr.selection import MatchPositives, Selection
from cellfeed.server.kinds.dynaclr.validation import validation_sampler
from cellfeed.server.errors import CellfeedError
from cellfeed.server.reading.omezarr import (
    NORM_LEVELS,
    NORM_STATS,
    ImageReader,
    PatchRequest,
    normalization_table,
    open_plate,
)
from cellfeed.server.samplers.base import PlannedBatch, Sampler
from cellfeed.server.kinds.dynaclr.sampler import FlexibleBatchSampler, FlexibleOptions
from cellfeed.server.samplers.sequential import SequentialSampler
from cellfeed.server.kinds.base import HEAP, Buffers, Source
from cellfeed.wire import codec
from cellfeed.wire import dynaclr as wire

log = logging.getLogger(__name__)

SPLITS = ("train", "val", wire.PREDICT)
_SPLIT_KEY = {"train": 0, "val": 1, wire.PREDICT: 2}
# the index row column behind each numeric index column of the wire (the same name otherwise)
_INDEX_ROW_COLUMN = {"lineage_id": "lineage_track_id", "hours_post_infection": "hpi"}


class DynaCLRSource(Source):
    kind = wire.KIND

    def __init__(
        self,
        config: DynaCLRConfig,
        registry: ExperimentRegistry,
        index: CellIndex,
        reader: ImageReader,
        geometry: list[Geometry] | None = None,
        form: str = "experiments_yaml",
    ) -> None:
        self.config = config
        self.registry = registry
        self.index = index
        self.reader = reader
        self.form = form
        self.geometry = geometry or [
            Geometry(z0=config.z_range[0], native=(config.z_count, *config.patch_yx), scale=(1.0, 1.0, 1.0), z_focus=None)
            for _ in registry.experiments
        ]
        rows = index.rows
        names = registry.names
        self.sel = Selection(config, registry, index)
        sel = self.sel
        self.val_experiments = [n for n in names if n in set(config.val_experiments)]
        self.train_experiments = [n for n in names if n not in set(config.val_experiments)]
        if not self.train_experiments:
            raise CellfeedError("dynaclr config: val_experiments holds every experiment; none is left to train on")
        in_train = sel.train_rows(self.val_experiments)
        self.match = MatchPositives(sel, config.positive_match_columns, in_train) if sel.match_mode else None
        anchor_ok = sel.anchor_rows(self.match)
        self.items = {
            "train": sel.items_of(anchor_ok & in_train),
            "val": sel.items_of(anchor_ok & ~in_train),
            wire.PREDICT: sel.items_of(np.ones(len(index), dtype=bool)),
        }
        if len(self.items["train"]) == 0:
            raise CellfeedError(
                "no valid anchor in the training experiments: no track has an observation tau_range later "
                f"(tau in frames per experiment: {dict(zip(names, index.tau_frames))})"
            )
        train = self.items["train"]
        group, group_names = sel.codes(train, sel.group_columns)
        stratum, stratum_names = sel.codes(train, sel.stratify_columns)
        options = FlexibleOptions(
            batch_size=config.batch_size,
            experiment_aware=bool(sel.group_columns),
            condition_balanced=bool(sel.stratify_columns),
            leaky=config.leaky,
            temporal_enrichment=config.temporal_enrichment,
            temporal_window_hours=config.temporal_window_hours,
            temporal_global_fraction=config.temporal_global_fraction,
            experiment_weights=sel.group_weights(group_names),
            condition_ratio=sel.stratum_ratio(stratum_names),
            seed=config.seed,
        )
        self.options = options
        self.samplers: dict[str, Sampler] = {
            "train": FlexibleBatchSampler(group, stratum, rows["hpi"][sel.item_row[train]], options),
            "val": SequentialSampler(len(self.items["val"]), config.batch_size),
            wire.PREDICT: SequentialSampler(len(self.items[wire.PREDICT]), config.batch_size),
        }
        self.positives = (
            PositiveSampler(index.grid, rows["experiment"], index.tau_frames, config.tau_decay_rate)
            if config.temporal_positives
            else None
        )
        self.fov_names = index.fov_names
        fov_name_code = {n: i for i, n in enumerate(self.fov_names)}
        self._fov_name_code = np.array([fov_name_code[ref.fov.name] for ref in index.fovs], dtype=np.int32)
        exps = registry.experiments
        self._channels = [tuple(exps[ref.experiment].channel_names.index(c) for c in sel.read_channels[ref.experiment]) for ref in index.fovs]
        self._norm_static, self._norm_t = self._norm_tables()
        self.patch_shape = (sel.num_channels, config.z_count, *config.patch_yx)
        self.channel_keys = sel.channel_keys(form)
        self._rescaled = any(g.rescaled for g in self.geometry)
        self._dicts = {
            "experiment": pa.array(names, pa.string()),
            "condition": pa.array(index.conditions, pa.string()),
            "fov_name": pa.array(self.fov_names, pa.string()),
            **{k: pa.array(v, pa.string()) for k, v in sel.vocab.items()},
        }
        self._schemas = {split: self._build_schema(split) for split in SPLITS}

    @classmethod
    def open(cls, config: dict[str, Any], ctx: ServerContext) -> "DynaCLRSource":
        cfg = DynaCLRConfig.parse(config)
        root = ctx.data_root
        inputs = load_inputs(
            cfg, root, lambda path: ctx.handles.get(path, lambda p: open_plate(p, root.relative(p), root), name="omezarr-plate")
        )
        registry = inputs.registry
        for name in cfg.val_experiments:
            registry.get(name)
        geometry = experiment_geometry(registry, inputs.plates, cfg)
        index = build_index(
            registry,
            inputs.plates,
            inputs.tracks_paths,
            patch_yx=cfg.patch_yx,
            z_range=(0, cfg.z_count),
            tau_range_hours=cfg.tau_range,
            include_wells=cfg.include_wells,
            exclude_fovs=cfg.exclude_fovs,
            tracks_label=inputs.tracks_label,
            root=root,
            tables=inputs.tables,
            native_yx=[g.native[1:] for g in geometry],
            z_spans=[(g.z0, g.native[0]) for g in geometry],
            max_border_shift=cfg.max_border_shift,
            require_anchors=cfg.temporal_positives,
        )
        source = cls(cfg, registry, index, ctx.image_reader(cfg.cache_pool_bytes), geometry=geometry, form=inputs.form)
        source.samplers["val"] = validation_sampler(source, inputs.form)  # VisCy main: val through the training sampler
        return source

    def info(self) -> dict[str, Any]:
        rows, index, sel = self.index.rows, self.index, self.sel
        experiments = []
        for e, exp in enumerate(self.registry.experiments):
            mine = rows["experiment"] == e
            g = self.geometry[e]
            experiments.append(
                {
                    "name": exp.name,
                    "data_path": exp.data_path,
                    "channel_names": exp.channel_names,
                    "source_channel": exp.source_channel,
                    "markers": exp.source_markers,
                    "read_channels": sel.read_channels[e],
                    "interval_minutes": exp.interval_minutes,
                    "start_hpi": exp.start_hpi,
                    "organelle": exp.organelle,
                    "microscope": exp.microscope,
                    "pixel_size_xy_um": exp.pixel_size_xy_um,
                    "pixel_size_z_um": exp.pixel_size_z_um,
                    "date": exp.date,
                    "moi": exp.moi,
                    "conditions": sorted(exp.condition_wells),
                    "tau_range_frames": list(index.tau_frames[e]),
                    "z_range": [g.z0, g.z0 + g.native[0]],
                    "z_focus": g.z_focus,
                    "native_patch_zyx": list(g.native),
                    "scale_zyx": list(g.scale),
                    "fovs": sum(1 for ref in index.fovs if ref.experiment == e),
                    "rows": int(np.count_nonzero(mine)),
                    "valid_anchors": int(np.count_nonzero(mine & index.valid)),
                }
            )
        return {
            "form": self.form,
            "experiments": experiments,
            "train_experiments": self.train_experiments,
            "val_experiments": self.val_experiments,
            "split_mode": sel.split_mode,
            "val_fovs": sel.val_fovs,
            "conditions": index.conditions,
            "fov_names": self.fov_names,
            "channel_keys": self.channel_keys,
            "channels_per_sample": self.config.channels_per_sample,
            "patch_shape": list(self.patch_shape),
            "norm_levels": list(NORM_LEVELS),
            "norm_stats": list(NORM_STATS),
            "batch_size": self.config.batch_size,
            "sampling": "weighted" if self.options.weighted else "permutation",
            "batch_group_by": sel.group_columns,
            "stratify_by": sel.stratify_columns,
            "positive_cell_source": "self" if self.config.positive_cell_source == "self" else "lookup",
            "positive_match_columns": self.config.positive_match_columns or ["lineage_id"],
            "label_encoders": sel.label_vocab,
            "return_meta": sel.return_meta,
            "splits": {s: {"items": int(len(self.items[s]))} for s in SPLITS},
            "warnings": index.warnings,
        }

    def schema(self, split: str) -> pa.Schema:
        self.sampler(split)
        return self._schemas[split]

    def batch(self, split: str, epoch: int, rank: int, world_size: int, index: int, *, buffers: Buffers = HEAP) -> pa.RecordBatch:
        planned: PlannedBatch = self.sampler(split).batch(epoch, rank, world_size, index)
        items = self.items[split][planned.items]
        sel = self.sel
        # chans: the read channel each item takes (-1: all of them; one with channels_per_sample=1)
        anchors, chans = sel.item_row[items], sel.item_slot[items]
        n = len(anchors)
        columns: dict[str, pa.Array] = {}
        if split == wire.PREDICT:
            images = self._read(anchors, chans, buffers.array(wire.ANCHOR, (n, *self.patch_shape), np.dtype(np.float32)))
            columns[wire.ANCHOR] = codec.tensor_column(images)
            columns[wire.norm(wire.ANCHOR)] = codec.tensor_column(self._norm(anchors, chans))
        else:
            # Positives are a function of (seed, split, epoch, global batch); val ignores the epoch.
            rng = np.random.default_rng(
                [self.config.seed, _SPLIT_KEY[split], epoch if split == "train" else 0, planned.global_index]
            )
            if self.positives is not None:
                positives, _ = self.positives.sample(anchors, rng)
            elif self.match is not None:
                positives = self.match.sample(anchors, rng)
            else:  # positive_cell_source="self": the anchor's own crop, two views made on the device
                positives = anchors
            pos_chans = sel.positive_slots(chans, positives, rng)
            # one read of anchors and positives, straight into one array: anchors first
            images = buffers.array(wire.IMAGES, (2 * n, *self.patch_shape), np.dtype(np.float32))
            if positives is anchors:
                self._read(anchors, chans, images[:n])
                images[n:] = images[:n]
            else:
                self._read(np.concatenate([anchors, positives]), np.concatenate([chans, pos_chans]), images)
            columns[wire.ANCHOR] = codec.tensor_column(images[:n])
            columns[wire.POSITIVE] = codec.tensor_column(images[n:])
            columns[wire.norm(wire.ANCHOR)] = codec.tensor_column(self._norm(anchors, chans))
            columns[wire.norm(wire.POSITIVE)] = codec.tensor_column(self._norm(positives, pos_chans))
        columns[wire.PADDING] = pa.array(planned.padding, pa.bool_())
        if split == wire.PREDICT or self.config.return_index:
            columns.update(self._index_columns(anchors, chans))
            if split != wire.PREDICT:
                columns[wire.POSITIVE_TRACK_ID] = pa.array(self.index.rows["track_id"][positives], pa.int64())
                columns[wire.POSITIVE_T] = pa.array(self.index.rows["t"][positives].astype(np.int32), pa.int32())
        if sel.return_meta:
            columns.update(self._meta_columns(wire.META_PREFIXES[wire.ANCHOR], anchors, chans))
            if split != wire.PREDICT:
                columns.update(self._meta_columns(wire.META_PREFIXES[wire.POSITIVE], positives, pos_chans))
        return pa.RecordBatch.from_arrays(list(columns.values()), schema=self._schemas[split])

    def _read(self, rows: np.ndarray, chans: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Each row's patch into `out` ([N, C, Z, Y, X] float32), resampled where pixel sizes differ."""
        if not self._rescaled:
            return self.reader.read(self.patches(rows, chans), self.patch_shape[1:], out=out)
        requests = self.patches(rows, chans)
        exp = self.index.rows["experiment"][rows]
        for e in np.unique(exp):
            where = np.flatnonzero(exp == e)
            native = self.geometry[e].native
            part = self.reader.read([requests[i] for i in where], native)
            out[where] = part if tuple(native) == tuple(self.patch_shape[1:]) else nearest_exact(part, self.patch_shape[1:])
        return out

    def patches(self, rows: np.ndarray, chans: np.ndarray | None = None) -> list[PatchRequest]:
        """The patch of each index row: its FOV, frame, channels (one with channels_per_sample=1),
        the experiment's Z window and the clamped origin."""
        r, fovs = self.index.rows, self.index.fovs
        if chans is None:
            chans = np.full(len(rows), -1, dtype=np.int64)
        z0 = [g.z0 for g in self.geometry]
        return [
            PatchRequest(
                fovs[f].fov,
                int(t),
                self._channels[f] if s < 0 else (self._channels[f][s],),
                z0[fovs[f].experiment],
                int(y0),
                int(x0),
            )
            for f, t, y0, x0, s in zip(r["fov"][rows], r["t"][rows], r["y0"][rows], r["x0"][rows], chans)
        ]

    def _norm(self, rows: np.ndarray, chans: np.ndarray | None = None) -> np.ndarray:
        """[n, C, levels, stats]: dataset and FOV statistics, then those of the row's timepoint."""
        fov, t = self.index.rows["fov"][rows], self.index.rows["t"][rows]
        out = np.concatenate([self._norm_static[fov], self._norm_t[fov, t][:, :, None, :]], axis=2)
        if self.sel.bag:
            picked = out[np.arange(len(rows)), chans]  # a fresh [n, levels, stats] array
            out = picked.reshape(len(rows), 1, *picked.shape[1:])
        return out

    def _norm_tables(self) -> tuple[np.ndarray, np.ndarray]:
        t_max = max(ref.fov.shape[0] for ref in self.index.fovs)
        static, per_t = [], []
        for ref in self.index.fovs:
            s, pt = normalization_table(ref.fov, self.sel.read_channels[ref.experiment], t_max)
            static.append(s)
            per_t.append(pt)
        return np.stack(static), np.stack(per_t)

    def _index_columns(self, rows: np.ndarray, chans: np.ndarray) -> dict[str, pa.Array]:
        r = self.index.rows
        out: dict[str, pa.Array] = {
            "experiment": pa.DictionaryArray.from_arrays(r["experiment"][rows].astype(np.int32), self._dicts["experiment"]),
            "condition": pa.DictionaryArray.from_arrays(r["condition"][rows].astype(np.int32), self._dicts["condition"]),
            "fov_name": pa.DictionaryArray.from_arrays(self._fov_name_code[r["fov"][rows]], self._dicts["fov_name"]),
        }
        for name, dtype in wire.INDEX_NUMERIC:
            out[name] = pa.array(r[_INDEX_ROW_COLUMN.get(name, name)][rows].astype(dtype.to_pandas_dtype()), dtype)
        for name in wire.INDEX_MAIN:
            out[name] = pa.DictionaryArray.from_arrays(self.sel.value_codes(name, rows, chans), self._dicts[name])
        return out

    def _meta_columns(self, prefix: str, rows: np.ndarray, chans: np.ndarray) -> dict[str, pa.Array]:
        r, sel = self.index.rows, self.sel
        out: dict[str, pa.Array] = {}
        for name in wire.META_DICT:
            codes = self._fov_name_code[r["fov"][rows]] if name == "fov_name" else sel.value_codes(name, rows, chans)
            out[wire.meta(prefix, name)] = pa.DictionaryArray.from_arrays(codes, self._dicts[name])
        exp = r["experiment"][rows]
        native = np.array([g.native for g in self.geometry], dtype=np.int64)
        values = {
            "track_id": r["track_id"][rows],
            "t": r["t"][rows],
            "hours_post_perturbation": r["hpi"][rows],
            "lineage_id": r["lineage_track_id"][rows],
            "y_clamp": r["y0"][rows] + native[exp, 1] // 2,
            "x_clamp": r["x0"][rows] + native[exp, 2] // 2,
        }
        for name, dtype in wire.META_NUMERIC:
            out[wire.meta(prefix, name)] = pa.array(np.asarray(values[name]).astype(dtype.to_pandas_dtype()), dtype)
        for key, codes in sel.label_codes(rows, chans).items():
            out[wire.label(prefix, key)] = pa.array(codes, pa.int32())
        return out

    def _build_schema(self, split: str) -> pa.Schema:
        facts = {
            "patch_shape": list(self.patch_shape),
            "channel_keys": self.channel_keys,
            "source_channels": {e.name: self.sel.read_channels[i] for i, e in enumerate(self.registry.experiments)},
            "norm_levels": list(NORM_LEVELS),
            "norm_stats": list(NORM_STATS),
        }
        return wire.batch_schema(
            split,
            self.patch_shape,
            (self.patch_shape[0], len(NORM_LEVELS), len(NORM_STATS)),
            with_index=self.config.return_index,
            labels=list(self.sel.label_vocab) if self.sel.return_meta else None,
            facts=facts,
        )
