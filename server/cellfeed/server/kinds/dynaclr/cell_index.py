"""VisCy main's cell index parquet: one row per (cell, frame, channel), built once from a collection.

`build_cell_index` writes the columns of `viscy_data.cell_index.CELL_INDEX_SCHEMA` (same names,
same types) from a collection's plates and tracking CSVs, as `dynaclr build-cell-index` does, and
with `preprocess=True` also fills `norm_*` and `z_focus_mean` from the plates' attributes and
drops rows without timepoint statistics, as `dynaclr preprocess-cell-index` does.
`read_cell_index` turns a parquet (cellfeed's or VisCy's) back into the registry and per-FOV
track tables the session index is built from, the same code path as the YAML forms.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cellfeed.server.kinds.dynaclr.lineage import lineage_roots
from cellfeed.server.kinds.dynaclr.registry import ExperimentConfig, ExperimentRegistry
from cellfeed.server.errors import CellfeedError
from cellfeed.server.reading.omezarr import Plate

CELL_INDEX_SCHEMA = pa.schema(
    [
        ("cell_id", pa.string()),
        ("experiment", pa.string()),
        ("store_path", pa.string()),
        ("tracks_path", pa.string()),
        ("fov", pa.string()),
        ("well", pa.string()),
        ("y", pa.float32()),
        ("x", pa.float32()),
        ("z", pa.int16()),
        ("perturbation", pa.string()),
        ("channel_name", pa.string()),
        ("t", pa.int32()),
        ("track_id", pa.int32()),
        ("global_track_id", pa.string()),
        ("lineage_id", pa.string()),
        ("parent_track_id", pa.int32()),
        ("hours_post_perturbation", pa.float32()),
        ("interval_minutes", pa.float32()),
        ("gene_name", pa.string()),
        ("reporter", pa.string()),
        ("sgRNA", pa.string()),
        ("microscope", pa.string()),
        ("marker", pa.string()),
        ("organelle", pa.string()),
        ("pixel_size_xy_um", pa.float32()),
        ("pixel_size_z_um", pa.float32()),
        ("T_shape", pa.int32()),
        ("C_shape", pa.int32()),
        ("Z_shape", pa.int32()),
        ("Y_shape", pa.int32()),
        ("X_shape", pa.int32()),
        ("z_focus_mean", pa.float32()),
        ("norm_mean", pa.float32()),
        ("norm_std", pa.float32()),
        ("norm_median", pa.float32()),
        ("norm_iqr", pa.float32()),
        ("norm_max", pa.float32()),
        ("norm_min", pa.float32()),
    ]
)
REQUIRED = ("experiment", "store_path", "fov", "well", "y", "x", "perturbation", "channel_name", "t", "track_id")
NORM_KEYS = ("mean", "std", "median", "iqr", "max", "min")


@dataclass
class CellIndexInput:
    """What a parquet gives a session: the experiments and, per (experiment, FOV), its tracks."""

    registry: ExperimentRegistry
    tables: dict[tuple[str, str], dict[str, np.ndarray]]
    warnings: list[str] = field(default_factory=list)


def build_cell_index(
    registry: ExperimentRegistry,
    plates: dict[str, Plate],
    tracks_paths: dict[str, Path],
    *,
    include_wells: list[str] | None = None,
    exclude_fovs: list[str] | None = None,
    preprocess: bool = False,
    focus_channel: str | None = None,
    root=None,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> tuple[pa.Table, list[str]]:
    """The cell index table of the registry's experiments (rows in experiment, FOV, channel,
    track, t order) and the warnings (skipped wells and FOVs)."""
    from cellfeed.server.kinds.dynaclr.index import select_fovs
    from cellfeed.server.reading.tracks import find_tracks_csv, read_tracks

    fovs, _, warnings = select_fovs(registry, plates, include_wells, exclude_fovs)
    frames: list[pd.DataFrame] = []
    for done, ref in enumerate(fovs):
        if cancelled is not None and cancelled():
            from cellfeed.server.preprocess.convert import Cancelled

            raise Cancelled()
        exp = registry.experiments[ref.experiment]
        label = f"{exp.tracks_path}/{ref.fov.name}"
        csv = find_tracks_csv(tracks_paths[exp.name], ref.fov.name, root, label)
        if csv is None:
            warnings.append(f"experiment {exp.name!r}: no tracks CSV for FOV {ref.fov.name}; skipped")
            continue
        tracks = read_tracks(csv, f"{label}/{csv.name}")
        frames += _fov_rows(exp, ref.fov, tracks, preprocess, focus_channel, warnings)
        if progress is not None:
            progress(done + 1, len(fovs))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({f.name: [] for f in CELL_INDEX_SCHEMA})
    for f in CELL_INDEX_SCHEMA:
        if f.name not in df.columns:
            df[f.name] = None
    return pa.Table.from_pandas(df[[f.name for f in CELL_INDEX_SCHEMA]], schema=CELL_INDEX_SCHEMA, preserve_index=False), warnings


def _fov_rows(exp: ExperimentConfig, fov, tracks: dict[str, np.ndarray], preprocess: bool, focus_channel: str | None, warnings: list[str]) -> list[pd.DataFrame]:
    n = len(tracks["t"])
    T, C, Z, H, W = fov.shape
    parent = tracks["parent_track_id"]
    roots, _ = lineage_roots(np.zeros(n, dtype=np.int64), tracks["track_id"], parent) if n else (np.zeros(0, np.int64), None)
    prefix = f"{exp.name}_{fov.name}_"
    track = tracks["track_id"].astype(np.int64)
    t = tracks["t"].astype(np.int64)
    z = np.nan_to_num(tracks["z"], nan=0.0)
    well_condition = exp.well_condition
    base = {
        "cell_id": [f"{prefix}{a}_{b}" for a, b in zip(track, t)],
        "experiment": exp.name,
        "store_path": exp.data_path,
        "tracks_path": exp.tracks_path,
        "fov": fov.name.rsplit("/", 1)[1],
        "well": fov.well,
        "y": tracks["y"].astype(np.float32),
        "x": tracks["x"].astype(np.float32),
        "z": z.astype(np.int16),
        "perturbation": well_condition[fov.well],
        "t": t.astype(np.int32),
        "track_id": track.astype(np.int32),
        "global_track_id": [f"{prefix}{a}" for a in track],
        "lineage_id": [f"{prefix}{a}" for a in roots],
        # as the CSV says (ultrack's -1 kept), null where it has none: VisCy's builder does the same
        "parent_track_id": pd.arrays.IntegerArray(np.nan_to_num(parent, nan=0).astype(np.int32), ~np.isfinite(parent)),
        "hours_post_perturbation": (exp.start_hpi + t * exp.interval_minutes / 60.0).astype(np.float32),
        "interval_minutes": np.float32(exp.interval_minutes),
        "microscope": exp.microscope,
        "organelle": exp.organelle,
        "pixel_size_xy_um": exp.pixel_size_xy_um,
        "pixel_size_z_um": exp.pixel_size_z_um,
        "T_shape": T, "C_shape": C, "Z_shape": Z, "Y_shape": H, "X_shape": W,
    }
    out = []
    wells = exp.channel_wells or [[] for _ in exp.source_channel]
    for channel, marker, valid in zip(exp.source_channel, exp.source_markers, wells):
        if valid and fov.well not in valid:
            continue
        frame = pd.DataFrame({**base, "channel_name": channel, "marker": marker})
        if preprocess:
            frame = _preprocess(frame, fov, channel, focus_channel or exp.source_channel[0], warnings)
        out.append(frame)
    return out


def _preprocess(frame: pd.DataFrame, fov, channel: str, focus_channel: str, warnings: list[str]) -> pd.DataFrame:
    """norm_* from the FOV's timepoint statistics of this channel, z_focus_mean from its
    focus_slice; rows without statistics (or an empty frame, max 0) are dropped, as VisCy does."""
    norm = fov.normalization.get(channel, {}) if isinstance(fov.normalization, dict) else {}
    per_t = norm.get("timepoint_statistics", {}) if isinstance(norm, dict) else {}
    stats = {k: np.full(len(frame), np.nan, dtype=np.float32) for k in NORM_KEYS}
    keep = np.zeros(len(frame), dtype=bool)
    for i, t in enumerate(frame["t"].to_numpy()):
        s = per_t.get(str(int(t))) if isinstance(per_t, dict) else None
        if not isinstance(s, dict) or s.get("max", 1.0) == 0.0:
            continue
        keep[i] = True
        for k in NORM_KEYS:
            if k in s:
                stats[k][i] = float(s[k])
    for k in NORM_KEYS:
        frame[f"norm_{k}"] = stats[k]
    focus = _fov_focus(fov, focus_channel)
    frame["z_focus_mean"] = np.float32(focus) if focus is not None else np.float32(np.nan)
    dropped = int(np.count_nonzero(~keep))
    if dropped:
        warnings.append(f"{fov.plate.name}/{fov.name} channel {channel!r}: {dropped} rows without timepoint statistics; dropped")
    return frame[keep]


def _fov_focus(fov, channel: str) -> float | None:
    from cellfeed.server.reading.omezarr import _node, _ome

    attrs, _ = _node(fov.plate / fov.name, f"{fov.plate.name}/{fov.name}")
    focus = attrs.get("focus_slice") or _ome(attrs).get("focus_slice")
    entry = focus.get(channel) if isinstance(focus, dict) else None
    stats = entry.get("fov_statistics") if isinstance(entry, dict) else None
    value = stats.get("z_focus_mean") if isinstance(stats, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def write_cell_index(table: pa.Table, path: Path, root=None) -> None:
    """Write under the output's lock, to a temporary file beside it, then rename (atomic)."""
    from cellfeed.server.preprocess.atomic import output_lock, remove_stale_at

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path, root) as parent:
        remove_stale_at(parent, path.name)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def build_from_collection(
    collection: str,
    output: str,
    root,
    *,
    include_wells: list[str] | None = None,
    exclude_fovs: list[str] | None = None,
    preprocess: bool = False,
    focus_channel: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> dict:
    """`build-cell-index` (and `preprocess-cell-index` with `preprocess`): the collection YAML
    (a file inside the data root) to a cell index parquet at `output` (inside it too)."""
    from cellfeed.server.kinds.dynaclr.collection import parse_collection, registry_from_collection
    from cellfeed.server.kinds.dynaclr.registry import _resolve
    from cellfeed.server.reading.omezarr import open_plate

    source = root.resolve(collection, what="collection")
    target = root.resolve(output, must_exist=False, what="output")
    parsed = parse_collection(source.read_text(), root.relative(source))
    plates, channels = {}, {}
    for entry in parsed.experiments:
        path = _resolve(root, entry.data_path, f"experiment {entry.name!r}: data_path")
        plates[entry.name] = open_plate(path, root.relative(path), root)
        channels[entry.name] = list(plates[entry.name].channel_names)
    registry = registry_from_collection(parsed, channels, aligned=False)  # VisCy main indexes any channel counts
    from cellfeed.server.kinds.dynaclr.registry import check_plate

    for exp in registry.experiments:
        check_plate(exp, plates[exp.name])
    tracks = {name: t for name, (_, t) in registry.resolve_paths(root).items()}
    table, warnings = build_cell_index(
        registry, plates, tracks, include_wells=include_wells, exclude_fovs=exclude_fovs, preprocess=preprocess,
        focus_channel=focus_channel, root=root, progress=progress, cancelled=cancelled,
    )
    write_cell_index(table, target, root)
    return {"output": str(target), "rows": table.num_rows, "experiments": len(registry.experiments), "warnings": warnings}


def read_cell_index(path: Path, label: str) -> CellIndexInput:
    """The experiments of a cell index parquet (first-appearance order) and its tracks per FOV.

    Per experiment: the plate is `store_path`, channels are the distinct (channel_name, marker)
    pairs in order of appearance (a channel present in only some wells is valid only there),
    perturbation wells come from (perturbation, well), start_hpi from hours_post_perturbation at t.
    Rows of one cell and frame repeat per channel; they are one observation here.
    """
    wanted = (*REQUIRED, "cell_id", "marker", "tracks_path", "interval_minutes", "hours_post_perturbation", "organelle", "microscope",
              "pixel_size_xy_um", "pixel_size_z_um", "parent_track_id", "z")
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in wanted if c in names])
    except (pa.ArrowInvalid, OSError) as exc:
        raise CellfeedError(f"{label}: cannot be read as parquet ({exc})") from None
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise CellfeedError(f"{label}: missing column(s) {', '.join(missing)} (a cell index from build-cell-index has them)")
    if table.num_rows == 0:
        raise CellfeedError(f"{label}: the cell index is empty")
    df = table.to_pandas(strings_to_categorical=True)  # int codes: grouping 10^7 rows stays cheap
    if "marker" not in df:
        df["marker"] = df["channel_name"]
    if "cell_id" in df:  # VisCy main's validate_cell_index: one row per (cell, channel)
        repeated = df.duplicated(["cell_id", "channel_name"]) & df["cell_id"].notna()  # rows without an id: not checked
        if repeated.any():
            first = df.loc[repeated.idxmax()]
            raise CellfeedError(
                f"{label}: (cell_id, channel_name) must be unique; {int(repeated.sum())} rows repeat one "
                f"(first: cell_id {first['cell_id']!r}, channel {first['channel_name']!r})"
            )
        df = df.drop(columns=["cell_id"])
    experiments: list[ExperimentConfig] = []
    tables: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, sub in df.groupby("experiment", sort=False, observed=True):
        where = f"{label}: experiment {name!r}"
        stores = sub["store_path"].unique()
        if len(stores) != 1:
            raise CellfeedError(f"{where}: {len(stores)} store_path values; one plate per experiment")
        interval = _first(sub, "interval_minutes")
        if interval is None:
            raise CellfeedError(f"{where}: no interval_minutes (rebuild the cell index with build-cell-index)")
        pairs = sub[["channel_name", "marker"]].drop_duplicates().astype(str)
        channel_names = pairs["channel_name"].tolist()
        if len(set(channel_names)) != len(channel_names):
            raise CellfeedError(f"{where}: a channel has more than one marker ({', '.join(channel_names)})")
        wells_of = sub[["channel_name", "well"]].drop_duplicates().astype(str)
        all_wells = sorted(set(wells_of["well"]))
        channel_wells = []
        for c in channel_names:
            wells = sorted(set(wells_of.loc[wells_of["channel_name"] == c, "well"]))
            channel_wells.append([] if wells == all_wells else wells)
        pert: dict[str, list[str]] = {}
        for p_, w in sub[["perturbation", "well"]].drop_duplicates().astype(str).itertuples(index=False):
            pert.setdefault(p_, []).append(w)
        first = sub.iloc[0]
        hpp = first["hours_post_perturbation"] if "hours_post_perturbation" in sub else None
        start = float(np.round(float(hpp) - int(first["t"]) * float(interval) / 60.0, 6)) if hpp is not None and np.isfinite(hpp) else 0.0
        experiments.append(
            ExperimentConfig(
                name=str(name),
                data_path=str(stores[0]),
                tracks_path=str(_first(sub, "tracks_path") or ""),
                channel_names=[],  # from the plate, when it is opened
                source_channel=channel_names,
                markers=pairs["marker"].tolist(),
                channel_wells=channel_wells,
                condition_wells=pert,
                interval_minutes=_decimal(interval),
                start_hpi=start,
                organelle=str(_first(sub, "organelle") or ""),
                microscope=str(_first(sub, "microscope") or ""),
                pixel_size_xy_um=_decimal(_first(sub, "pixel_size_xy_um")),
                pixel_size_z_um=_decimal(_first(sub, "pixel_size_z_um")),
            )
        )
        cells = sub.drop_duplicates(["well", "fov", "track_id", "t"])
        for (well, fov), rows in cells.groupby(["well", "fov"], sort=False, observed=True):
            fov_name = str(fov) if "/" in str(fov) else f"{well}/{fov}"
            n = len(rows)
            parent = rows["parent_track_id"].to_numpy(dtype=np.float64, na_value=np.nan) if "parent_track_id" in rows else np.full(n, np.nan)
            z = rows["z"].to_numpy(dtype=np.float64, na_value=np.nan) if "z" in rows else np.full(n, np.nan)
            tables[(str(name), fov_name)] = {
                "track_id": rows["track_id"].to_numpy(dtype=np.int64),
                "t": rows["t"].to_numpy(dtype=np.int64),
                "id": np.full(n, -1, dtype=np.int64),
                "y": rows["y"].to_numpy(dtype=np.float64),
                "x": rows["x"].to_numpy(dtype=np.float64),
                "parent_track_id": parent,
                "parent_id": np.full(n, np.nan),
                "z": z,
            }
    return CellIndexInput(registry=ExperimentRegistry(experiments), tables=tables)


def _decimal(value):
    """A float32 column's value as the decimal it was written from (0.1494, not 0.14939999580)."""
    return None if value is None else float(f"{float(value):.7g}")


def _first(frame: pd.DataFrame, column: str):
    if column not in frame.columns:
        return None
    values = frame[column].dropna()
    if values.empty:
        return None
    value = values.iloc[0]
    return value.item() if hasattr(value, "item") else value
