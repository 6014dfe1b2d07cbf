"""The table stream: batches of rows from a preprocessed parquet dataset (docs/protocol/table.md).

A dataset is a folder made by the preprocess pipeline (output/<name> with {train,test}/chunks,
or chunks/ unsplit) or any folder of parquet files (one split, "all"). Several datasets stream
as one (a batch-mode output folder, whose subfolders are datasets, or a list of folders): their
rows follow each other in name order, a `dataset_name` column says whose each row is, and a
column that only some of them have is null in the others.

One record batch holds `batch_size` rows with the columns asked for, in the types stored, plus
the `padding` mask; the schema is declared once from the parquet footers: a column is nullable
only when some row group holds a null (or does not say). The training split is shuffled by
row-group windows, the others come in file order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cellfeed.server.context import ServerContext
from cellfeed.server.errors import CellfeedError, parse_model
from cellfeed.server.preprocess.folders import chunk_dirs
from cellfeed.server.preprocess.outputs import read_manifest
from cellfeed.server.reading.parquet import ParquetFolder
from cellfeed.server.kinds.table.config import TableConfig
from cellfeed.server.kinds.table.sampler import TableSampler
from cellfeed.server.kinds.base import HEAP, Buffers, Source
from cellfeed.wire import table as wire

log = logging.getLogger(__name__)


class CombinedFolder:
    """Several datasets' folders of one split read as one: row groups of the first, then the next;
    every row group comes with the unified schema's columns (nulls where a dataset lacks one) and
    its `dataset_name`."""

    def __init__(self, parts: list[tuple[str, ParquetFolder]], schema: pa.Schema) -> None:
        self.parts = parts
        self.schema = schema
        self.files = [f for _, folder in parts for f in folder.files]
        self.groups = [(k, g) for k, (_, folder) in enumerate(parts) for g in range(len(folder.groups))]
        sizes = np.concatenate([np.diff(folder.starts) for _, folder in parts]) if parts else np.zeros(0, np.int64)
        self.starts = np.r_[0, np.cumsum(sizes)].astype(np.int64)

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def group_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1

    def null_counts(self) -> dict[str, int | None]:
        counts: dict[str, int | None] = {name: 0 for name in self.schema.names}
        counts[wire.DATASET_NAME] = 0
        for _, folder in self.parts:
            own = folder.null_counts()
            for name in self.schema.names:
                if name == wire.DATASET_NAME:
                    continue
                if name not in own:
                    counts[name] = None if counts[name] is None else counts[name] + folder.num_rows
                elif own[name] is None or counts[name] is None:
                    counts[name] = None
                else:
                    counts[name] += own[name]
        return counts

    def cache_key(self, group: int) -> tuple:
        """What the block cache keys a row group by: its dataset's folder handle and its row
        group there (shared by every session over that folder), and the dataset's name."""
        k, local = self.groups[group]
        return (self.parts[k][1], local, self.parts[k][0], "combined")

    def read_group(self, group: int, columns: list[str]) -> pa.Table:
        k, local = self.groups[group]
        name, folder = self.parts[k]
        have = [c for c in columns if c in folder.schema.names]
        table = folder.read_group(local, have)
        n = table.num_rows
        arrays = []
        for c in columns:
            if c == wire.DATASET_NAME:
                arrays.append(pa.array([name] * n, pa.string()))
            elif c in have:
                arrays.append(table.column(c).cast(self.schema.field(c).type))
            else:
                arrays.append(pa.nulls(n, self.schema.field(c).type))
        return pa.Table.from_arrays(arrays, names=columns)


def _unify(label: str, named: list[tuple[str, pa.Schema]]) -> pa.Schema:
    """One schema for several datasets: every column of any, in first-seen order, plus
    dataset_name; a column stored with two types is refused, naming both datasets."""
    fields: dict[str, tuple[str, pa.Field]] = {}
    for dataset, schema in named:
        if wire.DATASET_NAME in schema.names:
            raise CellfeedError(f"{label}: dataset {dataset!r} has a column {wire.DATASET_NAME!r}, the name the combined stream gives each row's dataset")
        for f in schema:
            seen = fields.get(f.name)
            if seen is None:
                fields[f.name] = (dataset, f)
            elif not seen[1].type.equals(f.type):
                raise CellfeedError(
                    f"{label}: column {f.name!r} is {seen[1].type} in dataset {seen[0]!r} but {f.type} in {dataset!r}; "
                    "datasets streamed as one must store a shared column with one type"
                )
    return pa.schema([f for _, f in fields.values()] + [pa.field(wire.DATASET_NAME, pa.string(), nullable=False)])


class TableSource(Source):
    kind = wire.KIND

    def __init__(self, config: TableConfig, label: str, folders: dict[str, Any], manifest: dict[str, Any] | None, ctx: ServerContext, datasets: list[str] | None = None) -> None:
        self.config = config
        self.label = label
        self.folders = folders
        self.manifest = manifest
        self.datasets = datasets
        self.ctx = ctx
        first = next(iter(folders.values()))
        names = first.schema.names
        if wire.PADDING in names:
            raise CellfeedError(f"{label}: the dataset has a column {wire.PADDING!r}, the name of the stream's padding mask; rename it")
        self.columns = config.columns or names
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise CellfeedError(f"{label}: no column {missing[0]!r}; columns: {', '.join(names)}")
        repeated = next((c for c in self.columns if self.columns.count(c) > 1), None)
        if repeated:
            raise CellfeedError(f"{label}: column {repeated!r} is asked for twice")
        train = config.train_split or ("train" if "train" in folders else next(iter(folders)))
        if train not in folders:
            raise CellfeedError(f"{label}: no split {train!r}; splits: {', '.join(folders)}")
        self.train_split = train
        self.samplers = {
            name: TableSampler(
                folder.starts,
                config.batch_size,
                shuffle=config.shuffle and name == train,
                seed=config.seed,
                drop_last=config.drop_last and name == train,
                window=config.window,
                stream_key=k,
            )
            for k, (name, folder) in enumerate(folders.items())
        }
        # declared once, for every split and batch: nullable where any split's footers show a null (or do not tell)
        nulls: dict[str, bool] = {c: False for c in self.columns}
        for folder in folders.values():
            counts = folder.null_counts()
            for c in self.columns:
                nulls[c] = nulls[c] or counts.get(c) is None or counts[c] > 0
        fields = [first.schema.field(c).with_nullable(nulls[c]) for c in self.columns]
        self._schema = wire.batch_schema(fields, label)

    @classmethod
    def open(cls, config: dict[str, Any], ctx: ServerContext) -> "TableSource":
        if isinstance(config, dict) and "split" in config:
            log.info("table config: %r is deprecated, use %r (the training split, not the split to stream)", "split", "train_split")
        cfg = parse_model(TableConfig, config, "table config")
        named = cfg.dataset if isinstance(cfg.dataset, list) else [cfg.dataset]
        paths = [ctx.data_root.resolve(d) for d in named]
        labels = [ctx.data_root.relative(p) for p in paths]
        for path, label in zip(paths, labels):
            if not path.is_dir():
                raise CellfeedError(f"{label}: a table dataset is a folder (output/<name> of the pipeline, a folder of parquet files, or a batch-mode output folder)")
        if len(paths) == 1:
            path, label = paths[0], labels[0]
            dirs = chunk_dirs(path)
            if dirs or _has_parquet(path):
                folders = cls._folders(ctx, label, dirs or {"all": path})
                return cls(cfg, label, folders, read_manifest(path), ctx)
            parts = [(p.name, p) for p in ctx.data_root.listdir(path, lambda p: p.is_dir() and not p.name.startswith(".") and bool(chunk_dirs(p)), skip_outside=True, label=label)]
            if not parts:
                raise CellfeedError(f"{label}: no parquet files, and no dataset folders (<name>/train/chunks, <name>/chunks) in it")
        else:
            parts = [(p.name, p) for p in paths]
            label = "+".join(labels)
            clash = next((n for n, _ in parts if [m for m, _ in parts].count(n) > 1), None)
            if clash:
                raise CellfeedError(f"{label}: two datasets are both named {clash!r}; dataset_name would not tell their rows apart")
        return cls._combined(cfg, ctx, label, parts)

    @classmethod
    def _folders(cls, ctx: ServerContext, label: str, dirs: dict[str, Path]) -> dict[str, ParquetFolder]:
        folders = {name: ctx.handles.get(folder, lambda p, name=name: ParquetFolder(p, f"{label}:{name}", ctx.data_root), name="parquet") for name, folder in dirs.items()}
        first_name, first = next(iter(folders.items()))
        for name, folder in folders.items():
            if not folder.schema.equals(first.schema):
                raise CellfeedError(f"{label}: split {name!r} has a different schema from {first_name!r}")
        return folders

    @classmethod
    def _combined(cls, cfg: TableConfig, ctx: ServerContext, label: str, parts: list[tuple[str, Path]]) -> "TableSource":
        each: list[tuple[str, dict[str, ParquetFolder]]] = []
        for name, path in parts:
            dirs = chunk_dirs(path) or ({"all": path} if _has_parquet(path) else {})
            if not dirs:
                raise CellfeedError(f"{label}: dataset {name!r} has no parquet files")
            each.append((name, cls._folders(ctx, f"{label}/{name}", dirs)))
        splits = list(each[0][1])
        for name, folders in each[1:]:
            if set(folders) != set(splits):
                raise CellfeedError(f"{label}: dataset {name!r} has splits {', '.join(folders)} but {each[0][0]!r} has {', '.join(splits)}; datasets streamed as one need the same splits")
        schema = _unify(label, [(name, next(iter(folders.values())).schema) for name, folders in each])
        combined = {s: CombinedFolder([(name, folders[s]) for name, folders in each], schema) for s in splits}
        manifests = {name: read_manifest(path) for name, path in parts}
        manifest = {"datasets": {n: {k: m.get(k) for k in ("dataset", "cells", "rows", "split") if k in m} for n, m in manifests.items() if m}}
        return cls(cfg, label, combined, manifest, ctx, datasets=[name for name, _ in each])

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.label,
            "columns": self.columns,
            "types": {f.name: str(f.type) for f in self._schema},
            "nullable": {f.name: f.nullable for f in self._schema},
            "padding": wire.PADDING,
            "train_split": self.train_split,
            "batch_size": self.config.batch_size,
            "splits": {name: {"rows": f.num_rows, "files": len(f.files), "row_groups": len(f.groups)} for name, f in self.folders.items()},
        }
        if self.datasets is not None:
            out["datasets"] = self.datasets
            out["manifest"] = self.manifest
        elif self.manifest:
            out["manifest"] = {k: self.manifest.get(k) for k in ("dataset", "cells", "rows", "split", "age", "genes") if k in self.manifest}
        return out

    def schema(self, split: str) -> pa.Schema:
        self.sampler(split)
        return self._schema

    def batch(self, split: str, epoch: int, rank: int, world_size: int, index: int, *, buffers: Buffers = HEAP) -> pa.RecordBatch:
        sampler = self.sampler(split)
        planned = sampler.batch(epoch, rank, world_size, index)
        rows, padding = planned.items, planned.padding
        folder = self.folders[split]
        groups = folder.group_of(rows)
        order = np.argsort(groups, kind="stable")
        pieces = []
        for g in np.unique(groups):
            table = self._group(folder, split, int(g))
            local = rows[order][groups[order] == g] - folder.starts[g]
            pieces.append(table.take(pa.array(local)))
        gathered = pa.concat_tables(pieces).take(pa.array(np.argsort(order, kind="stable")))
        arrays = [c.combine_chunks() for c in gathered.columns]
        arrays = [a.cast(f.type) if not a.type.equals(f.type) else a for a, f in zip(arrays, self._schema)]
        return pa.RecordBatch.from_arrays(arrays + [pa.array(padding, pa.bool_())], schema=self._schema)

    def _group(self, folder: Any, split: str, group: int) -> pa.Table:
        # the handle: one version of the folder (several datasets: the dataset's own handle)
        where = folder.cache_key(group) if isinstance(folder, CombinedFolder) else (folder, group)
        key = (*where, tuple(self.columns))
        return self.ctx.blocks.get(key, lambda: folder.read_group(group, self.columns))


def _has_parquet(path: Path) -> bool:
    return any(p.suffix == ".parquet" for p in path.iterdir() if p.is_file())
