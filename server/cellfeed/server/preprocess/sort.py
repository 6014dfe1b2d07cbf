"""The sort job: rewrite a perturbation h5ad with rows sorted by target, then batch.

That is the layout the perturbation sampler needs (each target one contiguous run, controls
included, batches contiguous inside it, in pandas groupby order). Row order within a group is
kept. Every obs-indexed element moves with its rows (obs, X, layers, obsm, obsp, raw/X); var,
varm, varp and uns are copied. Large row-indexed arrays are permuted out of core: rows are
spilled to bucket files by destination, then each bucket is ordered and written contiguously
(sparse), or gathered per destination range in sorted runs (dense), so memory is bounded by
`memory_bytes`, not by the file.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from anndata.io import read_elem, write_elem
from pydantic import BaseModel, ConfigDict, Field

from cellfeed.server.errors import CellfeedError
from cellfeed.server.limits import PathName
from cellfeed.server.preprocess.atomic import remove_at, remove_stale_at, fd_path, output_lock
from cellfeed.server.preprocess.convert import Cancelled
from cellfeed.server.reading.h5ad import H5ad

if TYPE_CHECKING:
    from cellfeed.server.paths import DataRoot

COPIED = ("var", "varm", "varp", "uns")
SPARSE = ("csr_matrix", "csc_matrix")


SORT_MEMORY_BYTES = 256 << 20  # rows held in memory at once while permuting; beyond, they spill to buckets


class SortOptions(BaseModel):
    """What a sort orders rows by and where it writes: the `options` of a sort job (unknown keys
    refused) and the flags of `cellfeed preprocess sort`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_label: str = Field("target_gene", description="obs column of the perturbation target; rows are grouped by it")
    batch_label: str = Field("batch_var", description="obs column of the batch; rows are ordered by it within a target")
    output_dir: PathName | None = Field(
        None, description="folder for <stem>.sorted.h5ad; default: a folder `sorted` in each input's folder (never beside the input)"
    )


@dataclass
class SortResult:
    path: Path
    output: Path
    rows: int
    moved: int
    seconds: float
    message: str


SORTED_DIR = "sorted"


def default_output(path: Path, output_dir: str | Path | None = None) -> Path:
    """`<output_dir>/<stem>.sorted.h5ad`, else `<input folder>/sorted/<stem>.sorted.h5ad`: never
    beside the input, so a pattern or a folder naming the inputs does not pick up the sorted copies too."""
    path = Path(path)
    folder = Path(output_dir) if output_dir else path.parent / SORTED_DIR
    return folder / f"{path.stem}.sorted{path.suffix}"


def sort_order(h5: H5ad, options: SortOptions) -> np.ndarray:
    """Row order: target (category order, i.e. groupby order), then batch, then original position;
    rows with a missing target or batch go last within their group."""
    keys = []
    for label in (options.batch_label, options.target_label):
        codes = np.asarray(h5.obs_column(label).codes, dtype=np.int64)
        keys.append(np.where(codes < 0, codes.max(initial=0) + 1, codes))
    return np.lexsort(keys)


def sort_file(
    path: Path,
    output: Path | None = None,
    options: SortOptions = SortOptions(),
    *,
    memory_bytes: int = SORT_MEMORY_BYTES,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    root: "DataRoot | None" = None,
) -> SortResult:
    """Write `output` (default: default_output(path, options.output_dir)) sorted; nothing is
    written if already sorted; at most about `memory_bytes` of rows are held at once. Progress is reported in cells: (done, n_obs).

    The output is locked while it is written (OutputBusy if another process writes it), built
    as a hidden temp file beside it (with a spill folder) through the parent's descriptor, and
    renamed into place; leftovers of a killed earlier sort of the same output are removed first.
    With `root`, input and output are resolved inside it as they are opened."""
    started = time.time()
    path = Path(path)
    output = Path(output) if output else default_output(path, options.output_dir)
    h5 = H5ad(path if root is None else root.contain(path, path.name), path.name)
    try:
        order = sort_order(h5, options)
        n = h5.n_obs
    finally:
        h5.close()
    moved = int((order != np.arange(n)).sum())
    if moved == 0:
        return SortResult(path, path, n, 0, round(time.time() - started, 3), "already sorted by target then batch; nothing written")
    if output.resolve() == path.resolve():
        raise CellfeedError(f"{path.name}: the sorted copy cannot overwrite its input; name another output")
    with output_lock(output, root) as parent:  # one writer per output, across processes
        remove_stale_at(parent, output.name)  # what a killed earlier sort left: temp file, spill folder
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp, spill_name = f".{output.name}.tmp-{tag}", f".{output.name}.spill-{tag}"
        try:
            os.mkdir(spill_name, 0o700, dir_fd=parent)
        except OSError as exc:
            raise CellfeedError(f"cannot write to {output.parent.name!r}: {exc.strerror or exc}") from None
        here = fd_path(parent, output.parent)
        try:
            with h5py.File(path if root is None else root.contain(path), "r") as src, h5py.File(here / tmp, "w") as dst:
                _Rewriter(src, dst, order, memory_bytes, here / spill_name, progress, cancelled).run()
            os.replace(tmp, output.name, src_dir_fd=parent, dst_dir_fd=parent)
        except (OSError, KeyError, ValueError) as exc:
            raise CellfeedError(f"{path.name}: cannot sort ({type(exc).__name__}: {exc})") from None
        finally:
            remove_at(parent, tmp)
            remove_at(parent, spill_name)
    return SortResult(path, output, n, moved, round(time.time() - started, 3), f"{moved:,} of {n:,} rows moved")


class _Rewriter:
    """Copies one h5ad into another with every obs-indexed axis permuted by `order`."""

    def __init__(self, src: h5py.File, dst: h5py.File, order: np.ndarray, memory_bytes: int, spill: Path, progress, cancelled) -> None:
        self.src, self.dst = src, dst
        self.order = order
        self.n = len(order)
        self.dest_of = np.empty(self.n, dtype=np.int64)
        self.dest_of[order] = np.arange(self.n)
        self.budget = memory_bytes
        self.spill = spill
        self.progress = progress
        self.cancelled = cancelled
        self.done = 0

    def run(self) -> None:
        """Each obs-indexed element in turn; progress in cells: element k of K done is k/K of n."""
        self.dst.attrs.update(dict(self.src.attrs))
        total_steps = sum(1 for k in self.src.keys() if k not in COPIED)
        for key in self.src.keys():
            node = self.src[key]
            if key in COPIED:
                self.src.copy(node, self.dst, key)
            elif key == "obs":
                self._dataframe(node, self.dst, key)
            elif key in ("X",):
                self._rows(node, self.dst, key, remap_columns=False)
            elif key in ("layers", "obsm", "obsp"):
                group = self._group(node, self.dst, key)
                for name in node.keys():
                    self._element(node[name], group, name, remap_columns=key == "obsp")
            elif key == "raw":
                group = self._group(node, self.dst, key)
                for name in node.keys():
                    if name == "X":
                        self._rows(node[name], group, name, remap_columns=False)
                    else:
                        self.src.copy(node[name], group, name)
            else:
                self.src.copy(node, self.dst, key)
            if key in COPIED:
                continue
            self.done += 1
            if self.progress:
                self.progress(self.n * self.done // max(1, total_steps), self.n)
        if self.progress and total_steps == 0:
            self.progress(self.n, self.n)

    def _check(self) -> None:
        if self.cancelled():
            raise Cancelled()

    @staticmethod
    def _group(node: h5py.Group, parent: h5py.Group, name: str) -> h5py.Group:
        group = parent.create_group(name)
        group.attrs.update(dict(node.attrs))
        return group

    def _element(self, node, parent: h5py.Group, name: str, remap_columns: bool) -> None:
        encoding = str(node.attrs.get("encoding-type", ""))
        if encoding == "dataframe":
            self._dataframe(node, parent, name)
        elif encoding in SPARSE or isinstance(node, h5py.Dataset):
            self._rows(node, parent, name, remap_columns)
        else:
            raise CellfeedError(f"{node.name}: cannot reorder an element encoded as {encoding or 'unknown'}")

    def _dataframe(self, node: h5py.Group, parent: h5py.Group, name: str) -> None:
        """A dataframe column by column (memory: one column at a time)."""
        group = self._group(node, parent, name)
        for column in node.keys():
            self._check()
            values = read_elem(node[column])
            write_elem(group, column, values[self.order])

    def _rows(self, node, parent: h5py.Group, name: str, remap_columns: bool) -> None:
        if isinstance(node, h5py.Dataset):
            self._dense(node, parent, name)
            return
        encoding = str(node.attrs.get("encoding-type", ""))
        group = self._group(node, parent, name)
        if encoding == "csr_matrix":
            self._csr(node, group, remap=remap_columns)
        elif encoding == "csc_matrix":
            self._csc(node, group, permute_columns=remap_columns)
        else:
            raise CellfeedError(f"{node.name}: cannot reorder an element encoded as {encoding or 'unknown'}")

    def _dense(self, node: h5py.Dataset, parent: h5py.Group, name: str) -> None:
        """A dense array whose first axis is obs: each destination range gathers its rows."""
        if node.ndim == 0 or node.shape[0] != self.n:
            raise CellfeedError(f"{node.name}: first axis has {node.shape[0] if node.ndim else 0} rows, obs has {self.n}")
        out = parent.create_dataset(name, shape=node.shape, dtype=node.dtype)
        out.attrs.update(dict(node.attrs))
        row_bytes = max(1, int(np.prod(node.shape[1:], dtype=np.int64)) * node.dtype.itemsize)
        step = max(1, self.budget // row_bytes)
        for lo in range(0, self.n, step):
            self._check()
            hi = min(lo + step, self.n)
            out[lo:hi] = _gather_rows(node, self.order[lo:hi])

    def _csr(self, node: h5py.Group, group: h5py.Group, remap: bool) -> None:
        """Permute the rows of a CSR matrix (and remap its column indices for obsp)."""
        indptr = node["indptr"][...].astype(np.int64)
        lengths = np.diff(indptr)
        new_indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(lengths[self.order], out=new_indptr[1:])
        data_src, idx_src = node["data"], node["indices"]
        data_out = group.create_dataset("data", shape=(int(new_indptr[-1]),), dtype=data_src.dtype)
        idx_out = group.create_dataset("indices", shape=(int(new_indptr[-1]),), dtype=idx_src.dtype)
        group.create_dataset("indptr", data=new_indptr)
        entry_bytes = data_src.dtype.itemsize + idx_src.dtype.itemsize
        cap = max(1, self.budget // entry_bytes)
        bounds = _buckets(new_indptr, cap)
        if len(bounds) == 2:  # fits in memory: gather directly
            data, idx = data_src[...], idx_src[...]
            take = _entries(indptr, self.order)
            data_out[...] = data[take]
            idx_out[...] = self.dest_of[idx[take]] if remap else idx[take]
            return
        bucket_of_dest = np.searchsorted(bounds, np.arange(self.n), side="right") - 1
        bucket_of_src = bucket_of_dest[self.dest_of]
        files = _Spill(self.spill)
        for lo, hi in _buckets(indptr, cap, rows=True):  # pass 1: source blocks to buckets
            self._check()
            data, idx = data_src[indptr[lo] : indptr[hi]], idx_src[indptr[lo] : indptr[hi]]
            local = indptr[lo : hi + 1] - indptr[lo]
            for b in np.unique(bucket_of_src[lo:hi]):
                rows = np.flatnonzero(bucket_of_src[lo:hi] == b)
                take = _entries(local, rows)
                files.append(int(b), self.dest_of[lo + rows], lengths[lo + rows], data[take], idx[take])
        for b in range(len(bounds) - 1):  # pass 2: each bucket ordered and written contiguously
            self._check()
            dest, lens, data, idx = files.read(b, data_src.dtype, idx_src.dtype)
            take = _entries(np.r_[0, np.cumsum(lens)], np.argsort(dest, kind="stable"))
            lo, hi = int(new_indptr[bounds[b]]), int(new_indptr[bounds[b + 1]])
            data_out[lo:hi] = data[take]
            idx_out[lo:hi] = self.dest_of[idx[take]] if remap else idx[take]

    def _csc(self, node: h5py.Group, group: h5py.Group, permute_columns: bool) -> None:
        """CSC stores obs as row indices: remap them block by block (and permute columns for obsp)."""
        if permute_columns:  # an obs x obs CSC is the transpose of a CSR with the same permutation
            self._csr(node, group, remap=True)
            return
        for key in node.keys():
            if key != "indices":
                node.copy(node[key], group, key)
        src = node["indices"]
        out = group.create_dataset("indices", shape=src.shape, dtype=src.dtype)
        step = max(1, self.budget // max(1, src.dtype.itemsize * 2))
        for lo in range(0, src.shape[0], step):
            self._check()
            out[lo : lo + step] = self.dest_of[src[lo : lo + step]]


def _entries(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions in data/indices of the given rows' entries, rows in the order given."""
    starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
    offsets = np.r_[0, np.cumsum(lengths)[:-1]]
    return np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))


def _buckets(indptr: np.ndarray, cap: int, rows: bool = False) -> list:
    """Row boundaries splitting a CSR into runs of at most ~cap entries (at least one row each);
    as (lo, hi) pairs when rows=True, else as the boundary list."""
    n = len(indptr) - 1
    bounds = [0]
    while bounds[-1] < n:
        lo = bounds[-1]
        hi = int(np.searchsorted(indptr, indptr[lo] + cap, side="right")) - 1
        bounds.append(min(n, max(hi, lo + 1)))
    return list(zip(bounds[:-1], bounds[1:])) if rows else bounds


def _gather_rows(node: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Rows of a dataset in the given order, read in sorted runs."""
    ordered = np.argsort(rows, kind="stable")
    wanted = rows[ordered]
    out = np.empty((len(rows),) + node.shape[1:], dtype=node.dtype)
    breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(wanted)]):
        out[ordered[a:b]] = node[int(wanted[a]) : int(wanted[b - 1]) + 1]
    return out


class _Spill:
    """Append-only bucket files: destination rows, lengths, data and indices per bucket."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / uuid.uuid4().hex[:8]
        self.folder.mkdir()

    def _path(self, bucket: int, part: str) -> Path:
        return self.folder / f"{bucket}.{part}"

    def append(self, bucket: int, dest: np.ndarray, lengths: np.ndarray, data: np.ndarray, indices: np.ndarray) -> None:
        for part, array in (("dest", dest.astype(np.int64)), ("len", lengths.astype(np.int64)), ("data", data), ("idx", indices)):
            with open(self._path(bucket, part), "ab") as fh:
                fh.write(np.ascontiguousarray(array).tobytes())

    def read(self, bucket: int, data_dtype: np.dtype, idx_dtype: np.dtype) -> tuple[np.ndarray, ...]:
        def load(part: str, dtype) -> np.ndarray:
            path = self._path(bucket, part)
            return np.fromfile(path, dtype=dtype) if path.exists() else np.zeros(0, dtype)

        out = (load("dest", np.int64), load("len", np.int64), load("data", data_dtype), load("idx", idx_dtype))
        for part in ("dest", "len", "data", "idx"):
            self._path(bucket, part).unlink(missing_ok=True)
        return out
