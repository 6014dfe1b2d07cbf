"""Small synthetic HCS plates with tracks, written with zarr directly (no iohub).

Used by the tests, the demo and the benchmark: NGFF 0.4 on zarr v2 or NGFF 0.5 on zarr v3
(optionally sharded), Gaussian cells on noise, tracking CSVs and normalization statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
import zarr

STAT_PERCENTILES = {"p1": 1, "p5": 5, "p95": 95, "p99": 99}


@dataclass
class PlateSpec:
    """The shape and metadata of one synthetic experiment (one plate plus its tracks)."""

    name: str
    channel_names: list[str]
    source_channel: list[str]
    condition_wells: dict[str, list[str]]
    fovs_per_well: int = 2
    shape_tzyx: tuple[int, int, int, int] = (10, 3, 64, 64)
    chunks_zyx: tuple[int, int, int] | None = None  # default: one chunk per (t, c) image
    interval_minutes: float = 30.0
    start_hpi: float = 0.0
    ngff: str = "0.4"  # "0.4" (zarr v2) or "0.5" (zarr v3)
    shard: bool = False  # zarr v3 only: one shard per (t, c) image, chunks inside
    tracks: str = "edge_cases"  # "edge_cases" or "grid" (many plain tracks, for benchmarks)
    tracks_per_fov: int = 16  # the grid arrangement only
    extra: dict = field(default_factory=dict)  # organelle, date, moi: copied into the YAML


def write_experiment(root: Path, spec: PlateSpec, seed: int = 0) -> dict:
    """Write `{root}/{name}.zarr` and `{root}/{name}_tracks/`; return the experiment's YAML entry.

    The entry holds absolute paths; `experiments_yaml` makes them relative to a data root.
    """
    rng = np.random.default_rng(seed)
    plate_path = root / f"{spec.name}.zarr"
    tracks_path = root / f"{spec.name}_tracks"
    wells = [w for ws in spec.condition_wells.values() for w in ws]
    fov_names = [f"{w}/{i}" for w in wells for i in range(spec.fovs_per_well)]
    tracks = {fov: _tracks_for_fov(spec, rng) for fov in fov_names}
    images = {fov: _image_for_fov(spec, tracks[fov], rng) for fov in fov_names}
    _write_plate(plate_path, spec, wells, images)
    for fov, frame in tracks.items():
        out = tracks_path / fov
        out.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out / "tracks.csv", index=False)
    entry = {
        "name": spec.name,
        "data_path": str(plate_path),
        "tracks_path": str(tracks_path),
        "channel_names": list(spec.channel_names),
        "source_channel": list(spec.source_channel),
        "condition_wells": {k: list(v) for k, v in spec.condition_wells.items()},
        "interval_minutes": spec.interval_minutes,
        "start_hpi": spec.start_hpi,
    }
    entry.update(spec.extra)
    return entry


def experiments_yaml(entries: list[dict], relative_to: Path | None = None) -> str:
    """The `experiments:` YAML text for `entries`, paths made relative to `relative_to` if given."""
    out = []
    for entry in entries:
        entry = dict(entry)
        if relative_to is not None:
            for key in ("data_path", "tracks_path"):
                entry[key] = str(Path(entry[key]).resolve().relative_to(relative_to.resolve()))
        out.append(entry)
    return yaml.safe_dump({"experiments": out}, sort_keys=False)


def _tracks_for_fov(spec: PlateSpec, rng: np.random.Generator) -> pd.DataFrame:
    T, _, H, W = spec.shape_tzyx
    if spec.tracks == "grid":
        return _grid_tracks(spec.tracks_per_fov, T, H, W, rng)
    return _edge_case_tracks(T, H, W, rng)


def _edge_case_tracks(T: int, H: int, W: int, rng: np.random.Generator) -> pd.DataFrame:
    """Tracks 1-9: a division (2 -> 3, 4), a frame gap (5), a border cell (6), a cell leaving the
    image (7), a late starter (8) and a track whose parent (99) does not exist (9)."""
    half = T // 2
    rows: list[tuple[int, int, float, float, float]] = []  # track_id, t, parent, y, x

    def walk(track: int, ts: range | list[int], y: float, x: float, parent: float = np.nan) -> None:
        for t in ts:
            rows.append((track, t, parent, y, x))
            y = float(np.clip(y + rng.normal(0, 1.0), 8, H - 9))
            x = float(np.clip(x + rng.normal(0, 1.0), 8, W - 9))

    walk(1, range(T), H * 0.3, W * 0.3)
    walk(2, range(half), H * 0.6, W * 0.4)
    walk(3, range(half, T), H * 0.55, W * 0.45, parent=2)
    walk(4, range(half, T), H * 0.65, W * 0.35, parent=2)
    walk(5, [t for t in range(T) if t not in (3, 4)], H * 0.4, W * 0.7)
    for t in range(T):
        rows.append((6, t, np.nan, 1.5, 2.5))  # border: clamped
    for t in range(T):
        rows.append((7, t, np.nan, H * 0.8, W - 6.0 + t))  # leaves the image: rows with x >= W dropped
    walk(8, range(max(0, T - 4), T), H * 0.2, W * 0.8)
    walk(9, range(T), H * 0.75, W * 0.75, parent=99)
    return _frame(rows)


def _grid_tracks(n: int, T: int, H: int, W: int, rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for track in range(1, n + 1):
        y, x = rng.uniform(0, H), rng.uniform(0, W)
        for t in range(T):
            rows.append((track, t, np.nan, y, x))
            y = float(np.clip(y + rng.normal(0, 2.0), 0, H - 1))
            x = float(np.clip(x + rng.normal(0, 2.0), 0, W - 1))
    return _frame(rows)


def _frame(rows: list[tuple[int, int, float, float, float]]) -> pd.DataFrame:
    track, t, parent, y, x = (np.array(c) for c in zip(*rows))
    return pd.DataFrame(
        {
            "track_id": track.astype(np.int64),
            "t": t.astype(np.int64),
            "id": np.arange(len(track), dtype=np.int64),
            "parent_track_id": parent,
            "parent_id": np.full(len(track), np.nan),
            "z": np.zeros(len(track)),
            "y": y.astype(np.float64),
            "x": x.astype(np.float64),
        }
    )


def _image_for_fov(spec: PlateSpec, tracks: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    T, Z, H, W = spec.shape_tzyx
    C = len(spec.channel_names)
    image = rng.normal(0.0, 1.0, size=(T, C, Z, H, W)).astype(np.float32)
    yy, xx = np.mgrid[0:H, 0:W]
    zprofile = np.exp(-0.5 * ((np.arange(Z) - (Z - 1) / 2) / max(Z / 3, 1)) ** 2).astype(np.float32)
    for t, frame in tracks.groupby("t"):
        if t >= T:
            continue
        blob = np.zeros((H, W), dtype=np.float32)
        for y, x in zip(frame["y"], frame["x"]):
            blob += np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 3.0**2))
        for c in range(C):
            image[t, c] += (4.0 + c) * blob[None] * zprofile[:, None, None]
    return image


def _stats(values: np.ndarray) -> dict[str, float]:
    p = {k: float(np.percentile(values, q)) for k, q in STAT_PERCENTILES.items()}
    q25, q75 = np.percentile(values, [25, 75])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(np.median(values)),
        "iqr": float(q75 - q25),
        "min": float(values.min()),
        "max": float(values.max()),
        **p,
        "p95_p5": p["p95"] - p["p5"],
        "p99_p1": p["p99"] - p["p1"],
    }


def _normalization(images: dict[str, np.ndarray], channels: list[str]) -> tuple[dict, dict[str, dict]]:
    """Plate-level and per-FOV `normalization` attributes, as `viscy preprocess` writes them."""
    plate: dict = {}
    per_fov: dict[str, dict] = {fov: {} for fov in images}
    for c, name in enumerate(channels):
        dataset = _stats(np.concatenate([img[:, c, :, ::4, ::4].ravel() for img in images.values()]))
        plate[name] = {"dataset_statistics": dataset}
        for fov, img in images.items():
            per_fov[fov][name] = {
                "dataset_statistics": dataset,
                "fov_statistics": _stats(img[:, c, :, ::4, ::4].ravel()),
                "timepoint_statistics": {str(t): _stats(img[t, c, :, ::4, ::4].ravel()) for t in range(img.shape[0])},
            }
    return plate, per_fov


def _write_plate(path: Path, spec: PlateSpec, wells: list[str], images: dict[str, np.ndarray]) -> None:
    v3 = spec.ngff == "0.5"
    fmt = 3 if v3 else 2
    rows = sorted({w.split("/")[0] for w in wells})
    cols = sorted({w.split("/")[1] for w in wells}, key=lambda c: (len(c), c))
    plate_meta = {
        "version": spec.ngff,
        "name": spec.name,
        "rows": [{"name": r} for r in rows],
        "columns": [{"name": c} for c in cols],
        "wells": [
            {"path": w, "rowIndex": rows.index(w.split("/")[0]), "columnIndex": cols.index(w.split("/")[1])} for w in wells
        ],
        "field_count": spec.fovs_per_well,
        "acquisitions": [{"id": 0}],
    }
    plate_norm, fov_norm = _normalization(images, spec.channel_names)
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    _set_ome(root, {"plate": plate_meta}, v3, spec.ngff)
    root.attrs["normalization"] = plate_norm
    root.attrs["focus_slice"] = {
        ch: {"dataset_statistics": {"z_focus_mean": (spec.shape_tzyx[1] - 1) / 2}} for ch in spec.channel_names
    }
    T, Z, H, W = spec.shape_tzyx
    cz, cy, cx = spec.chunks_zyx or (Z, H, W)
    for well in wells:
        group = root.require_group(well)
        images_meta = [{"path": str(i), "acquisition": 0} for i in range(spec.fovs_per_well)]
        _set_ome(group, {"well": {"images": images_meta, "version": spec.ngff}}, v3, spec.ngff)
        for i in range(spec.fovs_per_well):
            fov_name = f"{well}/{i}"
            fov = group.require_group(str(i))
            multiscales = [
                {
                    "version": spec.ngff,
                    "name": "0",
                    "axes": [
                        {"name": "t", "type": "time", "unit": "second"},
                        {"name": "c", "type": "channel"},
                        {"name": "z", "type": "space", "unit": "micrometer"},
                        {"name": "y", "type": "space", "unit": "micrometer"},
                        {"name": "x", "type": "space", "unit": "micrometer"},
                    ],
                    "datasets": [
                        {
                            "path": "0",
                            "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 0.174, 0.1494, 0.1494]}],
                        }
                    ],
                }
            ]
            omero = {
                "version": spec.ngff,
                "channels": [
                    {
                        "label": ch,
                        "active": True,
                        "color": "FFFFFF",
                        "window": {"start": -1.0, "end": 5.0, "min": -10.0, "max": 10.0},
                    }
                    for ch in spec.channel_names
                ],
            }
            _set_ome(fov, {"multiscales": multiscales, "omero": omero}, v3, spec.ngff)
            fov.attrs["normalization"] = fov_norm[fov_name]
            image = images[fov_name]
            if v3 and spec.shard:
                arr = fov.create_array("0", shape=image.shape, dtype="float32", chunks=(1, 1, cz, cy, cx), shards=(1, 1, Z, H, W))
            else:
                arr = fov.create_array("0", shape=image.shape, dtype="float32", chunks=(1, 1, cz, cy, cx))
            arr[...] = image


def _set_ome(group: zarr.Group, meta: dict, v3: bool, version: str) -> None:
    if v3:
        group.attrs["ome"] = {"version": version, **meta}
    else:
        for key, value in meta.items():
            group.attrs[key] = value
