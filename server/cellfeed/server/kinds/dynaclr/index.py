"""The cell index: every tracked observation of every selected FOV, with lineage, HPI, patch origin.

Built once per session from the registry, the plates and the tracking CSVs, all vectorised:
FOVs are keyed by (experiment, name), so equal FOV names in two experiments never collide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cellfeed.server.kinds.dynaclr.lineage import LineageGrid, lineage_roots, valid_anchors
from cellfeed.server.kinds.dynaclr.registry import ExperimentRegistry
from cellfeed.server.errors import CellfeedError
from cellfeed.server.reading.omezarr import FOV, Plate
from cellfeed.server.reading.tracks import find_tracks_csv, read_tracks

if TYPE_CHECKING:
    from cellfeed.server.paths import DataRoot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FovRef:
    """A selected FOV: which experiment it belongs to and the condition of its well."""

    experiment: int
    condition: int
    fov: FOV


@dataclass
class CellIndex:
    """Rows sorted by (experiment, FOV, track, t). Codes index `experiments`, `conditions`, `fovs`."""

    experiments: list[str]
    conditions: list[str]
    fovs: list[FovRef]
    rows: dict[str, np.ndarray]  # the tracks' columns (track_id, t, id, parent ids, z, y, x) plus experiment, condition, fov, lineage, lineage_track_id, hpi, y0, x0
    tau_frames: list[tuple[int, int]]  # per experiment
    grid: LineageGrid
    valid: np.ndarray  # bool per row: a valid anchor
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.valid)

    @property
    def fov_names(self) -> list[str]:
        return sorted({ref.fov.name for ref in self.fovs})


def select_fovs(
    registry: ExperimentRegistry,
    plates: dict[str, Plate],
    include_wells: list[str] | None,
    exclude_fovs: list[str] | None,
) -> tuple[list[FovRef], list[str], list[str]]:
    """The FOVs to index, the condition vocabulary, and warnings about skipped wells.

    Wells absent from condition_wells are skipped (they have no condition to balance on).
    """
    conditions = sorted({c for e in registry.experiments for c in e.condition_wells})
    code = {c: i for i, c in enumerate(conditions)}
    include = set(include_wells) if include_wells is not None else None
    exclude = set(exclude_fovs or ())
    selected: list[FovRef] = []
    warnings: list[str] = []
    for e, exp in enumerate(registry.experiments):
        well_condition = exp.well_condition
        unlisted = set()
        own_exclude = set(exp.exclude_fovs)
        for fov in plates[exp.name].fovs:
            if include is not None and fov.well not in include:
                continue
            if fov.name in exclude or fov.name in own_exclude:
                continue
            condition = well_condition.get(fov.well)
            if condition is None:
                unlisted.add(fov.well)
                continue
            selected.append(FovRef(experiment=e, condition=code[condition], fov=fov))
        if unlisted:
            warnings.append(f"experiment {exp.name!r}: wells {sorted(unlisted)} are in no condition_wells entry; skipped")
    if not selected:
        raise CellfeedError("no FOV is left after include_wells / exclude_fovs and condition_wells")
    return selected, conditions, warnings


def build_index(
    registry: ExperimentRegistry,
    plates: dict[str, Plate],
    tracks_paths: dict[str, Path],
    *,
    patch_yx: tuple[int, int],
    z_range: tuple[int, int],
    tau_range_hours: tuple[float, float],
    include_wells: list[str] | None = None,
    exclude_fovs: list[str] | None = None,
    tracks_label: dict[str, str] | None = None,
    root: "DataRoot | None" = None,
    tables: dict[tuple[str, str], dict[str, np.ndarray]] | None = None,
    native_yx: list[tuple[int, int]] | None = None,
    z_spans: list[tuple[int, int]] | None = None,
    max_border_shift: int | None = None,
    require_anchors: bool = True,
) -> CellIndex:
    """Read every selected FOV's tracks and derive lineage, HPI, patch origins and valid anchors.

    `tables` ((experiment, FOV) -> track columns, from a cell index parquet) replaces the CSVs;
    `native_yx` and `z_spans` ((z0, slices)) are the per-experiment read sizes (default: patch_yx
    and z_range everywhere); `max_border_shift` drops border cells (None: clamp them all).
    """
    fovs, conditions, warnings = select_fovs(registry, plates, include_wells, exclude_fovs)
    tau_frames = [exp.tau_range_frames(tau_range_hours) if require_anchors else (1, 1) for exp in registry.experiments]
    sizes = native_yx or [tuple(patch_yx)] * len(registry.experiments)
    spans = z_spans or [(z_range[0], z_range[1] - z_range[0])] * len(registry.experiments)
    _check_geometry(registry, fovs, sizes, spans)

    pieces: list[dict[str, np.ndarray]] = []
    kept: list[FovRef] = []
    for ref in fovs:
        exp = registry.experiments[ref.experiment]
        if tables is not None:
            table = tables.get((exp.name, ref.fov.name))
            if table is None:
                continue  # the cell index has no rows for this FOV
            table = dict(table)
        else:
            label = f"{(tracks_label or {}).get(exp.name, exp.tracks_path)}/{ref.fov.name}"
            csv = find_tracks_csv(tracks_paths[exp.name], ref.fov.name, root, label)
            if csv is None:
                warnings.append(f"experiment {exp.name!r}: no tracks CSV for FOV {ref.fov.name} (looked in {label}); skipped")
                continue
            table = read_tracks(csv, f"{label}/{csv.name}")
        table["fov"] = np.full(len(table["t"]), len(kept), dtype=np.int32)
        pieces.append(table)
        kept.append(ref)
    if not pieces:
        looked = [w for w in warnings if "no tracks CSV" in w]
        detail = "; ".join(looked[:3]) + (f"; and {len(looked) - 3} more" if len(looked) > 3 else "")
        raise CellfeedError(
            "no tracks found for any selected FOV (see tracks_path in the experiments YAML, or the cell index)"
            + (f": {detail}" if detail else "")
        )
    rows = {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}
    rows = _inside_images(rows, kept, warnings)
    fov_size = np.array([sizes[ref.experiment] for ref in kept], dtype=np.int64).reshape(-1, 2)
    rows = _border(rows, kept, fov_size, max_border_shift, warnings)

    fov_exp = np.array([ref.experiment for ref in kept], dtype=np.int16)
    fov_cond = np.array([ref.condition for ref in kept], dtype=np.int16)
    order = np.lexsort((rows["t"], rows["track_id"], rows["fov"]))
    rows = {k: v[order] for k, v in rows.items()}
    rows["experiment"] = fov_exp[rows["fov"]]
    rows["condition"] = fov_cond[rows["fov"]]
    interval = np.array([e.interval_minutes for e in registry.experiments])
    start = np.array([e.start_hpi for e in registry.experiments])
    rows["hpi"] = start[rows["experiment"]] + rows["t"] * interval[rows["experiment"]] / 60.0
    rows["y0"], rows["x0"] = _patch_origins(rows, kept, fov_size)
    cycles = _add_lineages(rows)
    if cycles:
        warnings.append(f"{cycles} tracks sit on parent_track_id cycles; each cycle became one lineage")

    grid = LineageGrid(rows["lineage"], rows["t"])
    lo = np.array([tf[0] for tf in tau_frames])[rows["experiment"]]
    hi = np.array([tf[1] for tf in tau_frames])[rows["experiment"]]
    valid = valid_anchors(grid, lo, hi) if require_anchors else np.ones(len(rows["t"]), dtype=bool)
    for w in warnings:
        log.warning(w)
    return CellIndex(
        experiments=registry.names,
        conditions=conditions,
        fovs=kept,
        rows=rows,
        tau_frames=tau_frames,
        grid=grid,
        valid=valid,
        warnings=warnings,
    )


def _check_geometry(
    registry: ExperimentRegistry, fovs: list[FovRef], sizes: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> None:
    for ref in fovs:
        _, _, Z, H, W = ref.fov.shape
        py, px = sizes[ref.experiment]
        z0, nz = spans[ref.experiment]
        where = f"experiment {registry.experiments[ref.experiment].name!r}, FOV {ref.fov.name}"
        if py > H or px > W:
            raise CellfeedError(f"{where}: yx_patch_size {[py, px]} is larger than the image ({H} x {W})")
        if z0 + nz > Z:
            raise CellfeedError(f"{where}: z_range {[z0, z0 + nz]} reaches past the image's {Z} Z slices")


def _inside_images(rows: dict[str, np.ndarray], fovs: list[FovRef], warnings: list[str]) -> dict[str, np.ndarray]:
    """Drop rows whose centroid lies outside [0, H) x [0, W) or whose t is past the last frame."""
    shapes = np.array([ref.fov.shape for ref in fovs], dtype=np.int64)
    T, H, W = shapes[rows["fov"], 0], shapes[rows["fov"], 3], shapes[rows["fov"], 4]
    y, x = rows["y"], rows["x"]
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    in_time = rows["t"] < T
    keep = inside & in_time
    if np.count_nonzero(~inside):
        warnings.append(f"{np.count_nonzero(~inside)} track rows have centroids outside their image; dropped")
    if np.count_nonzero(~in_time):
        warnings.append(f"{np.count_nonzero(~in_time)} track rows have t past their FOV's last frame; dropped")
    return {k: v[keep] for k, v in rows.items()}


def _border(
    rows: dict[str, np.ndarray], fovs: list[FovRef], fov_size: np.ndarray, max_shift: int | None, warnings: list[str]
) -> dict[str, np.ndarray]:
    """VisCy main's `max_border_shift`: drop cells whose patch would have to move more than
    `max_shift` pixels to fit in the image (0: any that does not fit; -1: a quarter of the patch).
    None keeps every cell (the patch is clamped, app-dynaclr's rule)."""
    if max_shift is None or not len(rows["t"]):
        return rows
    shapes = np.array([ref.fov.shape for ref in fovs], dtype=np.int64)
    f = rows["fov"]
    H, W = shapes[f, 3], shapes[f, 4]
    py, px = fov_size[f, 0], fov_size[f, 1]
    limit = np.where(max_shift < 0, np.maximum(py // 4, px // 4), max_shift)
    keep = np.ones(len(f), dtype=bool)
    for centre, size, extent in ((rows["y"], py, H), (rows["x"], px, W)):
        start = np.floor(centre).astype(np.int64) - size // 2
        keep &= np.abs(np.clip(start, 0, extent - size) - start) <= limit
    dropped = int(np.count_nonzero(~keep))
    if dropped:
        warnings.append(f"{dropped} track rows are closer to the border than max_border_shift allows; dropped")
    return {k: v[keep] for k, v in rows.items()}


def _patch_origins(rows: dict[str, np.ndarray], fovs: list[FovRef], fov_size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corner of each patch: centred on the cell, clamped so the patch stays in the image."""
    shapes = np.array([ref.fov.shape for ref in fovs], dtype=np.int64)
    H, W = shapes[rows["fov"], 3], shapes[rows["fov"], 4]
    py, px = fov_size[rows["fov"], 0], fov_size[rows["fov"], 1]
    y0 = np.clip(np.floor(rows["y"]).astype(np.int64) - py // 2, 0, H - py)
    x0 = np.clip(np.floor(rows["x"]).astype(np.int64) - px // 2, 0, W - px)
    return y0.astype(np.int32), x0.astype(np.int32)


def _add_lineages(rows: dict[str, np.ndarray]) -> int:
    """Add `lineage` (a global code) and `lineage_track_id` (the root's track id); return the cycle count."""
    fov, track = rows["fov"].astype(np.int64), rows["track_id"]
    span = int(track.max()) + 1 if len(track) else 1
    key = fov * span + track
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    roots, cyclic = lineage_roots(fov[first], track[first], rows["parent_track_id"][first])
    _, lineage_code = np.unique(fov[first] * span + roots, return_inverse=True)
    rows["lineage"] = lineage_code[inverse].astype(np.int64)
    rows["lineage_track_id"] = roots[inverse]
    return int(np.count_nonzero(cyclic))
