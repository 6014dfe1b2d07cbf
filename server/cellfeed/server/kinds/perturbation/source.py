"""The perturbation stream: groups of S perturbed cells with S matched controls, as CSR batches.

One record batch = one training batch of B items; its rows are the B*S perturbed cells in item
order (item b owns rows b*S .. b*S+S-1), each row also carrying its matched control cell.
"""

from __future__ import annotations

import logging
import math
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from anndata.io import read_elem

from cellfeed.server.context import ServerContext
from cellfeed.server.errors import CellfeedError
from cellfeed.server.kinds.perturbation.config import CELL_LOAD, SPLITS, PerturbationConfig, resolve_files
from cellfeed.server.kinds.perturbation.embeddings import load_embeddings
from cellfeed.server.kinds.perturbation.gene_names import cell_load_gene_names
from cellfeed.server.kinds.perturbation.layout import FileLayout, read_layout
from cellfeed.server.kinds.perturbation.matrices import X, RowMatrix, Shape, hvg_width
from cellfeed.server.reading.blocks import CSRBlock
from cellfeed.server.reading.h5ad import H5ad
from cellfeed.server.kinds.perturbation.sampler import PerturbationPlannedBatch, PerturbationSampler
from cellfeed.server.kinds.base import HEAP, Buffers, Source
from cellfeed.wire import codec, csr
from cellfeed.wire import perturbation as wire

log = logging.getLogger(__name__)

# TOML [dataset_opts] keys and the config fields they set (protoplast's names).
_DATASET_OPTS = {
    "cell_type_label": "cell_type_label",
    "target_label": "target_label",
    "control_label": "control_label",
    "batch_label": "batch_label",
    "n_basal_samples": "group_size_S",
    "group_size_S": "group_size_S",
    "use_batches": "match_controls_by_batch",
}


class PerturbationSource(Source):
    kind = wire.KIND

    def __init__(
        self,
        config: PerturbationConfig,
        layouts: list[FileLayout],
        ctx: ServerContext,
        *,
        toml_schema: str | None = None,
        warnings: list[str] | None = None,
        unknown_rules: list[dict[str, str]] | None = None,
    ) -> None:
        self.config = config
        self.layouts = layouts
        self.ctx = ctx
        self.toml_schema = toml_schema
        self.warnings = list(warnings or [])
        self.unknown_rules = list(unknown_rules or [])
        self.var_names = layouts[0].h5.var_names()
        # the matrices read: the cells' rows (X, or obsm[embed_key]) and the optional counts
        self.main_key = config.embed_key or X
        self._matrices: dict[tuple[int, str], RowMatrix] = {}
        self._shapes: dict[str, Shape] = {}
        for key in {self.main_key, config.pert_counts, config.ctrl_counts} - {None}:
            for f, layout in enumerate(layouts):
                matrix = RowMatrix(layout.h5, key)
                first = self._shapes.setdefault(key, matrix.shape)
                if matrix.shape != first:
                    raise CellfeedError(
                        f"{layout.spec.label}: {key} is {'dense' if matrix.shape.dense else 'CSR'} of width "
                        f"{matrix.shape.width}, unlike {layouts[0].spec.label}'s ({'dense' if first.dense else 'CSR'}, "
                        f"{first.width}); every file of a session must share it"
                    )
                self._matrices[(f, key)] = matrix
        self.input_dim = self._shapes[self.main_key].width
        self.hvg_dim = hvg_width(layouts[0].h5)
        self.cell_types = sorted(set().union(*(l.cell_types for l in layouts)))
        self.exp_batches = sorted(set().union(*(l.batches for l in layouts)))  # experimental batches
        targets = sorted(set().union(*(l.targets for l in layouts)) | {config.control_label})
        self.targets = targets
        self._target_code = {t: i for i, t in enumerate(targets)}
        self._cell_type_code = {c: i for i, c in enumerate(self.cell_types)}
        exp_batch_code = {b: i for i, b in enumerate(self.exp_batches)}
        self.embedding_dim = len(targets)
        self._embeddings: np.ndarray | None = None
        self.missing_embeddings: list[str] = []
        if config.pert_embedding_file:
            path = ctx.data_root.resolve(config.pert_embedding_file)
            self._embeddings, self.missing_embeddings = load_embeddings(
                path, ctx.data_root.relative(path), targets, control=config.control_label
            )
            self.embedding_dim = int(self._embeddings.shape[1])
        groups = [g for l in layouts for g in l.groups]
        groups, self.val_subsets = _subsample_val(groups, layouts, config.val_subsample_fraction)
        self.samplers = {
            split: PerturbationSampler(
                [g for g in groups if g.split == split],
                layouts,
                group_size=config.group_size_S,
                batch_size=config.batch_size,
                block_size=config.block_size,
                window_blocks=config.window_blocks,
                seed=config.seed,
                stream_key=k,
                match_controls_by_exp_batch=config.match_controls_by_batch,
                once=split != "train",
                drop_last=config.drop_last,
                max_cells_per_group=config.max_cells_per_group,
                fixed_control_pairs=config.fixed_control_pairs,
            )
            for k, split in enumerate(SPLITS)
        }
        # per split, each group's file, target code and cell type code; per row of the files, one
        # after another, its session experimental-batch code (and barcode): batches look these up, no loops
        self._group_codes = {
            split: np.array(
                [(g.file, self._target_code[g.target], self._cell_type_code[g.cell_type]) for g in sampler.groups],
                dtype=np.int64,
            ).reshape(-1, 3)
            for split, sampler in self.samplers.items()
        }
        self._row_offset = np.cumsum([0] + [l.h5.n_obs for l in layouts])
        session_exp_batch = [np.array([exp_batch_code.get(str(n), 0) for n in l.batch_names], dtype=np.int32) for l in layouts]
        self._row_exp_batch = np.concatenate([codes[l.row_batch] for codes, l in zip(session_exp_batch, layouts)])
        self._barcodes = np.concatenate([l.h5.obs_names() for l in layouts]) if config.barcodes else None
        self.obs_columns = {name: _obs_values([l.h5 for l in layouts], name) for name in config.obs_columns}
        self.datasets = sorted({l.spec.dataset for l in layouts})
        self._file_dataset = np.array([self.datasets.index(l.spec.dataset) for l in layouts], dtype=np.int32)
        # Controls are reused by many items per epoch: when all control rows fit in
        # control_table_max_bytes they are sent once with the session and batches carry row ids.
        control_bytes = sum(
            self._rows(f, *l.control_span, key).nbytes for f, l in enumerate(layouts) for key in self._control_keys()
        )
        # thinned control rows differ each batch: they go inline
        thinned = config.downsample is not None and X in self._control_keys()
        self.controls_by_row = control_bytes <= config.control_table_max_bytes and not thinned
        # a file's control row r is row r + _control_base[file] of the controls table
        table_offset = np.cumsum([0] + [l.control_span[1] - l.control_span[0] for l in layouts])
        self._control_base = table_offset[:-1] - np.array([l.control_span[0] for l in layouts])
        self._schema = self._build_schema()

    @classmethod
    def open(cls, config: dict[str, Any], ctx: ServerContext) -> "PerturbationSource":
        cfg = PerturbationConfig.parse(config)
        files = resolve_files(cfg, ctx.data_root)
        unknown = sorted(set(files.dataset_opts) - set(_DATASET_OPTS))
        if unknown:
            raise CellfeedError(f"TOML config: unknown key {unknown[0]!r} in [dataset_opts] (known: {', '.join(sorted(_DATASET_OPTS))})")
        updates = {_DATASET_OPTS[k]: v for k, v in files.dataset_opts.items()}
        warnings = list(files.warnings)
        if updates:
            cfg = PerturbationConfig.parse({**cfg.model_dump(), **updates})
        layouts = []
        for i, spec in enumerate(files.files):
            h5 = ctx.handles.get(spec.path, lambda p, label=spec.label: H5ad(p, label), name="h5ad")
            layouts.append(
                read_layout(
                    spec,
                    h5,
                    cell_type_label=cfg.cell_type_label,
                    target_label=cfg.target_label,
                    control_label=cfg.control_label,
                    batch_label=cfg.batch_label,
                    file_index=i,
                    batch_prefix=f"{spec.stem}:" if cfg.prefix_batches_with_file else "",
                    split_by_batch=cfg.match_controls_by_batch,
                    control_items=cfg.control_items,
                )
            )
        _check_same_genes(layouts)
        unknown = _check_rules(layouts)
        for rule in unknown:
            warnings.append(
                f"[{rule['table']}] {rule['key']!r}: {rule['kind']} {rule['name']!r} is not in the files of dataset "
                f"{rule['dataset']!r}; accepted as cell-load does (it selects no cells)"
            )
        for warning in warnings:
            log.warning("perturbation session: %s", warning)
        return cls(cfg, layouts, ctx, toml_schema=files.schema, warnings=warnings, unknown_rules=unknown)

    def info(self) -> dict[str, Any]:
        return {
            "var_names": self.var_names.tolist(),
            "cell_load_genes": cell_load_gene_names(self.layouts[0].h5, self.var_names.tolist()),  # get_var_names()
            "n_vars": len(self.var_names),
            "embed_key": self.config.embed_key,
            "input_dim": self.input_dim,
            "hvg_dim": self.hvg_dim,
            "encoding": {p: ("dense" if self._shapes[k].dense else "csr") for p, k in self._prefix_keys().items()},
            "control_items": self.config.control_items,
            "counts_dims": {p: self._shapes[k].width for p, k in self._prefix_keys().items() if p.endswith("_counts")},
            "downsample": self.config.downsample,
            "val_subsets": self.val_subsets,
            "obs_columns": {n: (v[1] if v[1] is not None else str(v[0].dtype)) for n, v in self.obs_columns.items()},
            "datasets": self.datasets,
            "cell_types": self.cell_types,
            "batches": self.exp_batches,
            "targets": self.targets,
            "control_label": self.config.control_label,
            "embedding_dim": self.embedding_dim,
            "pert_emb": "table" if self._embeddings is not None else "onehot",
            "missing_embeddings": self.missing_embeddings,
            "group_size_S": self.config.group_size_S,
            "batch_size": self.config.batch_size,
            "barcodes": self.config.barcodes,
            "controls": "table" if self.controls_by_row else "inline",
            "files": [l.spec.label for l in self.layouts],
            "splits": {
                s: {
                    "items": self.samplers[s].num_items,
                    "groups": len(self.samplers[s].groups),
                    "cells": int(sum(len(g.rows) for g in self.samplers[s].groups)),
                }
                for s in SPLITS
            },
            "toml_schema": self.toml_schema,
            "match_controls_by_batch": self.config.match_controls_by_batch,
            "control_fallbacks": (
                {s: self.samplers[s].control_fallbacks() for s in SPLITS} if self.config.match_controls_by_batch else None
            ),
            "unknown_rules": self.unknown_rules,
            "warnings": self.warnings,
        }

    def tables(self) -> dict[str, pa.Table]:
        return self._tables

    @cached_property
    def _tables(self) -> dict[str, pa.Table]:
        """Built once per session, not once per client that opens it."""
        tables: dict[str, pa.Table] = {}
        if self._embeddings is not None:
            tables[wire.EMBEDDINGS_TABLE] = pa.table({wire.TARGET: pa.array(self.targets), wire.EMBEDDING: codec.tensor_column(self._embeddings)})
        if self.controls_by_row:
            pieces = [(f, lo, hi, np.arange(hi - lo)) for f, (lo, hi) in enumerate(l.control_span for l in self.layouts)]
            columns: dict[str, pa.Array] = {}
            for prefix in wire.CONTROL_MATRICES:
                key = self._prefix_keys().get(prefix)
                if key is not None:
                    columns.update(self._matrix_columns(prefix, key, pieces, HEAP))
            tables[wire.CONTROLS_TABLE] = pa.table(columns)
        return tables

    def schema(self, split: str) -> pa.Schema:
        self.sampler(split)
        return self._schema

    def batch(self, split: str, epoch: int, rank: int, world_size: int, index: int, *, buffers: Buffers = HEAP) -> pa.RecordBatch:
        planned: PerturbationPlannedBatch = self.sampler(split).batch(epoch, rank, world_size, index)
        group, pert_rows, ctrl_rows = planned.group, planned.pert_rows, planned.ctrl_rows
        S = self.config.group_size_S
        cell_mask = (np.arange(S)[None, :] < planned.n_real[:, None]).ravel()
        files, target_codes, ct_codes = self._group_codes[split][group].T

        keys = self._prefix_keys()
        pert_pieces = [
            (read.block.file, read.block.start, read.block.stop, (pert_rows[read.lo : read.hi] - read.block.start).ravel())
            for read in planned.reads
        ]
        j = planned.global_index
        columns: dict[str, pa.Array] = {}
        for prefix in wire.PERT_MATRICES:
            if prefix in keys:
                columns.update(self._matrix_columns(prefix, keys[prefix], pert_pieces, buffers, self._thinning(prefix, split, epoch, j)))
        if self.controls_by_row:
            ctrl_index = self._control_base[files][:, None] + ctrl_rows
            columns[wire.CTRL_ROW] = pa.array(ctrl_index.ravel().astype(np.int32))
        else:
            ctrl_pieces = []
            for f in np.unique(files):
                lo, hi = self.layouts[f].control_span
                ctrl_pieces.append((int(f), lo, hi, (ctrl_rows[files == f] - lo).ravel()))
            for prefix in wire.CONTROL_MATRICES:
                if prefix in keys:
                    columns.update(self._matrix_columns(prefix, keys[prefix], ctrl_pieces, buffers, self._thinning(prefix, split, epoch, j)))

        global_rows = (self._row_offset[files][:, None] + pert_rows).ravel()
        columns[wire.TARGET] = pa.DictionaryArray.from_arrays(np.repeat(target_codes.astype(np.int32), S), self._target_dict)
        columns[wire.CELL_TYPE] = pa.DictionaryArray.from_arrays(np.repeat(ct_codes.astype(np.int32), S), self._cell_type_dict)
        columns[wire.EXP_BATCH] = pa.DictionaryArray.from_arrays(self._row_exp_batch[global_rows], self._exp_batch_dict)
        columns[wire.CELL_MASK] = pa.array(cell_mask, pa.bool_())
        if self._barcodes is not None:
            ctrl_global_rows = (self._row_offset[files][:, None] + ctrl_rows).ravel()
            columns[wire.PERT_BARCODE] = pa.array(self._barcodes[global_rows], pa.string())
            columns[wire.CTRL_BARCODE] = pa.array(self._barcodes[ctrl_global_rows], pa.string())
        if self.config.dataset_column:
            columns[wire.DATASET] = pa.DictionaryArray.from_arrays(np.repeat(self._file_dataset[files], S), self._dataset_dict)
        for name, (values, vocab) in self.obs_columns.items():
            if vocab is None:
                columns[wire.obs(name)] = pa.array(values[global_rows])
            else:
                columns[wire.obs(name)] = pa.DictionaryArray.from_arrays(values[global_rows], pa.array(vocab, pa.string()))
        return pa.RecordBatch.from_arrays(list(columns.values()), schema=self._schema)

    def _prefix_keys(self) -> dict[str, str]:
        """Column prefix -> the matrix its rows come from."""
        keys = {wire.PERT: self.main_key, wire.CTRL: self.main_key}
        if self.config.pert_counts:
            keys[wire.PERT_COUNTS] = self.config.pert_counts
        if self.config.ctrl_counts:
            keys[wire.CTRL_COUNTS] = self.config.ctrl_counts
        return keys

    def _control_keys(self) -> list[str]:
        return [k for p, k in self._prefix_keys().items() if p in wire.CONTROL_MATRICES]

    def _matrix_columns(
        self, prefix: str, key: str, pieces: list[tuple[int, int, int, np.ndarray]], buffers: Buffers,
        thin: np.random.Generator | None = None,
    ) -> dict[str, pa.Array]:
        """The columns of `prefix` holding, in order, rows `rel` of each (file, start, stop, rel)
        block of matrix `key`: CSR list columns, or one dense tensor column. `thin`: X's counts
        thinned with this generator (cell-load's downsample, see `_thin_values`)."""
        shape = self._shapes[key]
        if shape.dense:
            n = sum(len(rel) for *_, rel in pieces)
            out = buffers.array(wire.dense(prefix), (n, shape.width), np.dtype(np.float32))
            at = 0
            for f, lo, hi, rel in pieces:
                block = self._rows(f, lo, hi, key)
                if len(rel) and (int(rel.min()) < 0 or int(rel.max()) >= len(block)):
                    raise IndexError(f"rows outside the {len(block)} rows of block {lo}..{hi} of {key}")
                # mode="clip" (bounds checked above): "raise" would buffer the whole gather once more
                np.take(block, rel, axis=0, out=out[at : at + len(rel)], mode="clip")
                at += len(rel)
            if thin is not None:
                flat = out.reshape(-1)
                flat[:] = _thin_values(flat, np.repeat(np.arange(n), shape.width), n, self.config.downsample, self.config.is_log1p, thin)
            return {wire.dense(prefix): codec.tensor_column(out)}
        index_type = codec.index_type(shape.width)
        indices_name, data_name = (f.name for f in codec.csr_fields(prefix, index_type))

        def values(nnz: int) -> tuple[np.ndarray, np.ndarray]:
            """The gather writes the batch's CSR values straight into arrays from `buffers`."""
            made = buffers.arrays({indices_name: ((nnz,), np.dtype(index_type.to_pandas_dtype())), data_name: ((nnz,), np.dtype(np.float32))})
            return made[indices_name], made[data_name]

        indptr, indices, data = csr.gather([(self._rows(f, lo, hi, key).csr, rel) for f, lo, hi, rel in pieces], out=values)
        if thin is not None:
            n = len(indptr) - 1
            data[:] = _thin_values(data, np.repeat(np.arange(n), np.diff(indptr)), n, self.config.downsample, self.config.is_log1p, thin)
        return dict(codec.csr_columns(prefix, indptr, indices, data, index_type))

    def _thinning(self, prefix: str, split: str, epoch: int, j: int) -> np.random.Generator | None:
        """With `downsample`, the generator that thins the X rows of `prefix` in global batch j."""
        if self.config.downsample is None or self._prefix_keys().get(prefix) != X:
            return None
        k = (wire.PERT, wire.CTRL, wire.PERT_COUNTS, wire.CTRL_COUNTS).index(prefix)  # seeds: fixed order
        return np.random.default_rng([self.config.seed, SPLITS.index(split), epoch, j, 2, k])

    def _rows(self, file: int, start: int, stop: int, key: str = X) -> CSRBlock | np.ndarray:
        matrix = self._matrices[(file, key)]
        index_dtype = codec.index_type(self._shapes[key].width).to_pandas_dtype()
        # keyed by the handle (one version of the file), so a rewritten file never mixes in
        cache_key = (self.layouts[file].h5, start, stop) if key == X else (self.layouts[file].h5, "obsm", key, start, stop)
        return self.ctx.blocks.get(cache_key, lambda: matrix.read(start, stop, index_dtype))

    def _build_schema(self) -> pa.Schema:
        self._target_dict = pa.array(self.targets, pa.string())
        self._cell_type_dict = pa.array(self.cell_types, pa.string())
        self._exp_batch_dict = pa.array(self.exp_batches, pa.string())
        self._dataset_dict = pa.array(self.datasets, pa.string())
        matrices = {prefix: (self._shapes[key].dense, self._shapes[key].width) for prefix, key in self._prefix_keys().items()}
        obs_types = {
            name: pa.from_numpy_dtype(values.dtype) if vocab is None else pa.dictionary(pa.int32(), pa.string())
            for name, (values, vocab) in self.obs_columns.items()
        }
        return wire.batch_schema(
            matrices,
            controls_by_row=self.controls_by_row,
            barcodes=self.config.barcodes,
            dataset_column=self.config.dataset_column,
            obs_types=obs_types,
            meta={"group_size_S": self.config.group_size_S, "n_vars": len(self.var_names), "input_dim": self.input_dim},
        )


def _subsample_val(groups: list, layouts: list[FileLayout], fraction: float | None) -> tuple[list, dict[str, int]]:
    """cell-load's val_subsample_fraction: of the val split's (file, cell type) subsets, ordered by
    dataset, then file, then cell type, the first ceil(n * fraction) (at least one) are kept."""
    subsets = sorted(
        {(layouts[g.file].spec.dataset, layouts[g.file].spec.label, g.cell_type, g.file) for g in groups if g.split == "val"}
    )
    if fraction is None or not subsets:
        return groups, {"kept": len(subsets), "of": len(subsets)}
    keep = max(1, math.ceil(len(subsets) * fraction))
    kept = {(file, ct) for _, _, ct, file in subsets[:keep]}
    return [g for g in groups if g.split != "val" or (g.file, g.cell_type) in kept], {"kept": min(keep, len(subsets)), "of": len(subsets)}


def _thin_values(values: np.ndarray, rows: np.ndarray, n_rows: int, target: float, is_log1p: bool, rng: np.random.Generator) -> np.ndarray:
    """Binomial thinning of each row's counts (cell-load's downsample): p = target when <= 1,
    else min(1, target / the row's total count)."""
    counts = np.rint(np.expm1(values)) if is_log1p else values.astype(np.float64)
    counts = np.maximum(counts, 0).astype(np.int64)
    if target <= 1.0:
        p = np.full(len(counts), target)
    else:
        totals = np.bincount(rows, weights=counts, minlength=n_rows)
        per_row = np.where(totals > 0, np.minimum(1.0, target / np.maximum(totals, 1)), 1.0)
        p = per_row[rows]
    sampled = rng.binomial(counts, p).astype(np.float32)
    return np.log1p(sampled).astype(np.float32) if is_log1p else sampled


def _obs_values(h5s: list[H5ad], name: str) -> tuple[np.ndarray, list[str] | None]:
    """An obs column over every file, one after another: numbers as they are (with None), strings
    and categories as int32 codes into a sorted vocabulary."""
    parts = []
    for h5 in h5s:
        obs = h5.file["obs"]
        if name not in obs:
            have = ", ".join(sorted(h5.obs_keys())) or "none"
            raise CellfeedError(f"{h5.label}: obs has no column {name!r} (obs_columns; columns: {have})")
        with h5._lock:
            parts.append(read_elem(obs[name]))
    numeric = all(not isinstance(p, pd.Categorical) and np.asarray(p).dtype.kind in "biuf" for p in parts)
    if numeric:
        return np.concatenate([np.asarray(p) for p in parts]), None
    strings = [np.asarray(p, dtype=object).astype(str) for p in parts]
    vocab, codes = np.unique(np.concatenate(strings), return_inverse=True)
    return codes.astype(np.int32), [str(v) for v in vocab]


def _check_same_genes(layouts: list[FileLayout]) -> None:
    first = layouts[0].h5.var_names()
    for layout in layouts[1:]:
        names = layout.h5.var_names()
        if len(names) != len(first) or not np.array_equal(names, first):
            raise CellfeedError(
                f"{layout.spec.label}: var_names differ from {layouts[0].spec.label} "
                f"({len(names)} vs {len(first)} genes); every file of a session must share one gene space"
            )


def _check_rules(layouts: list[FileLayout]) -> list[dict[str, str]]:
    """The zeroshot/fewshot rules that name a cell type (or, under protoplast's schema, file stem)
    or a fewshot target absent from their dataset's files.

    protoplast's schema: an unknown cell type or target is refused. cell-load's: accepted (cell-load
    selects no cells for it), and returned, to be warned about and listed in the session info."""
    cell_types: dict[str, set[str]] = {}
    stems: dict[str, set[str]] = {}
    targets: dict[tuple[str, str], set[str]] = {}
    for layout in layouts:
        dataset = layout.spec.dataset
        cell_types.setdefault(dataset, set()).update(layout.cell_types)
        stems.setdefault(dataset, set()).add(layout.spec.stem)
        for ct, names in layout.targets_by_cell_type.items():
            targets.setdefault((dataset, ct), set()).update(names)
        targets.setdefault((dataset, layout.spec.stem), set()).update(layout.targets)
    unknown: list[dict[str, str]] = []
    seen_rules: set[tuple] = set()
    for layout in layouts:
        spec = layout.spec
        dataset = spec.dataset
        strict = spec.schema != CELL_LOAD
        known = cell_types[dataset] | (stems[dataset] if strict else set())
        for table, rules in (("zeroshot", spec.zeroshot), ("fewshot", spec.fewshot)):
            for celltype in rules:
                key = f"{dataset}.{celltype}"
                if celltype not in known:
                    if strict:
                        raise CellfeedError(
                            f"TOML config: [{table}] key {key!r} names no cell type or "
                            f"file of dataset {dataset!r} (have: {', '.join(sorted(known))})"
                        )
                    rule = {"table": table, "key": key, "dataset": dataset, "kind": "cell type", "name": celltype}
                    if (table, key, celltype) not in seen_rules:
                        seen_rules.add((table, key, celltype))
                        unknown.append(rule)
                    continue
                if table != "fewshot":
                    continue
                have = targets.get((dataset, celltype), set())
                for target in rules[celltype]:
                    if target in have or (table, key, target) in seen_rules:
                        continue
                    if strict:
                        raise CellfeedError(
                            f"TOML config: [fewshot.{key!r}] lists target {target!r}, which no perturbed cell of "
                            f"{key!r} has (its targets: {', '.join(sorted(have)) or 'none'})"
                        )
                    seen_rules.add((table, key, target))
                    unknown.append({"table": table, "key": key, "dataset": dataset, "kind": "target", "name": target})
    return unknown
