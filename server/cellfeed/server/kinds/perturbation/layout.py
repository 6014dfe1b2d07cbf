"""The row layout of one perturbation h5ad: target groups, control pools, and the sort check.

Samplers need each target's cells as one contiguous run (so a group reads as one slice) and the
controls of a file contiguous; files that break this are refused with the first offending row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cellfeed.server.errors import CellfeedError
from cellfeed.server.kinds.perturbation.config import CELL_LOAD, FileSpec
from cellfeed.server.reading.h5ad import H5ad

SORT_HINT = "rewrite it sorted with `cellfeed preprocess sort` (or POST /v1/jobs with kind \"sort\")"


@dataclass
class Group:
    """The cells of one (file, cell type, target): the unit that is shuffled and cut into items."""

    file: int
    cell_type: str
    target: str
    rows: np.ndarray  # int64, ascending, inside one contiguous target run
    batches: np.ndarray  # batch label per row
    split: str

    @property
    def start(self) -> int:
        return int(self.rows[0])

    @property
    def stop(self) -> int:
        return int(self.rows[-1]) + 1


@dataclass
class FileLayout:
    """Everything the sampler needs to know about one file, read once when a session opens."""

    spec: FileSpec
    h5: H5ad
    groups: list[Group]
    control_span: tuple[int, int]  # the contiguous run of control rows
    control_rows: dict[str, np.ndarray]  # cell type -> control rows
    control_rows_by_batch: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    row_batch: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # code per row
    batch_names: np.ndarray = field(default_factory=lambda: np.zeros(0, str))  # code -> batch label
    cell_types: set[str] = field(default_factory=set)
    batches: set[str] = field(default_factory=set)
    # every perturbed target of each cell type, loaded or not (vocabularies, rule checks)
    targets_by_cell_type: dict[str, set[str]] = field(default_factory=dict)

    @property
    def targets(self) -> set[str]:
        return set().union(*self.targets_by_cell_type.values()) if self.targets_by_cell_type else set()


def read_layout(
    spec: FileSpec,
    h5: H5ad,
    *,
    cell_type_label: str,
    target_label: str,
    control_label: str,
    batch_label: str,
    file_index: int,
    batch_prefix: str = "",
    split_by_batch: bool = False,
    control_items: bool = False,
) -> FileLayout:
    """Read obs columns, check the sort order, and build groups and control pools.

    A group is one (cell type, target) of the file, or with `split_by_batch` one (cell type,
    target, batch), so that its items' controls all come from one batch. A group the split rules
    put in two splits (cell-load's fewshot val and test) appears once per split; one they put in
    none (cell-load: a cell type of a dataset not trained on) does not appear.

    With `control_items` (cell-load's should_yield_control_cells), each cell type's control cells
    are groups too (target = the control label), in the splits `_control_splits` names."""
    n = h5.n_obs
    if n == 0:
        raise CellfeedError(f"{spec.label}: the file has no cells")
    targets = h5.obs_column(target_label)
    batches = h5.obs_column(batch_label)
    if cell_type_label in h5.obs_keys():
        cell_types = h5.obs_column(cell_type_label)
    else:  # protoplast's convention: one cell type per file, named by the file stem
        cell_types = pd.Categorical(np.full(n, spec.stem))
    target_codes = np.asarray(targets.codes, dtype=np.int64)
    batch_codes = np.asarray(batches.codes, dtype=np.int64)
    if (target_codes < 0).any():
        row = int(np.argmax(target_codes < 0))
        raise CellfeedError(f"{spec.label}: obs column {target_label!r} is missing a value at row {row}")
    target_names = np.asarray(targets.categories).astype(str)
    control_code = np.flatnonzero(target_names == control_label)
    if control_code.size == 0:
        raise CellfeedError(
            f"{spec.label}: no control cells: obs column {target_label!r} has no value {control_label!r} "
            "(set control_label to the name your controls use)"
        )
    control_code = int(control_code[0])

    starts, values = _runs(target_codes)
    _check_runs_unique(spec, h5, starts, values, target_names, target_label, control_code, control_label)
    key = target_codes * (len(batches.categories) + 1) + (batch_codes + 1)
    bstarts, bvalues = _runs(key)
    if len(np.unique(bvalues)) != len(bvalues):
        row = _first_repeat(bstarts, bvalues)
        raise CellfeedError(
            f"{spec.label}: rows are not sorted by {target_label} then {batch_label}: batch "
            f"{_label(batches, batch_codes[row])!r} of target {str(target_names[target_codes[row]])!r} "
            f"starts again at row {row} ({_obs_name(h5, row)}); {SORT_HINT}"
        )

    ct_codes = np.asarray(cell_types.codes, dtype=np.int64)
    ct_names = np.asarray(cell_types.categories).astype(str)
    batch_names = np.array([batch_prefix + str(b) for b in batches.categories] + [batch_prefix + "nan"])
    row_batch = np.where(batch_codes < 0, len(batch_names) - 1, batch_codes).astype(np.int32)
    row_batches = batch_names[row_batch]

    groups: list[Group] = []
    targets_by_cell_type: dict[str, set[str]] = {}
    control_span = (0, 0)
    stops = np.append(starts[1:], n)
    for start, stop, value in zip(starts.tolist(), stops.tolist(), values.tolist()):
        if value == control_code:
            control_span = (start, stop)
            continue
        run_ct = ct_codes[start:stop]
        for ct in np.unique(run_ct):
            rows = start + np.flatnonzero(run_ct == ct)
            cell_type = str(ct_names[ct]) if ct >= 0 else "nan"
            target = str(target_names[value])
            targets_by_cell_type.setdefault(cell_type, set()).add(target)
            if split_by_batch:
                run_batch = row_batch[rows]
                parts = [rows[run_batch == b] for b in np.unique(run_batch)]
            else:
                parts = [rows]
            for split in _splits_for(spec, cell_type, target):
                for part in parts:
                    groups.append(
                        Group(
                            file=file_index,
                            cell_type=cell_type,
                            target=target,
                            rows=part.astype(np.int64),
                            batches=row_batches[part],
                            split=split,
                        )
                    )

    lo, hi = control_span
    ctrl_ct = ct_codes[lo:hi]
    control_rows: dict[str, np.ndarray] = {}
    by_batch: dict[tuple[str, str], np.ndarray] = {}
    pert_splits: dict[str, set[str]] = {}
    for group in groups:
        pert_splits.setdefault(group.cell_type, set()).add(group.split)
    for ct in np.unique(ctrl_ct):
        rows = lo + np.flatnonzero(ctrl_ct == ct)
        name = str(ct_names[ct]) if ct >= 0 else "nan"
        control_rows[name] = rows.astype(np.int64)
        for b in np.unique(row_batches[rows]):
            by_batch[(name, str(b))] = rows[row_batches[rows] == b]
        if not control_items:
            continue
        parts = [rows[row_batch[rows] == b] for b in np.unique(row_batch[rows])] if split_by_batch else [rows]
        for split in _control_splits(spec, name, pert_splits.get(name, set())):
            for part in parts:
                groups.append(
                    Group(file=file_index, cell_type=name, target=control_label, rows=part.astype(np.int64),
                          batches=row_batches[part], split=split)
                )
    for group in groups:
        if group.cell_type not in control_rows:
            raise CellfeedError(
                f"{spec.label}: no control cells ({target_label} == {control_label!r}) for cell type "
                f"{group.cell_type!r}, so its perturbed cells cannot be matched"
            )
    return FileLayout(
        spec=spec,
        h5=h5,
        groups=groups,
        control_span=control_span,
        control_rows=control_rows,
        control_rows_by_batch=by_batch,
        cell_types={str(c) for c in np.unique(ct_names[ct_codes[ct_codes >= 0]])} | ({"nan"} if (ct_codes < 0).any() else set()),
        batches={str(b) for b in np.unique(row_batches)},
        row_batch=row_batch,
        batch_names=batch_names,
        targets_by_cell_type=targets_by_cell_type,
    )


def _splits_for(spec: FileSpec, cell_type: str, target: str) -> tuple[str, ...]:
    """The splits a (cell type, target) of this file is served in (see perturbation/config.py).

    cell-load: a zeroshot cell type goes whole to its split; else a fewshot cell type's targets go
    to the splits that list them (both val and test if both do), its other targets to train; else
    the cell type is trained on if its dataset's [training] value is "train", and dropped if not.
    Cell types are matched on the obs value only.
    protoplast: fewshot (per target) beats zeroshot (whole cell type or file) beats train; cell
    types are matched on the obs value or the file stem."""
    if spec.schema == CELL_LOAD:
        if cell_type in spec.zeroshot:
            return (spec.zeroshot[cell_type],)
        if cell_type in spec.fewshot:
            listed = spec.fewshot[cell_type].get(target, ())
            return (listed,) if isinstance(listed, str) else (tuple(listed) or ("train",))
        return (spec.split,) if spec.split is not None else ()
    for key in (cell_type, spec.stem):
        if key in spec.fewshot and target in spec.fewshot[key]:
            split = spec.fewshot[key][target]
            return (split,) if isinstance(split, str) else tuple(split)
    for key in (cell_type, spec.stem):
        if key in spec.zeroshot:
            return (spec.zeroshot[key],)
    return (spec.split or "train",)


def _control_splits(spec: FileSpec, cell_type: str, pert_splits: set[str]) -> tuple[str, ...]:
    """The splits whose items include a cell type's control cells (control items), as cell-load
    0.10.4 builds its subsets: a [zeroshot] cell type's controls are in train and in its split; a
    [fewshot] cell type's in train and in each split holding some of its perturbed cells (none if
    it has no perturbed cell); any other cell type's in train when its dataset is trained on.
    protoplast's schema: the splits of the cell type's perturbed cells (train if none)."""
    if spec.schema == CELL_LOAD:
        if cell_type in spec.zeroshot:
            return tuple(s for s in ("train", "val", "test") if s in {"train", spec.zeroshot[cell_type]})
        if cell_type in spec.fewshot:
            return tuple(s for s in ("train", "val", "test") if s == "train" or s in pert_splits) if pert_splits else ()
        return ("train",) if spec.split == "train" else ()
    return tuple(s for s in ("train", "val", "test") if s in (pert_splits or {"train"}))


def _runs(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start row and value of each run of equal consecutive codes."""
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    return starts, codes[starts]


def _first_repeat(starts: np.ndarray, values: np.ndarray) -> int:
    """The start row of the first run whose value already had a run."""
    _, first = np.unique(values, return_index=True)
    repeated = np.setdiff1d(np.arange(len(values)), first)
    return int(starts[repeated.min()])


def _check_runs_unique(spec, h5, starts, values, names, target_label, control_code, control_label) -> None:
    if len(np.unique(values)) == len(values):
        return
    row = _first_repeat(starts, values)
    run = int(np.searchsorted(starts, row))
    value = values[run]
    if value == control_code:
        raise CellfeedError(
            f"{spec.label}: controls ({target_label} == {control_label!r}) are not contiguous: they start again "
            f"at row {row} ({_obs_name(h5, row)}); {SORT_HINT}"
        )
    raise CellfeedError(
        f"{spec.label}: rows are not sorted by {target_label}: target {str(names[value])!r} starts again at row "
        f"{row} ({_obs_name(h5, row)}); {SORT_HINT}"
    )


def _obs_name(h5: H5ad, row: int) -> str:
    return f"obs_name {str(h5.obs_names()[row])!r}"


def _label(cat: pd.Categorical, code: int) -> str:
    return str(cat.categories[code]) if code >= 0 else "nan"
