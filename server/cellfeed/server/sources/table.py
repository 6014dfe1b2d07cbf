"""The table stream: batches of rows from a preprocessed parquet dataset (docs/protocol/table.md).

A dataset is a folder made by the preprocess pipeline (output/<name> with {train,test}/chunks,
or chunks/ unsplit) or any folder of parquet files (one split, "all"). One record batch holds
`batch_size` rows with the columns asked for, in the types stored; the training split is
shuffled by row-group windows, the others come in file order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from cellfeed.server.context import ServerContext
from cellfeed.server.errors import CellfeedError, parse_model
from cellfeed.server.preprocess.layout import chunk_dirs
from cellfeed.server.preprocess.outputs import read_manifest
from cellfeed.server.reading.parquet import ParquetFolder
from cellfeed.server.samplers.table import TableSampler
from cellfeed.server.sources.base import Alloc, Source
from cellfeed.wire import codec


class TableConfig(BaseModel):
    """The session config of a table stream."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="folder inside the data root: output/<name> of the pipeline, or a folder of parquet files")
    split: str | None = Field(None, description="the training split, shuffled (default: train, else the only split)")
    columns: list[str] | None = Field(None, min_length=1, description="columns to stream (default: all)")
    batch_size: int = Field(64, ge=1)
    shuffle: bool = True
    seed: int = Field(0, ge=0)
    drop_last: bool = Field(False, description="drop the training split's last partial batches instead of padding")
    window: int = Field(4, ge=1, description="row groups whose rows are shuffled together")


class TableSource(Source):
    kind = "table"

    def __init__(self, config: TableConfig, label: str, folders: dict[str, ParquetFolder], manifest: dict[str, Any] | None, ctx: ServerContext) -> None:
        self.config = config
        self.label = label
        self.folders = folders
        self.manifest = manifest
        self.ctx = ctx
        first = next(iter(folders.values()))
        self.columns = config.columns or first.schema.names
        missing = [c for c in self.columns if c not in first.schema.names]
        if missing:
            raise CellfeedError(f"{label}: no column {missing[0]!r}; columns: {', '.join(first.schema.names)}")
        train = config.split or ("train" if "train" in folders else next(iter(folders)))
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
        fields = [first.schema.field(c) for c in self.columns]
        self._schema = codec.with_metadata(pa.schema(fields), {"kind": self.kind, "dataset": label})

    @classmethod
    def open(cls, config: dict[str, Any], ctx: ServerContext) -> "TableSource":
        cfg = parse_model(TableConfig, config, "table config")
        path = ctx.data_root.resolve(cfg.dataset)
        label = ctx.data_root.relative(path)
        if not path.is_dir():
            raise CellfeedError(f"{label}: a table dataset is a folder (output/<name> of the pipeline, or a folder of parquet files)")
        dirs = chunk_dirs(path) or {"all": path}
        folders = {name: ctx.handles.get(folder, lambda p, name=name: ParquetFolder(p, f"{label}:{name}", ctx.data_root), name="parquet") for name, folder in dirs.items()}
        schemas = {name: f.schema for name, f in folders.items()}
        first_name, first_schema = next(iter(schemas.items()))
        for name, schema in schemas.items():
            if not schema.equals(first_schema):
                raise CellfeedError(f"{label}: split {name!r} has a different schema from {first_name!r}")
        return cls(cfg, label, folders, read_manifest(path), ctx)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.label,
            "columns": self.columns,
            "types": {f.name: str(f.type) for f in self._schema},
            "train_split": self.train_split,
            "batch_size": self.config.batch_size,
            "splits": {name: {"rows": f.num_rows, "files": len(f.files), "row_groups": len(f.groups)} for name, f in self.folders.items()},
        }
        if self.manifest:
            out["manifest"] = {k: self.manifest.get(k) for k in ("dataset", "cells", "rows", "split", "age", "genes") if k in self.manifest}
        return out

    def schema(self, split: str) -> pa.Schema:
        self.sampler(split)
        return self._schema

    def batch(self, split: str, epoch: int, rank: int, world_size: int, index: int, *, alloc: Alloc | None = None) -> pa.RecordBatch:
        rows = self.sampler(split).batch(epoch, rank, world_size, index)
        folder = self.folders[split]
        groups = folder.group_of(rows)
        order = np.argsort(groups, kind="stable")
        pieces = []
        for g in np.unique(groups):
            table = self._group(folder, split, int(g))
            local = rows[order][groups[order] == g] - folder.starts[g]
            pieces.append(table.take(pa.array(local)))
        gathered = pa.concat_tables(pieces).take(pa.array(np.argsort(order, kind="stable")))
        return pa.RecordBatch.from_arrays([c.combine_chunks() for c in gathered.columns], schema=self._schema)

    def _group(self, folder: ParquetFolder, split: str, group: int) -> pa.Table:
        key = (folder, group, tuple(self.columns))  # the handle: one version of the folder
        return self.ctx.blocks.get(key, lambda: folder.read_group(group, self.columns))
