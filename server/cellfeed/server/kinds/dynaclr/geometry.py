"""Where each experiment's patches lie in Z and how large they are read: VisCy main's focus-centred
Z windows (`z_window`, `z_extraction_window`, `z_focus_offset`, `focus_channel`) and pixel-size
rescaling (`reference_pixel_size_xy_um` / `_z_um`).

Every patch of a session has one output shape [C, Z, Y, X]. An experiment whose pixels differ
from the reference is read at its native size (`reference / pixel_size` times the output) and
resampled to the output shape with nearest-exact interpolation, as VisCy does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellfeed.server.kinds.dynaclr.config import DynaCLRConfig
from cellfeed.server.kinds.dynaclr.registry import ExperimentConfig, ExperimentRegistry
from cellfeed.server.errors import CellfeedError
from cellfeed.server.reading.omezarr import Plate, _node, _ome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Geometry:
    """One experiment's read: native patch size (z, y, x), first Z slice, and the scale factors."""

    z0: int
    native: tuple[int, int, int]
    scale: tuple[float, float, float]  # (z, y, x): reference / experiment pixel size
    z_focus: float | None  # the focus slice the window is centred on (None: z_range given)

    @property
    def rescaled(self) -> bool:
        return self.scale != (1.0, 1.0, 1.0)


def plate_attributes(plate: Plate) -> dict[str, Any]:
    """The plate group's attributes (NGFF 0.5 keeps its own under `ome`, custom keys beside it)."""
    attrs, _ = _node(plate.path, plate.label)
    return attrs


def focus_slice(plate: Plate, channel: str) -> float | None:
    """`focus_slice[channel].dataset_statistics.z_focus_mean` of the plate, as VisCy writes it."""
    attrs = plate_attributes(plate)
    focus = attrs.get("focus_slice")
    if not isinstance(focus, dict):
        focus = _ome(attrs).get("focus_slice")
    if not isinstance(focus, dict):
        return None
    entry = focus.get(channel)
    stats = entry.get("dataset_statistics") if isinstance(entry, dict) else None
    value = stats.get("z_focus_mean") if isinstance(stats, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def scale_factors(exp: ExperimentConfig, config: DynaCLRConfig) -> tuple[float, float, float]:
    sz = sy = 1.0
    if config.reference_pixel_size_xy_um is not None:
        if exp.pixel_size_xy_um is None:
            raise CellfeedError(f"experiment {exp.name!r}: reference_pixel_size_xy_um is set but the experiment has no pixel_size_xy_um")
        sy = config.reference_pixel_size_xy_um / exp.pixel_size_xy_um
    if config.reference_pixel_size_z_um is not None:
        if exp.pixel_size_z_um is None:
            raise CellfeedError(f"experiment {exp.name!r}: reference_pixel_size_z_um is set but the experiment has no pixel_size_z_um")
        sz = config.reference_pixel_size_z_um / exp.pixel_size_z_um
    return (sz, sy, sy)


def experiment_geometry(registry: ExperimentRegistry, plates: dict[str, Plate], config: DynaCLRConfig) -> list[Geometry]:
    """Per experiment (registry order): the Z start, native read size and scale."""
    py, px = config.patch_yx
    zc = config.z_count
    out = []
    for exp in registry.experiments:
        plate = plates[exp.name]
        sz, sy, sx = scale_factors(exp, config)
        native_y = 2 * max(1, round((py // 2) * sy))
        native_x = 2 * max(1, round((px // 2) * sx))
        native_z = max(1, round(zc * sz))
        z_total = min(f.shape[2] for f in plate.fovs)
        if config.z_range is not None:
            z0, z_focus = config.z_range[0], None
            if native_z != zc:  # rescaled in Z: centred on the middle of z_range
                z0 = (config.z_range[0] + config.z_range[1]) // 2 - native_z // 2
        else:
            channel = config.focus_channel or exp.source_channel[0]
            z_focus = focus_slice(plate, channel)
            centre = int(round(z_focus)) if z_focus is not None else z_total // 2
            if z_focus is None:
                log.info("experiment %r: no focus_slice for %r in %s; Z window centred on slice %d", exp.name, channel, plate.label, centre)
            if native_z > z_total:
                raise CellfeedError(
                    f"experiment {exp.name!r}: the Z window ({native_z} slices read) is deeper than the plate's {z_total} slices; "
                    "reduce z_extraction_window / z_window"
                )
            below = int(native_z * config.z_focus_offset)
            z0 = max(0, centre - below)
            z1 = min(z_total, z0 + native_z)
            z0 = max(0, z1 - native_z)
        if z0 < 0:  # a z_range past the image is refused per FOV by the index, naming the FOV
            raise CellfeedError(
                f"experiment {exp.name!r}: Z slices [{z0}, {z0 + native_z}) reach past the image's {z_total} Z slices"
            )
        out.append(Geometry(z0=int(z0), native=(native_z, native_y, native_x), scale=(sz, sy, sx), z_focus=z_focus))
    return out


def nearest_exact(images: np.ndarray, size_zyx: tuple[int, int, int]) -> np.ndarray:
    """[N, C, z, y, x] resampled to [N, C, *size_zyx]: torch's `nearest-exact` (pixel centres)."""
    idx = []
    for n_in, n_out in zip(images.shape[2:], size_zyx):
        idx.append(np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1))
    return images[:, :, idx[0]][:, :, :, idx[1]][:, :, :, :, idx[2]]
