"""Experiments from the YAML file: one OME-Zarr plate plus tracks per experiment, validated.

The schema and the checks are VisCy's (`ExperimentConfig` / `ExperimentRegistry`); paths are
server-side, resolved inside the data root. Each failed check names the experiment and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from cellfeed.server.errors import CellfeedError, parse_model
from cellfeed.server.paths import DataRoot
from cellfeed.server.reading.omezarr import Plate


class ExperimentConfig(BaseModel):
    """One experiment: a plate, its tracks, channels, the wells of each condition, timing."""

    model_config = ConfigDict(extra="forbid")

    name: str
    data_path: str
    tracks_path: str
    channel_names: list[str]
    source_channel: list[str]
    condition_wells: dict[str, list[str]]
    interval_minutes: float = 30.0
    start_hpi: float = 0.0
    organelle: str = ""
    date: str = ""
    moi: float = 0.0
    # VisCy main's collection fields (docs/dynaclr.md, "VisCy main form"); optional in both forms.
    markers: list[str] = []  # one per source channel; empty: the channel names serve as markers
    microscope: str = ""
    pixel_size_xy_um: float | None = None
    pixel_size_z_um: float | None = None
    exclude_fovs: list[str] = []  # "A/1/0", dropped from this experiment only
    channel_wells: list[list[str]] = []  # per source channel: wells where it is valid (empty: all)

    @property
    def source_markers(self) -> list[str]:
        """The marker of each source channel (the channel's name when none is given)."""
        return list(self.markers) if self.markers else list(self.source_channel)

    @property
    def channel_map(self) -> list[int]:
        """Zarr channel index of each source channel, in source order."""
        return [self.channel_names.index(c) for c in self.source_channel]

    @property
    def well_condition(self) -> dict[str, str]:
        return {well: cond for cond, wells in self.condition_wells.items() for well in wells}

    def tau_range_frames(self, tau_range_hours: tuple[float, float]) -> tuple[int, int]:
        """The tau range in frames of this experiment (VisCy's rounding); raises if it holds no tau >= 1."""
        lo = round(tau_range_hours[0] * 60 / self.interval_minutes)
        hi = round(tau_range_hours[1] * 60 / self.interval_minutes)
        if max(lo, 1) > hi:
            raise CellfeedError(
                f"experiment {self.name!r}: tau_range {list(tau_range_hours)} hours is [{lo}, {hi}] frames at "
                f"{self.interval_minutes} min per frame, which holds no offset of at least one frame; widen tau_range"
            )
        return lo, hi


@dataclass
class ExperimentRegistry:
    """The validated experiments of one YAML document, in file order."""

    experiments: list[ExperimentConfig]

    @classmethod
    def from_yaml(cls, text: str, where: str = "experiments YAML") -> "ExperimentRegistry":
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CellfeedError(f"{where}: not valid YAML ({exc})") from None
        if not isinstance(doc, dict) or "experiments" not in doc:
            raise CellfeedError(f"{where}: expected a top-level 'experiments:' list")
        unknown = sorted(set(doc) - {"experiments"})
        if unknown:
            raise CellfeedError(f"{where}: unknown top-level key {unknown[0]!r} (known: experiments)")
        entries = doc["experiments"]
        if not isinstance(entries, list) or not entries:
            raise CellfeedError(f"{where}: 'experiments' must be a non-empty list")
        experiments = []
        for i, entry in enumerate(entries):
            label = entry.get("name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
            experiments.append(parse_model(ExperimentConfig, entry, f"{where}: experiment {label!r}"))
        registry = cls(experiments)
        registry.validate()
        return registry

    def validate(self, aligned: bool = True) -> None:
        """VisCy's checks that need no files: names, intervals, conditions, channels. `aligned`:
        every experiment has as many source channels (a session streams them by position; the
        cell index builder, which only writes one row per channel, does not need it)."""
        names = [e.name for e in self.experiments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise CellfeedError(f"experiments YAML: experiment name {dupes[0]!r} appears more than once")
        for exp in self.experiments:
            where = f"experiment {exp.name!r}"
            if not exp.name:
                raise CellfeedError("experiments YAML: an experiment has an empty name")
            if exp.interval_minutes <= 0:
                raise CellfeedError(f"{where}: interval_minutes must be > 0 (got {exp.interval_minutes})")
            if not exp.condition_wells:
                raise CellfeedError(f"{where}: condition_wells is empty; map each condition to its wells")
            seen: dict[str, str] = {}
            for cond, wells in exp.condition_wells.items():
                if not wells:
                    raise CellfeedError(f"{where}: condition {cond!r} lists no wells")
                for well in wells:
                    if well in seen and seen[well] != cond:
                        raise CellfeedError(f"{where}: well {well!r} is in both conditions {seen[well]!r} and {cond!r}")
                    seen[well] = cond
            if len(set(exp.channel_names)) != len(exp.channel_names):
                raise CellfeedError(f"{where}: channel_names {exp.channel_names} has duplicates")
            missing = [c for c in exp.source_channel if c not in exp.channel_names]
            if missing:
                raise CellfeedError(f"{where}: source_channel {missing[0]!r} is not in channel_names {exp.channel_names}")
            if not exp.source_channel:
                raise CellfeedError(f"{where}: source_channel is empty")
            if exp.markers and len(exp.markers) != len(exp.source_channel):
                raise CellfeedError(f"{where}: {len(exp.markers)} markers for {len(exp.source_channel)} source channels")
            for key in ("pixel_size_xy_um", "pixel_size_z_um"):
                value = getattr(exp, key)
                if value is not None and not value > 0:
                    raise CellfeedError(f"{where}: {key} must be > 0 (got {value})")
        counts = {e.name: len(e.source_channel) for e in self.experiments}
        if aligned and len(set(counts.values())) > 1:
            raise CellfeedError(
                "experiments YAML: every experiment needs the same number of source channels "
                f"(they are aligned by position); got {counts}"
            )

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experiments]

    @property
    def num_source_channels(self) -> int:
        return len(self.experiments[0].source_channel)

    def get(self, name: str) -> ExperimentConfig:
        for exp in self.experiments:
            if exp.name == name:
                return exp
        raise CellfeedError(f"unknown experiment {name!r}; the YAML defines {', '.join(self.names)}")

    def resolve_paths(self, root: DataRoot) -> dict[str, tuple[Path, Path]]:
        """(plate path, tracks path) of each experiment, inside the data root; both must exist."""
        out = {}
        for exp in self.experiments:
            plate = _resolve(root, exp.data_path, f"experiment {exp.name!r}: data_path")
            tracks = _resolve(root, exp.tracks_path, f"experiment {exp.name!r}: tracks_path")
            out[exp.name] = (plate, tracks)
        return out


def check_plate(exp: ExperimentConfig, plate: Plate) -> None:
    """The plate's channels must equal channel_names, order included, at every position."""
    if not plate.fovs:
        raise CellfeedError(f"experiment {exp.name!r}: plate {plate.label} has no positions")
    for fov in plate.fovs:
        if list(fov.channel_names) != exp.channel_names:
            raise CellfeedError(
                f"experiment {exp.name!r}: channel_names {exp.channel_names} differ from the channels "
                f"{list(fov.channel_names)} of {plate.label}/{fov.name} (names and order must match)"
            )
    wells = set(plate.wells)
    for cond, listed in exp.condition_wells.items():
        absent = [w for w in listed if w not in wells]
        if absent:
            raise CellfeedError(
                f"experiment {exp.name!r}: condition {cond!r} names well {absent[0]!r}, which plate "
                f"{plate.label} does not have (wells: {', '.join(plate.wells)})"
            )


def _resolve(root: DataRoot, name: str, where: str) -> Path:
    try:
        return root.resolve(name)
    except CellfeedError as exc:
        raise CellfeedError(f"{where}: {exc}") from None
