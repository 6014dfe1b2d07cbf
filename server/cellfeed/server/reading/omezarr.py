"""HCS OME-Zarr plates: metadata from the JSON documents, pixels through tensorstore.

NGFF 0.4 (zarr v2) and 0.5 (zarr v3, sharded or not) plates, array "0" in TCZYX. Every plate a
server reads shares one tensorstore context, so the chunk cache is bounded once, not per plate.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import tensorstore as ts

from cellfeed.server.errors import CellfeedError

NORM_LEVELS = ("dataset_statistics", "fov_statistics", "timepoint_statistics")
NORM_STATS = ("mean", "std", "median", "iqr", "min", "max", "p1", "p5", "p95", "p99", "p95_p5", "p99_p1", "otsu_threshold")
AXES = ("t", "c", "z", "y", "x")


@dataclass(frozen=True)
class FOV:
    """One field of view (plate position): its array "0" and the metadata beside it."""

    plate: Path
    name: str  # "A/1/0"
    shape: tuple[int, int, int, int, int]  # TCZYX
    zarr_format: int
    channel_names: tuple[str, ...]
    normalization: dict[str, Any]

    @property
    def well(self) -> str:
        return self.name.rsplit("/", 1)[0]

    @property
    def array_path(self) -> Path:
        return self.plate / self.name / "0"


@dataclass(frozen=True)
class Plate:
    """An HCS plate's positions, in plate order (wells as listed, then images as listed)."""

    path: Path
    label: str  # as clients name it: relative to the data root
    version: str
    fovs: tuple[FOV, ...]

    @property
    def wells(self) -> list[str]:
        return list(dict.fromkeys(f.well for f in self.fovs))

    @property
    def channel_names(self) -> tuple[str, ...]:
        return self.fovs[0].channel_names if self.fovs else ()


class PatchRequest(NamedTuple):
    """One patch: frame `t`, channels (zarr indices, in output order), z, y and x start."""

    fov: FOV
    t: int
    channels: tuple[int, ...]
    z0: int
    y0: int
    x0: int


def open_plate(path: Path, label: str) -> Plate:
    """Read a plate's metadata (no pixels); a CellfeedError names what is missing or malformed."""
    attrs, _ = _node(path, label)
    ome = attrs.get("ome", attrs)
    plate = ome.get("plate")
    if not isinstance(plate, dict) or not plate.get("wells"):
        raise CellfeedError(f"{label}: not an HCS OME-Zarr plate (no 'plate' metadata with wells)")
    version = str(ome.get("version") or plate.get("version") or "0.4")
    fovs = []
    for well in plate["wells"]:
        well_path = str(well["path"]).strip("/")
        well_attrs, _ = _node(path / well_path, f"{label}/{well_path}")
        images = well_attrs.get("ome", well_attrs).get("well", {}).get("images", [])
        for image in images:
            name = f"{well_path}/{str(image['path']).strip('/')}"
            fovs.append(_open_fov(path, label, name))
    return Plate(path=path, label=label, version=version, fovs=tuple(fovs))


def _open_fov(plate: Path, label: str, name: str) -> FOV:
    where = f"{label}/{name}"
    attrs, _ = _node(plate / name, where)
    ome = attrs.get("ome", attrs)
    channels = tuple(str(c.get("label", "")) for c in ome.get("omero", {}).get("channels", []))
    axes = [a.get("name") if isinstance(a, dict) else a for a in (ome.get("multiscales") or [{}])[0].get("axes", AXES)]
    if tuple(axes) != AXES:
        raise CellfeedError(f"{where}: axes are {axes}, expected TCZYX")
    array_dir = plate / name / "0"
    meta_v3, meta_v2 = array_dir / "zarr.json", array_dir / ".zarray"
    if meta_v3.is_file():
        meta, zarr_format = _json(meta_v3), 3
    elif meta_v2.is_file():
        meta, zarr_format = _json(meta_v2), 2
    else:
        raise CellfeedError(f"{where}: no image array '0' (neither 0/.zarray nor 0/zarr.json exists)")
    shape = tuple(int(s) for s in meta["shape"])
    if len(shape) != 5:
        raise CellfeedError(f"{where}/0: array has {len(shape)} dimensions, expected 5 (TCZYX)")
    if channels and len(channels) != shape[1]:
        raise CellfeedError(f"{where}: omero lists {len(channels)} channels but array '0' has {shape[1]}")
    norm = attrs.get("normalization") or ome.get("normalization") or {}
    return FOV(plate=plate, name=name, shape=shape, zarr_format=zarr_format, channel_names=channels, normalization=norm)  # type: ignore[arg-type]


def _node(path: Path, where: str) -> tuple[dict[str, Any], int]:
    """The attributes of a zarr group (v2 .zattrs or v3 zarr.json) and its zarr format."""
    if (path / "zarr.json").is_file():
        return dict(_json(path / "zarr.json").get("attributes") or {}), 3
    if (path / ".zgroup").is_file() or (path / ".zattrs").is_file():
        return (_json(path / ".zattrs") if (path / ".zattrs").is_file() else {}), 2
    if not path.exists():
        raise CellfeedError(f"{where}: does not exist")
    raise CellfeedError(f"{where}: not a zarr group (no zarr.json, .zgroup or .zattrs)")


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CellfeedError(f"{path.name}: cannot be read as JSON ({exc})") from None


def normalization_table(fov: FOV, channels: Sequence[str], num_t: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel statistics of a FOV as arrays: [C, 2, S] (dataset, fov) and [T, C, S] (timepoint).

    NaN marks a statistic the metadata does not hold. Timepoint keys may be "0" or 0.
    """
    static = np.full((len(channels), 2, len(NORM_STATS)), np.nan, dtype=np.float32)
    per_t = np.full((num_t, len(channels), len(NORM_STATS)), np.nan, dtype=np.float32)
    for c, channel in enumerate(channels):
        levels = fov.normalization.get(channel) or {}
        for lvl, level in enumerate(NORM_LEVELS[:2]):
            static[c, lvl] = _stat_row(levels.get(level))
        for key, stats in (levels.get("timepoint_statistics") or {}).items():
            try:
                t = int(key)
            except (TypeError, ValueError):
                continue
            if 0 <= t < num_t:
                per_t[t, c] = _stat_row(stats)
    return static, per_t


def _stat_row(stats: Any) -> np.ndarray:
    row = np.full(len(NORM_STATS), np.nan, dtype=np.float32)
    if isinstance(stats, dict):
        for s, name in enumerate(NORM_STATS):
            value = stats.get(name)
            if isinstance(value, (int, float)):
                row[s] = value
    return row


class ImageReader:
    """Tensorstore handles on FOV arrays, keyed by (plate path, FOV name), one shared context.

    The context's cache pool is bounded by `cache_pool_bytes` for all plates together (VisCy's
    per-plate pools multiplied memory by the plate count). Thread-safe; arrays open on first use.
    """

    def __init__(self, cache_pool_bytes: int = 0, concurrency: int | None = None) -> None:
        self.cache_pool_bytes = cache_pool_bytes
        threads = concurrency or os.cpu_count() or 1
        self.context = ts.Context(
            {
                "cache_pool": {"total_bytes_limit": int(cache_pool_bytes)},
                "data_copy_concurrency": {"limit": threads},
            }
        )
        self._arrays: dict[tuple[Path, str], ts.TensorStore] = {}
        self._lock = threading.Lock()

    def array(self, fov: FOV) -> ts.TensorStore:
        key = (fov.plate, fov.name)
        with self._lock:
            found = self._arrays.get(key)
        if found is not None:
            return found
        spec = {
            "driver": "zarr3" if fov.zarr_format == 3 else "zarr",
            "kvstore": {"driver": "file", "path": str(fov.array_path)},
            "recheck_cached_data": False,
            "recheck_cached_metadata": False,
        }
        try:
            store = ts.open(spec, context=self.context, read=True).result()
        except Exception as exc:  # tensorstore raises ValueError for every kind of open failure
            raise CellfeedError(f"{fov.plate.name}/{fov.name}/0: cannot be opened ({exc})") from None
        with self._lock:
            return self._arrays.setdefault(key, store)

    def read(self, patches: Sequence[PatchRequest], size_zyx: tuple[int, int, int], out: np.ndarray | None = None) -> np.ndarray:
        """Read patches of `size_zyx` into one [N, C, Z, Y, X] float32 array (see `read_async`),
        or into `out` (e.g. a shared-memory slot), with no copy after the chunk decode."""
        if out is None:
            result = self.read_async(patches, size_zyx).result()
            return result if result.dtype == np.float32 else result.astype(np.float32)
        stack = self._stack(patches, size_zyx)
        if stack.dtype != ts.float32:
            stack = ts.cast(stack, ts.float32)
        ts.array(out, copy=False, write=True).write(stack).result()
        return out

    def read_async(self, patches: Sequence[PatchRequest], size_zyx: tuple[int, int, int]) -> ts.Future:
        """Start one stacked read of all patches; the future gives a contiguous [N, C, Z, Y, X] array.

        One read over a stack of lazy views lets tensorstore run every chunk fetch at once and
        write straight into the contiguous result, which then travels without another copy.
        """
        return self._stack(patches, size_zyx).read()

    def _stack(self, patches: Sequence[PatchRequest], size_zyx: tuple[int, int, int]) -> ts.TensorStore:
        dz, dy, dx = size_zyx
        if not patches:
            raise ValueError("no patches to read")
        views = [
            self.array(p.fov).oindex[p.t, list(p.channels), p.z0 : p.z0 + dz, p.y0 : p.y0 + dy, p.x0 : p.x0 + dx].translate_to[0]
            for p in patches
        ]
        return ts.stack(views)
