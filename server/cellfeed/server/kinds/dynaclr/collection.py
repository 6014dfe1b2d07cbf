"""VisCy main's collection YAML (`viscy_data.collection.Collection`), read into cellfeed's registry.

A collection names experiments with channels (zarr name + marker), perturbation wells, timing,
pixel sizes, microscope and per-experiment FOV exclusions; `${datasets_root}` in `data_path` and
`tracks_path` is replaced by `datasets_root`. It becomes the same `ExperimentRegistry` the
`experiments_yaml` form gives, so both forms share every later step (index, sampler, reads).

Differences from VisCy, on purpose: unknown keys are refused (VisCy ignores them, so a typo
silently falls back to a default); `interval_minutes` must be > 0 (temporal positives need it).
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from cellfeed.server.kinds.dynaclr.registry import ExperimentConfig, ExperimentRegistry
from cellfeed.server.errors import CellfeedError, parse_model

DATASETS_ROOT_VAR = "${datasets_root}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Provenance(_Strict):
    airtable_base_id: str | None = None
    airtable_query: str | None = None
    record_ids: list[str] = []
    created_at: str | None = None
    created_by: str | None = None


class ChannelEntry(_Strict):
    """One channel: its zarr name, its marker, and the wells where it is valid (empty: all)."""

    name: str
    marker: str
    wells: list[str] = []


class ExperimentEntry(_Strict):
    name: str
    data_path: str
    tracks_path: str
    channels: list[ChannelEntry] = []
    channel_names: list[str] = []  # the plate's channels; empty: read from the plate
    perturbation_wells: dict[str, list[str]] = {}
    interval_minutes: float = 30.0
    start_hpi: float = 0.0
    marker: str = ""  # deprecated in VisCy (per-channel markers); informational
    organelle: str = ""
    microscope: str = ""
    pixel_size_xy_um: float | None = None
    pixel_size_z_um: float | None = None
    date: str = ""
    moi: float = 0.0
    exclude_fovs: list[str] = []


class Collection(_Strict):
    name: str
    description: str = ""
    datasets_root: str | None = None
    provenance: Provenance = Provenance()
    experiments: list[ExperimentEntry]
    fov_records: list[dict[str, Any]] = []  # Airtable provenance; not used for serving


def looks_like_collection(doc: Any) -> bool:
    """A parsed YAML document in the collection schema (rather than `experiments:` only)."""
    if not isinstance(doc, dict) or "name" not in doc:
        return False
    entries = doc.get("experiments")
    return isinstance(entries, list) and any(isinstance(e, dict) and ("channels" in e or "perturbation_wells" in e) for e in entries)


def parse_collection(text: str, where: str = "collection YAML") -> Collection:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CellfeedError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("experiments"), list) or not doc["experiments"]:
        raise CellfeedError(f"{where}: expected a collection with a non-empty 'experiments:' list")
    root = doc.get("datasets_root")
    if root:
        root = str(root).rstrip("/")
        for entry in doc["experiments"]:
            if isinstance(entry, dict):
                for key in ("data_path", "tracks_path"):
                    if isinstance(entry.get(key), str):
                        entry[key] = entry[key].replace(DATASETS_ROOT_VAR, root)
    for i, entry in enumerate(doc["experiments"]):
        if isinstance(entry, dict):
            label = entry.get("name", f"#{i}")
            parse_model(ExperimentEntry, entry, f"{where}: experiment {label!r}")
    return parse_model(Collection, doc, where)


def registry_from_collection(collection: Collection, plate_channels: dict[str, list[str]], *, aligned: bool = True) -> ExperimentRegistry:
    """The registry of a collection; `plate_channels` gives each experiment's plate channels
    (used when the entry lists none, as VisCy reads them from the zarr); `aligned`: as
    `ExperimentRegistry.validate`."""
    experiments = []
    for entry in collection.experiments:
        where = f"experiment {entry.name!r}"
        channel_names = list(entry.channel_names) or list(plate_channels.get(entry.name, []))
        channels = entry.channels or [ChannelEntry(name=c, marker=c) for c in entry.channel_names]
        if not channels:
            raise CellfeedError(f"{where}: no channels; list each channel with its zarr name and marker")
        if not entry.perturbation_wells:
            raise CellfeedError(f"{where}: perturbation_wells is empty; map each perturbation to its wells")
        missing = [c.name for c in channels if c.name not in channel_names]
        if missing:
            raise CellfeedError(f"{where}: channel {missing[0]!r} is not one of the plate's channels {channel_names}")
        experiments.append(
            ExperimentConfig(
                name=entry.name,
                data_path=entry.data_path,
                tracks_path=entry.tracks_path,
                channel_names=channel_names,
                source_channel=[c.name for c in channels],
                markers=[c.marker for c in channels],
                channel_wells=[list(c.wells) for c in channels],
                condition_wells={k: list(v) for k, v in entry.perturbation_wells.items()},
                interval_minutes=entry.interval_minutes,
                start_hpi=entry.start_hpi,
                organelle=entry.organelle,
                date=entry.date,
                moi=entry.moi,
                microscope=entry.microscope,
                pixel_size_xy_um=entry.pixel_size_xy_um,
                pixel_size_z_um=entry.pixel_size_z_um,
                exclude_fovs=list(entry.exclude_fovs),
            )
        )
    registry = ExperimentRegistry(experiments)
    registry.validate(aligned=aligned)
    return registry
