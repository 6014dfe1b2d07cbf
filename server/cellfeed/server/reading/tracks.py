"""Tracking tables: one ultrack-style CSV per FOV under `{tracks_path}/{row}/{col}/{fov}/`.

Columns track_id, t, y, x are required; id, parent_track_id, parent_id and z are optional.
The FOV comes from the directory, not from a column.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from cellfeed.server.errors import CellfeedError

if TYPE_CHECKING:
    from cellfeed.server.paths import DataRoot

REQUIRED = ("track_id", "t", "y", "x")
OPTIONAL_INT = ("id",)
OPTIONAL_FLOAT = ("parent_track_id", "parent_id", "z")


def find_tracks_csv(tracks_path: Path, fov_name: str, root: "DataRoot | None" = None, label: str | None = None) -> Path | None:
    """The FOV's tracking CSV, or None if there is none; more than one is an error naming them.

    With `root`, the folder and the CSV are resolved inside it now (a CSV or folder that is a
    symlink out of the root is refused, naming it). `label` names the FOV folder in messages."""
    folder = tracks_path / fov_name
    shown = label or f"{tracks_path.name}/{fov_name}"
    if root is not None and folder.exists():
        folder = root.contain(folder, shown)
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.glob("*.csv") if not p.name.startswith("."))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CellfeedError(f"{shown}: {len(found)} tracking CSVs ({names}); a FOV folder holds one, so remove or rename the others")
    if not found:
        return None
    return root.contain(found[0], f"{shown}/{found[0].name}") if root is not None else found[0]


def read_tracks(path: Path, label: str) -> dict[str, np.ndarray]:
    """The CSV's columns as numpy arrays: ints as int64 (-1 if absent), the rest float64 (NaN if absent).

    A parent_track_id that is NaN or negative marks a root (ultrack writes -1).
    """
    try:
        table = pacsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CellfeedError(f"{label}: cannot be read as CSV ({exc})") from None
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise CellfeedError(f"{label}: missing column(s) {', '.join(missing)} (have: {', '.join(table.column_names)})")
    n = table.num_rows
    out: dict[str, np.ndarray] = {}
    for name in ("track_id", "t", *OPTIONAL_INT):
        if name in table.column_names:
            out[name] = _column(table, name, label, pa.int64()).astype(np.int64)
        else:
            out[name] = np.full(n, -1, dtype=np.int64)
    for name in ("y", "x", *OPTIONAL_FLOAT):
        if name in table.column_names:
            out[name] = _column(table, name, label, pa.float64())
        else:
            out[name] = np.full(n, np.nan)
    if n and (out["t"].min() < 0 or out["track_id"].min() < 0):
        raise CellfeedError(f"{label}: negative track_id or t")
    return out


def _column(table: pa.Table, name: str, label: str, dtype: pa.DataType) -> np.ndarray:
    column = table.column(name)
    try:
        column = pc.cast(column, dtype)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise CellfeedError(f"{label}: column {name!r} is not numeric") from None
    if dtype == pa.int64() and column.null_count:
        raise CellfeedError(f"{label}: column {name!r} has empty values")
    return column.to_numpy(zero_copy_only=False)
