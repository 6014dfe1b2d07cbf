"""Perturbation session config: the DataModule's arguments plus protoplast/cell-load TOML.

Both TOML schemas share [datasets] (brace patterns, globs, directories or files), [zeroshot] and
[fewshot."dataset.celltype"]; they differ in what the rules mean, so each keeps its own meaning:

- cell-load's (recognised by a [training] table, or `toml_schema = "cell-load"`): only datasets
  named in [training], [zeroshot] or [fewshot] are loaded; a cell type that no rule names is
  trained on only when its dataset's [training] value is "train" (any other value drops it); a
  [zeroshot] cell type goes whole to its split; a [fewshot] target listed under both val and test
  is in both; rules naming cell types or targets the files lack are accepted, with a warning.
- protoplast's (no [training] table, or `toml_schema = "protoplast"`): every dataset is loaded and
  trained on; [training] is ignored; a [fewshot] target listed twice goes to the later split;
  rules naming unknown cell types are refused.

[dataset_opts] and [loader] (protoplast's) are read under either. Paths are server-side, inside
the data root.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from braceexpand import braceexpand
from pydantic import BaseModel, ConfigDict, Field

from cellfeed.server.errors import CellfeedError, parse_model
from cellfeed.server.paths import DataRoot
from cellfeed.server.suffixes import H5AD_SUFFIXES

SPLITS = ("train", "val", "test")
PROTOPLAST = "protoplast"
CELL_LOAD = "cell-load"


class PerturbationConfig(BaseModel):
    """What a client sends to open a perturbation session (see docs/protocol/perturbation.md)."""

    model_config = ConfigDict(extra="forbid")

    files: list[str] | None = None
    toml: str | None = None
    pert_embedding_file: str | None = None
    cell_type_label: str = "cell_type"
    target_label: str = "target_gene"
    control_label: str = "non-targeting"
    batch_label: str = "batch_var"
    group_size_S: int = Field(32, ge=1)
    batch_size: int = Field(64, ge=1)
    block_size: int = Field(2048, ge=1)
    window_blocks: int = Field(8, ge=1)
    barcodes: bool = False
    seed: int = Field(0, ge=0)
    match_controls_by_batch: bool = False
    prefix_batches_with_file: bool = False
    control_table_max_bytes: int = Field(256 << 20, ge=0)
    toml_schema: Literal["auto", "protoplast", "cell-load"] = "auto"
    # cell-load's options (docs/protocol/perturbation.md)
    embed_key: str | None = None  # obsm matrix read for pert/ctrl rows instead of X
    pert_counts: str | None = None  # "X" or an obsm key: `pert_counts_*` columns
    ctrl_counts: str | None = None  # likewise for the matched control: `ctrl_counts_*`
    control_items: bool = False  # control cells are items of their own (should_yield_control_cells)
    obs_columns: list[str] = Field(default_factory=list)  # obs columns sent per row, as `obs.<name>`
    dataset_column: bool = False  # a `dataset` column: the TOML dataset of each row
    drop_last: bool = False  # each group's partial item is dropped, and train's partial last batch
    max_cells_per_group: int | None = Field(None, ge=1)  # cell-load's downsample_cells
    downsample: float | None = Field(None, gt=0)  # binomial thinning of pert_counts (cell-load's)
    is_log1p: bool = True  # counts are log1p'd: expm1 before thinning, log1p after
    val_subsample_fraction: float | None = Field(None, gt=0, le=1)
    fixed_control_pairs: bool = False  # each cell's control drawn once, reused every epoch (cell-load's cache)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "PerturbationConfig":
        """Validate a client's config (errors.parse_model's messages), then check it names its files once."""
        config = parse_model(cls, raw, "perturbation config")
        if (config.files is None) == (config.toml is None):
            raise CellfeedError("perturbation config: give exactly one of `files` or a TOML config (`config_path`)")
        return config


@dataclass
class FileSpec:
    """One h5ad file of the session, with the split rules that apply to it."""

    dataset: str
    path: Path
    label: str  # as clients name it: relative to the data root
    # the split of cell types no rule names; None (cell-load, [training] not "train"): not loaded
    split: str | None = "train"
    zeroshot: dict[str, str] = field(default_factory=dict)  # cell type (or file stem) -> split
    # cell type -> target -> its split (protoplast), or the tuple of its splits (cell-load)
    fewshot: dict[str, dict[str, str | tuple[str, ...]]] = field(default_factory=dict)
    schema: str = PROTOPLAST

    @property
    def stem(self) -> str:
        return self.path.stem


@dataclass
class ConfigFiles:
    """The h5ad files a config names, with their dataset options, TOML schema and the warnings of reading it."""

    files: list[FileSpec]
    dataset_opts: dict[str, Any]
    schema: str | None = None  # None: explicit `files`
    warnings: list[str] = field(default_factory=list)


def resolve_files(config: PerturbationConfig, root: DataRoot) -> ConfigFiles:
    """The files of a session and their split rules, from an explicit list or from TOML."""
    if config.files is not None:
        if not config.files:
            raise CellfeedError("perturbation config: `files` is empty")
        specs = []
        for name in config.files:
            path = root.resolve(name)
            specs.append(FileSpec(dataset=path.stem, path=path, label=root.relative(path)))
        return ConfigFiles(files=specs, dataset_opts={})
    assert config.toml is not None
    return _from_toml(config.toml, root, config.toml_schema)


def _from_toml(text: str, root: DataRoot, schema: str = "auto") -> ConfigFiles:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CellfeedError(f"TOML config: {exc}") from None
    known = {"datasets", "training", "zeroshot", "fewshot", "dataset_opts", "loader"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise CellfeedError(f"TOML config: unknown table [{unknown[0]}] (known: {', '.join(sorted(known))})")
    datasets = doc.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise CellfeedError("TOML config: [datasets] is missing or empty")
    training = doc.get("training", {}) or {}
    zeroshot = doc.get("zeroshot", {}) or {}
    fewshot = doc.get("fewshot", {}) or {}
    for table, name in ((training, "training"), (zeroshot, "zeroshot"), (fewshot, "fewshot")):
        if not isinstance(table, dict):
            raise CellfeedError(f"TOML config: [{name}] must be a table")

    if schema == "auto":
        schema = CELL_LOAD if "training" in doc else PROTOPLAST
    cell_load = schema == CELL_LOAD
    warnings: list[str] = []
    for name, split in training.items():
        if name not in datasets:
            raise CellfeedError(f"TOML config: [training] names dataset {name!r}, which [datasets] does not define")
        _check_split(split, f"[training] {name}")
        if cell_load and split != "train":
            warnings.append(
                f"[training] {name} = {split!r}: as in cell-load, only \"train\" has an effect; the cell types of "
                f"{name!r} that no [zeroshot]/[fewshot] rule names are not loaded (use [zeroshot] to hold out a cell type)"
            )
    if not cell_load and training:
        warnings.append("[training] is ignored under protoplast's schema (toml_schema = \"protoplast\")")
    zeroshot_rules: dict[str, dict[str, str]] = {}
    for key, split in zeroshot.items():
        dataset, celltype = _split_key(key, "zeroshot", datasets)
        _check_split(split, f"[zeroshot] {key!r}")
        zeroshot_rules.setdefault(dataset, {})[celltype] = split
    fewshot_rules: dict[str, dict[str, dict[str, str]]] = {}
    for key, table in fewshot.items():
        dataset, celltype = _split_key(key, "fewshot", datasets)
        if not isinstance(table, dict):
            raise CellfeedError(f"TOML config: [fewshot.{key!r}] must be a table of split = [targets]")
        targets: dict[str, Any] = {}
        for split, names in table.items():
            if split not in ("val", "test"):
                raise CellfeedError(f"TOML config: [fewshot.{key!r}] has unknown split {split!r} (use val or test)")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise CellfeedError(f"TOML config: [fewshot.{key!r}] {split} must be a list of target names")
            for target in names:
                if cell_load:  # listed under val and test: in both, as in cell-load
                    targets[target] = tuple(s for s in ("val", "test") if s == split or s in targets.get(target, ()))
                else:  # listed in both: the later table wins, as in protoplast
                    targets[target] = split
        fewshot_rules.setdefault(dataset, {})[celltype] = targets

    # cell-load loads only datasets named in [training], [zeroshot] or [fewshot]; protoplast loads all.
    named = set(training) | set(zeroshot_rules) | set(fewshot_rules)
    specs: list[FileSpec] = []
    for dataset, pattern in datasets.items():
        if cell_load and dataset not in named:
            continue
        if not isinstance(pattern, str) or not pattern:
            raise CellfeedError(f"TOML config: [datasets] {dataset} must be a path pattern string")
        paths = _expand(pattern, root, dataset)
        for path in paths:
            specs.append(
                FileSpec(
                    dataset=dataset,
                    path=path,
                    label=root.relative(path),
                    split=("train" if training.get(dataset) == "train" else None) if cell_load else "train",
                    zeroshot=zeroshot_rules.get(dataset, {}),
                    fewshot=fewshot_rules.get(dataset, {}),
                    schema=schema,
                )
            )
    if not specs:
        hint = " (under cell-load's schema only datasets named in [training], [zeroshot] or [fewshot] are loaded)" if cell_load else ""
        raise CellfeedError(f"TOML config: no dataset files selected{hint}")
    opts = doc.get("dataset_opts", {}) or {}
    return ConfigFiles(files=specs, dataset_opts=opts, schema=schema, warnings=warnings)


def _check_split(split: object, where: str) -> None:
    if split not in SPLITS:
        raise CellfeedError(f"TOML config: {where} = {split!r} is not a split name (use one of {', '.join(SPLITS)})")


def _split_key(key: str, table: str, datasets: dict[str, Any]) -> tuple[str, str]:
    dataset, dot, celltype = key.partition(".")
    if not dot or not celltype:
        raise CellfeedError(f"TOML config: [{table}] key {key!r} must be \"dataset.celltype\"")
    if dataset not in datasets:
        raise CellfeedError(f"TOML config: [{table}] key {key!r} names dataset {dataset!r}, which [datasets] does not define")
    return dataset, celltype


def _expand(pattern: str, root: DataRoot, dataset: str) -> list[Path]:
    """Brace patterns, then globs and directories, each resolved inside the data root."""
    found: list[Path] = []
    for item in braceexpand(pattern):
        if any(ch in item for ch in "*?["):
            rel = Path(item)
            if rel.is_absolute():
                root.resolve(rel.parent if "*" not in str(rel.parent) else root.path, must_exist=False)
                try:
                    rel = rel.relative_to(root.path)
                except ValueError:
                    raise CellfeedError(f"path {item!r} is outside the server's data root") from None
            matches = sorted(p for p in root.path.glob(str(rel)) if p.suffix in H5AD_SUFFIXES)
            found.extend(root.resolve(p) for p in matches)
            if not matches:
                raise CellfeedError(f"TOML config: [datasets] {dataset}: pattern {item!r} matches no .h5ad file")
            continue
        path = root.resolve(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in H5AD_SUFFIXES)
            if not files:
                raise CellfeedError(f"TOML config: [datasets] {dataset}: directory {item!r} holds no .h5ad file")
            found.extend(files)
        else:
            found.append(path)
    return found
