"""HCS OME-Zarr plates: metadata from the JSON documents, pixels through tensorstore.

Plates as iohub and ome-zarr-py write them: NGFF 0.4 on zarr v2, NGFF 0.5 on zarr v3 (sharded or
not), and the earlier NGFF versions' formats. Axes are identified by their `type` (time, channel,
space) and by name in any case (iohub writes "T", "C", "Z", "Y", "X"; ome-zarr-py "t", "c", ...);
an image lacking t, c or z is read as if that axis had length 1. The image array is the first
(full-resolution) dataset of `multiscales[0]`, wherever it lies ("0" for iohub, "s0" for
ome-zarr-py). Channel names are the `omero` channel labels. Every plate a server reads shares one
tensorstore context, so the chunk cache is bounded once, not per plate.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple, Sequence

import numpy as np
import tensorstore as ts

from cellfeed.server.errors import CellfeedError
from cellfeed.server.paths import DataRoot

NORM_LEVELS = ("dataset_statistics", "fov_statistics", "timepoint_statistics")
NORM_STATS = ("mean", "std", "median", "iqr", "min", "max", "p1", "p5", "p95", "p99", "p95_p5", "p99_p1", "otsu_threshold")
AXES = ("t", "c", "z", "y", "x")
NGFF_VERSIONS = ("0.1", "0.2", "0.3", "0.4", "0.5")
_AXIS_TYPES = {"time": "t", "channel": "c"}  # "space" axes are told apart by name: z, y, x
_NUMERIC = ("bool", "int", "uint", "float")  # dtype prefixes that cast to float32


@dataclass(frozen=True)
class FOV:
    """One field of view (plate position): its image array and the metadata beside it."""

    plate: Path
    name: str  # "A/1/0"
    shape: tuple[int, int, int, int, int]  # TCZYX; an axis the array lacks counts 1
    zarr_format: int
    channel_names: tuple[str, ...]
    normalization: dict[str, Any]
    array: str = "0"  # path of the level-0 array inside the FOV: multiscales[0].datasets[0].path
    axes: tuple[str, ...] = AXES  # the array's own axes, in its order: TCZYX or a part of it

    @property
    def well(self) -> str:
        return self.name.rsplit("/", 1)[0]

    @property
    def array_path(self) -> Path:
        return self.plate / self.name / self.array


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


def open_plate(path: Path, label: str, root: "DataRoot | None" = None) -> Plate:
    """Read a plate's metadata and check that every image can be read (no pixels are read).

    A CellfeedError names the plate, the node and the field that is missing, malformed or not
    supported, and what was expected. With the data `root`, a plate holding a symlink (to a chunk
    file or a folder) that leads outside the root is refused: tensorstore would follow it.
    """
    if root is not None:
        _check_links(path, label, root)
    attrs, _ = _node(path, label)
    ome = _ome(attrs)
    plate = ome.get("plate")
    if not isinstance(plate, dict) or not plate.get("wells"):
        raise CellfeedError(f"{label}: not an HCS OME-Zarr plate (no 'plate' metadata with a list of 'wells')")
    version = str(ome.get("version") or plate.get("version") or "0.4")
    if not re.fullmatch(r"0\.[1-5]([.-].*)?", version):  # "0.4", "0.5", also "0.5-dev1" and the like
        raise CellfeedError(f"{label}: NGFF version {version!r} is not supported (expected one of {', '.join(NGFF_VERSIONS)})")
    if not isinstance(plate["wells"], list):
        raise CellfeedError(f"{label}: plate.wells is {type(plate['wells']).__name__}, expected a list")
    fovs = []
    for w, well in enumerate(plate["wells"]):
        well_path = _relative(well.get("path") if isinstance(well, dict) else None, f"{label}: plate.wells[{w}].path")
        where = f"{label}/{well_path}"
        well_meta = _ome(_node(path / well_path, where)[0]).get("well")
        images = well_meta.get("images") if isinstance(well_meta, dict) else None
        if not isinstance(images, list):
            raise CellfeedError(f"{where}: no 'well' metadata with a list of 'images'")
        for i, image in enumerate(images):
            image_path = _relative(image.get("path") if isinstance(image, dict) else None, f"{where}: well.images[{i}].path")
            fovs.append(_open_fov(path, label, f"{well_path}/{image_path}"))
    opening = [(fov, ts.open(_spec(fov), read=True, context=_CHECK_CONTEXT)) for fov in fovs]  # all at once
    for fov, future in opening:
        _check_array(fov, future, f"{label}/{fov.name}/{fov.array}")
    return Plate(path=path, label=label, version=version, fovs=tuple(fovs))


def _open_fov(plate: Path, label: str, name: str) -> FOV:
    where = f"{label}/{name}"
    attrs, _ = _node(plate / name, where)
    ome = _ome(attrs)
    multiscales = ome.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise CellfeedError(f"{where}: no 'multiscales' metadata (expected a list of multiscale images)")
    axes = _axes(multiscales[0].get("axes"), where)
    datasets = multiscales[0].get("datasets")
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
        raise CellfeedError(f"{where}: multiscales[0].datasets is empty or missing (expected the level-0 array's path)")
    array = _relative(datasets[0].get("path"), f"{where}: multiscales[0].datasets[0].path")
    array_where = f"{where}/{array}"
    array_dir = plate / name / array
    if (array_dir / "zarr.json").is_file():
        meta, zarr_format = _json(array_dir / "zarr.json", array_where), 3
        if meta.get("node_type") != "array":
            raise CellfeedError(f"{array_where}: zarr.json has node_type {meta.get('node_type')!r}, expected 'array'")
    elif (array_dir / ".zarray").is_file():
        meta, zarr_format = _json(array_dir / ".zarray", array_where), 2
    else:
        raise CellfeedError(
            f"{where}: no image array {array!r} (the path in multiscales[0].datasets[0]; "
            f"neither {array}/.zarray nor {array}/zarr.json exists)"
        )
    raw_shape = tuple(int(s) for s in meta.get("shape", ()))
    if len(raw_shape) != len(axes):
        raise CellfeedError(
            f"{array_where}: array has {len(raw_shape)} dimensions but multiscales[0].axes names {len(axes)} "
            f"({''.join(axes).upper()})"
        )
    sizes = dict(zip(axes, raw_shape))
    shape = tuple(sizes.get(a, 1) for a in AXES)
    channels = _channel_names(ome.get("omero"), where)
    if len(channels) != shape[1]:
        raise CellfeedError(f"{where}: omero.channels lists {len(channels)} channels but the array has {shape[1]}")
    norm = attrs.get("normalization") or ome.get("normalization") or {}
    return FOV(
        plate=plate,
        name=name,
        shape=shape,  # type: ignore[arg-type]
        zarr_format=zarr_format,
        channel_names=channels,
        normalization=norm,
        array=array,
        axes=axes,
    )


def _axes(raw: Any, where: str) -> tuple[str, ...]:
    """The roles (t, c, z, y, x) of an image's axes, in the array's order.

    NGFF 0.4 and later: dicts with a `name` and a `type`; 0.3: names only; 0.1 and 0.2: none
    (always TCZYX). The type decides where it is time or channel; space axes and untyped axes
    go by name, in any case. y and x are required; the order must be NGFF's (t, c, z, y, x).
    """
    if raw is None:
        return AXES
    if not isinstance(raw, list):
        raise CellfeedError(f"{where}: multiscales[0].axes is {type(raw).__name__}, expected a list")
    roles: list[str] = []
    for i, axis in enumerate(raw):
        name, kind = (axis.get("name"), axis.get("type")) if isinstance(axis, dict) else (axis, None)
        role = _AXIS_TYPES.get(kind) if isinstance(kind, str) else None
        if role is None:
            role = name.lower() if isinstance(name, str) else None
            if role not in AXES or (kind == "space" and role not in ("z", "y", "x")):
                expected = "z, y or x" if kind == "space" else "t, c, z, y or x (or type time or channel)"
                raise CellfeedError(
                    f"{where}: multiscales[0].axes[{i}] is {axis!r}: cannot tell which axis it is (expected name {expected})"
                )
        if role in roles:
            raise CellfeedError(f"{where}: multiscales[0].axes names the {role} axis twice ({raw!r})")
        roles.append(role)
    if "y" not in roles or "x" not in roles:
        raise CellfeedError(f"{where}: multiscales[0].axes {raw!r} lack y or x (expected TCZYX or a part of it with y and x)")
    if roles != sorted(roles, key=AXES.index):
        raise CellfeedError(f"{where}: multiscales[0].axes are in the order {''.join(roles).upper()}, expected TCZYX order")
    return tuple(roles)


def _channel_names(omero: Any, where: str) -> tuple[str, ...]:
    channels = omero.get("channels") if isinstance(omero, dict) else None
    if not isinstance(channels, list):
        raise CellfeedError(f"{where}: no omero.channels metadata (the channel names are read from omero.channels[].label)")
    names = []
    for i, channel in enumerate(channels):
        label = channel.get("label") if isinstance(channel, dict) else None
        if not isinstance(label, str) or not label:
            raise CellfeedError(f"{where}: omero.channels[{i}] has no label (expected the channel's name)")
        if label in names:
            raise CellfeedError(f"{where}: omero.channels names {label!r} twice (channel names must be unique)")
        names.append(label)
    return tuple(names)


def _spec(fov: FOV) -> dict[str, Any]:
    driver = "zarr3" if fov.zarr_format == 3 else "zarr"
    return {"driver": driver, "kvstore": {"driver": "file", "path": str(fov.array_path)}}


def _check_array(fov: FOV, opening: ts.Future, where: str) -> None:
    """Refuse an array tensorstore cannot read, or one with no chunk left on disk.

    Tensorstore answers a missing chunk with the fill value, so an image whose chunk files are
    gone would stream zeros. Writers skip chunks that hold only the fill value (zarr-python's
    default), so a missing chunk alone proves nothing; an array without a single chunk does.
    """
    try:
        store = opening.result()
    except Exception as exc:  # tensorstore raises ValueError for every kind of open failure
        raise CellfeedError(f"{where}: cannot be read as a zarr v{fov.zarr_format} array ({_ts_message(exc)})") from None
    dtype = store.dtype.name
    if not dtype.startswith(_NUMERIC):
        raise CellfeedError(f"{where}: data type {dtype} is not supported (expected bool, integer or floating point)")
    if store.domain.size and not _has_chunk(fov.array_path):
        raise CellfeedError(
            f"{where}: no chunk files under {fov.array}/ (the array's data is missing; reading it would "
            "give only the fill value); restore its chunk files, or remove the position from the well's images"
        )


_CHECK_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}})


def _ts_message(exc: Exception) -> str:
    """A tensorstore error without the spec it appends (the path is in our message already)."""
    return re.sub(r"\s*\[tensorstore_spec=.*\]\s*$", "", str(exc), flags=re.S)


def _check_links(path: Path, label: str, root: "DataRoot") -> None:
    """Refuse a plate with a symlink anywhere inside it that resolves outside the data root (one
    scandir walk of the plate; about a second per million files)."""
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    inner = Path(entry.path)
                    root.contain(inner, f"{label}/{inner.relative_to(path)}")  # raises naming the link
                    continue  # a link inside the root: not walked again (it may loop)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))


def _has_chunk(array_dir: Path) -> bool:
    """Whether any chunk (or shard) file lies under an array folder: the first one found ends it."""
    pending = [array_dir]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or (folder == array_dir and entry.name == "zarr.json"):
                continue  # metadata (.zarray, .zattrs, zarr.json) and hidden files are not chunks
            if entry.is_file():
                return True
            if entry.is_dir():
                pending.append(Path(entry.path))
    return False


def _relative(value: Any, where: str) -> str:
    """A path from the metadata, checked to stay inside the node that names it."""
    if not isinstance(value, str) or not value.strip("/"):
        raise CellfeedError(f"{where} is {value!r}, expected a relative path")
    parts = PurePosixPath(value.strip("/")).parts
    if any(p in ("..", ".") for p in parts) or "\\" in value:
        raise CellfeedError(f"{where} is {value!r}, expected a path inside the plate (no '..')")
    return "/".join(parts)


def _ome(attrs: dict[str, Any]) -> dict[str, Any]:
    """NGFF metadata: under "ome" in 0.5, at the top of the attributes before."""
    ome = attrs.get("ome")
    return ome if isinstance(ome, dict) else attrs


def _node(path: Path, where: str) -> tuple[dict[str, Any], int]:
    """The attributes of a zarr group (v2 .zattrs or v3 zarr.json) and its zarr format."""
    if (path / "zarr.json").is_file():
        return dict(_json(path / "zarr.json", where).get("attributes") or {}), 3
    if (path / ".zgroup").is_file() or (path / ".zattrs").is_file():
        return (_json(path / ".zattrs", where) if (path / ".zattrs").is_file() else {}), 2
    if not path.exists():
        raise CellfeedError(f"{where}: does not exist")
    raise CellfeedError(f"{where}: not a zarr group (no zarr.json, .zgroup or .zattrs)")


def _json(path: Path, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CellfeedError(f"{where}/{path.name}: cannot be read as JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CellfeedError(f"{where}/{path.name}: is a JSON {type(doc).__name__}, expected an object")
    return doc


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
        spec = {**_spec(fov), "recheck_cached_data": False, "recheck_cached_metadata": False}
        try:
            store = ts.open(spec, context=self.context, read=True).result()
        except Exception as exc:  # tensorstore raises ValueError for every kind of open failure
            raise CellfeedError(f"{fov.plate.name}/{fov.name}/{fov.array}: cannot be opened ({_ts_message(exc)})") from None
        if fov.axes != AXES:  # a length-1 axis in place of each one the array lacks: always TCZYX
            store = store[tuple(slice(None) if a in fov.axes else ts.newaxis for a in AXES)]
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
        if len({v.dtype for v in views}) > 1:  # plates of different dtypes in one batch: stack as float32
            views = [v if v.dtype == ts.float32 else ts.cast(v, ts.float32) for v in views]
        return ts.stack(views)
