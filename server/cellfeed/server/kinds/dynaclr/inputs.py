"""A session's experiments from any of its three inputs, as one internal model.

`experiments_yaml` (VisCy app-dynaclr), `collection_yaml` and `cell_index_path` (VisCy main) each
become an `ExperimentRegistry` plus its opened plates, and either tracks folders (YAML forms) or
per-FOV track tables (the parquet). Everything after this (index, sampler, reads, wire) is one
code path for the three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellfeed.server.kinds.dynaclr.cell_index import read_cell_index
from cellfeed.server.kinds.dynaclr.collection import parse_collection, registry_from_collection
from cellfeed.server.kinds.dynaclr.config import DynaCLRConfig
from cellfeed.server.kinds.dynaclr.registry import ExperimentRegistry, _resolve, check_plate
from cellfeed.server.errors import CellfeedError
from cellfeed.server.paths import DataRoot
from cellfeed.server.reading.omezarr import Plate


@dataclass
class Inputs:
    form: str  # "experiments_yaml", "collection_yaml" or "cell_index_path"
    registry: ExperimentRegistry
    plates: dict[str, Plate]
    tracks_paths: dict[str, Path] = field(default_factory=dict)
    tracks_label: dict[str, str] = field(default_factory=dict)
    tables: dict[tuple[str, str], dict[str, np.ndarray]] | None = None


def yaml_text(value: str, root: DataRoot, key: str, head: str) -> tuple[str, str]:
    """Inline YAML text (it has a newline or starts with `head`), else a file inside the root."""
    if "\n" in value or value.lstrip().startswith(head):
        return value, key.replace("_", " ")
    path = root.resolve(value)
    if not path.is_file():
        raise CellfeedError(f"{key} {value!r} is not a file")
    return path.read_text(), root.relative(Path(path))


def load_inputs(cfg: DynaCLRConfig, root: DataRoot, open_cached) -> Inputs:
    """`open_cached(path)` opens a plate once per server (the handle cache)."""
    if cfg.experiments_yaml:
        text, where = yaml_text(cfg.experiments_yaml, root, "experiments_yaml", "experiments:")
        registry = ExperimentRegistry.from_yaml(text, where)
        return _with_tracks("experiments_yaml", registry, root, open_cached)
    if cfg.collection_yaml:
        text, where = yaml_text(cfg.collection_yaml, root, "collection_yaml", "name:")
        collection = parse_collection(text, where)
        plates, channels = {}, {}
        for entry in collection.experiments:
            plate = open_cached(_resolve(root, entry.data_path, f"experiment {entry.name!r}: data_path"))
            plates[entry.name] = plate
            channels[entry.name] = list(plate.channel_names)
        registry = registry_from_collection(collection, channels)
        return _with_tracks("collection_yaml", registry, root, open_cached, plates=plates)
    path = root.resolve(cfg.cell_index_path)
    if not path.is_file():
        raise CellfeedError(f"cell_index_path {cfg.cell_index_path!r} is not a file")
    found = read_cell_index(path, root.relative(path))
    plates = {}
    for exp in found.registry.experiments:
        plate = open_cached(_resolve(root, exp.data_path, f"{root.relative(path)}: experiment {exp.name!r}: store_path"))
        plates[exp.name] = plate
        exp.channel_names = list(plate.channel_names)
        missing = [c for c in exp.source_channel if c not in exp.channel_names]
        if missing:
            raise CellfeedError(f"experiment {exp.name!r}: channel {missing[0]!r} of the cell index is not in plate {plate.label} {exp.channel_names}")
    found.registry.validate()
    for exp in found.registry.experiments:
        check_plate(exp, plates[exp.name])
    return Inputs("cell_index_path", found.registry, plates, tables=found.tables)


def _with_tracks(form: str, registry: ExperimentRegistry, root: DataRoot, open_cached, plates=None) -> Inputs:
    paths = registry.resolve_paths(root)
    plates = dict(plates or {})
    for exp in registry.experiments:
        plate = plates.get(exp.name) or open_cached(paths[exp.name][0])
        check_plate(exp, plate)
        plates[exp.name] = plate
    return Inputs(
        form,
        registry,
        plates,
        tracks_paths={name: tracks for name, (_, tracks) in paths.items()},
        tracks_label={name: root.relative(tracks) for name, (_, tracks) in paths.items()},
    )
