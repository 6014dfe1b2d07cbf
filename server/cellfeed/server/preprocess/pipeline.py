"""run-all for one file: gene symbols, sentences, age and split in a single pass over X.

Every cell is read, ranked and compressed once: the split is decided first from obs (donor and
age only), then each output chunk file of output/<name>/{train,test}/chunks is written by its own
task. The dataset folder is built hidden and renamed into place, so a failure or a cancel leaves
nothing behind.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from cellfeed.server.errors import CellfeedError
from cellfeed.server.preprocess import age as age_mod
from cellfeed.server.preprocess.age import AgeCounts
from cellfeed.server.preprocess.atomic import remove_stale, staged_dir
from cellfeed.server.preprocess.convert import AgeSource, BlockOptions, Cancelled, Converter, chunk_tasks
from cellfeed.server.preprocess.genes import GeneSymbols, GeneTable, resolve_symbols
from cellfeed.server.preprocess.h5ad_reader import H5adInput
from cellfeed.server.preprocess.folders import RunFolders, dataset_name
from cellfeed.server.preprocess.logs import FileLog, Sink
from cellfeed.server.preprocess.outputs import is_done, source_stamp, write_manifest
from cellfeed.server.preprocess.split import DONOR_COLUMNS, DROPPED, TEST, TRAIN, SplitCounter, SplitDecision

if TYPE_CHECKING:
    from cellfeed.server.paths import DataRoot

Progress = Callable[[int, int], None]
OBS_BLOCK = 65_536


@dataclass
class Options:
    """Every knob of run-all; the CLI flags and the REST job options map onto these fields."""

    chunk_size: int = 10_000
    top_genes: int = 2000
    compression: str = "zstd"
    compression_level: int | None = 1  # zstd 1: half the CPU of the seed's 3 for ~10% larger files
    test_size: float = 0.05
    seed: int = 42
    skip_train_test_split: bool = False
    keep_interim: bool = False
    keep_null_age: bool = False
    skip_existing: bool = False
    development_stage_column: str = "development_stage"
    ontology_term_column: str = "development_stage_ontology_term_id"
    donor_column: str | None = None  # None: the first of DONOR_COLUMNS present
    gene_table: str | None = None  # a step1 gene table or an HGNC complete set; None: shipped GENCODE
    threads: int = 2
    repo_id: str | None = None
    token: str | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """The options as recorded in manifests and job records: never the token."""
        return {k: v for k, v in asdict(self).items() if k != "token"}

    def block_options(self) -> BlockOptions:
        """What the converter takes of these options (ranking, threads, parquet compression)."""
        return BlockOptions(top_genes=self.top_genes, threads=self.threads, compression=self.compression, compression_level=self.compression_level)


@dataclass
class FileResult:
    """What happened to one input file; `status` is SUCCESS, FAILED, SKIPPED or CANCELLED."""

    path: str
    dataset: str
    status: str
    seconds: float = 0.0
    output: str = ""
    message: str = ""
    counts: dict[str, Any] = field(default_factory=dict)


def gene_table(options: Options) -> GeneTable:
    return GeneTable.load(Path(options.gene_table)) if options.gene_table else GeneTable.shipped()


def open_input(path: Path, options: Options, log: FileLog) -> tuple[H5adInput, GeneSymbols]:
    """Open and check the file, and resolve its gene symbols (logged)."""
    source = H5adInput(path)
    try:
        symbols = resolve_symbols(source.var_names(), source.var_column("feature_name"), gene_table(options), source.label)
    except Exception:
        source.close()
        raise
    log.event(
        "input.opened", cells=source.n_obs, genes=source.n_vars, obs_columns=source.obs_columns,
        symbols_from=symbols.source, genes_with_symbol=symbols.n_mapped,
        genes_without_symbol=source.n_vars - symbols.n_mapped, unmapped_examples=symbols.unmapped_examples,
    )
    return source, symbols


def age_source(columns: list[str], options: Options, label: str) -> AgeSource:
    """The stage columns present; neither present is this file's error."""
    stage = options.development_stage_column if options.development_stage_column in columns else None
    term = options.ontology_term_column if options.ontology_term_column in columns else None
    if stage is None and term is None:
        raise CellfeedError(
            f"{label}: obs has no column {options.development_stage_column!r} (nor {options.ontology_term_column!r}), "
            f"so no age can be derived; columns: {', '.join(columns) or 'none'}"
        )
    return AgeSource(stage, term)


def donor_column(columns: list[str], options: Options, label: str) -> str | None:
    """The donor column: the one named (which must exist), else the first usual one present."""
    if options.donor_column:
        if options.donor_column not in columns:
            raise CellfeedError(f"{label}: obs has no donor column {options.donor_column!r}; columns: {', '.join(columns) or 'none'}")
        return options.donor_column
    return next((c for c in DONOR_COLUMNS if c in columns), None)


def scan_obs(source: H5adInput, ages: AgeSource, donor: str | None, options: Options, split: bool) -> tuple[AgeCounts, SplitDecision | None, np.ndarray | None]:
    """Passes over obs only (donor and stage columns): age counts, the split decision, and the split
    code of every row (one byte per cell)."""
    n = source.n_obs
    blocks = [(a, min(a + OBS_BLOCK, n)) for a in range(0, n, OBS_BLOCK)]
    wanted = [c for c in (donor, ages.label_column, ages.term_column) if c]

    def read(start: int, stop: int) -> tuple[pa.Array | None, pa.Array, pa.Array]:
        obs = source.obs(start, stop, wanted)
        labels, terms = (obs.get(c) if c else None for c in (ages.label_column, ages.term_column))
        return (obs.get(donor) if donor else None), age_mod.ages(labels, terms), labels if labels is not None else terms

    counts = AgeCounts()
    counter = SplitCounter(by_donor=donor is not None, drop_null_age=not options.keep_null_age)
    for start, stop in blocks:
        donors, values, labels = read(start, stop)
        counts.add(labels, values)
        if split:
            counter.add(donors, values)
    if not split:
        return counts, None, None
    if counts.with_age == 0 and not options.keep_null_age:
        labels = ", ".join(repr(k) for k in list(counts.null_labels)[:5])
        raise CellfeedError(
            f"{source.label}: no cell has an age (development stages: {labels}); the split keeps only cells with one, "
            "so pass --no-age-filter or --skip-train-test-split"
        )
    decision = counter.decide(options.test_size, options.seed)
    codes = np.empty(n, dtype=np.int8)
    assigner = decision.assigner()
    for start, stop in blocks:
        donors, values, _ = read(start, stop)
        codes[start:stop] = assigner.codes(donors, values)
    return counts, decision, codes


def run_file(
    path: Path,
    dirs: RunFolders,
    options: Options,
    *,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    sinks: tuple[Sink, ...] = (),
    root: "DataRoot | None" = None,
) -> FileResult:
    """run-all on one file; its failure is reported in the result, never raised (Cancelled is).

    The output is locked while written (another writer of it fails this file, naming it); with
    `root`, the input and the output folder are resolved inside it now, as they are opened.
    `progress(done, total)` counts cells of the input (total: its n_obs)."""
    path = Path(path)
    name = dataset_name(path)
    final = dirs.output(name)

    def work(log: FileLog) -> dict[str, Any] | None:
        if root is not None:
            root.contain(path, path.name)
            root.contain(final.parent, "output_dir")
        remove_stale(final, root)
        if options.skip_existing and is_done(final, path):
            log.event("file.skipped", reason="output exists and was made from this file", output=str(final))
            return None
        counts = _convert(path, name, final, dirs, options, log, progress, cancelled, root)
        note = _maybe_upload(final, name, options, log)
        if note:
            counts["upload"] = note
        return counts

    return guarded(path, name, final, dirs, sinks, work, options)


def guarded(
    path: Path, name: str, output: Path, dirs: RunFolders, sinks: tuple[Sink, ...],
    work: Callable[[FileLog], dict[str, Any] | None], options: Options,
) -> FileResult:
    """Run one file's `work` with its own log: errors become a FAILED result; None means SKIPPED."""
    started = time.time()
    result = FileResult(path=str(path), dataset=name, status="FAILED", output=str(output))
    try:
        log = FileLog(dirs.logs(name), name, sinks)
    except CellfeedError as exc:
        result.message = str(exc)
        return result
    try:
        log.event("file.started", path=str(path), output=str(output), options=options.public())
        counts = work(log)
        if counts is None:
            result.status, result.message = "SKIPPED", "output exists"
        else:
            result.status, result.counts = "SUCCESS", counts
            result.message = ", ".join(f"{split} {rows:,} rows" for split, rows in counts.get("rows", {}).items())
            if counts.get("upload"):
                result.message += f"; {counts['upload']}"
    except Cancelled:
        result.status, result.message = "CANCELLED", "cancelled"
        log.event("file.cancelled", level="warning")
        raise
    except CellfeedError as exc:
        result.message = str(exc)
        log.event("file.failed", level="error", error=result.message)
    except Exception as exc:  # a bug or an unexpected I/O error: fail this file only, keep the trace
        result.message = f"{type(exc).__name__}: {exc}"
        log.event("file.failed", level="error", error=result.message, traceback=traceback.format_exc())
    finally:
        result.seconds = round(time.time() - started, 3)
        log.event("file.finished", status=result.status, seconds=result.seconds, message=result.message)
        log.close()
    return result


def _convert(
    path: Path, name: str, final: Path, dirs: RunFolders, options: Options, log: FileLog,
    progress: Progress | None, cancelled: Callable[[], bool], root: "DataRoot | None" = None,
) -> dict[str, Any]:
    source, symbols = open_input(path if root is None else root.contain(path, path.name), options, log)
    with source:
        ages = age_source(source.obs_columns, options, source.label)
        split = not options.skip_train_test_split
        donor = donor_column(source.obs_columns, options, source.label) if split else None
        converter = Converter(source, symbols, options.block_options(), ages)
        if converter.renamed:
            log.event("obs.renamed", level="warning", columns=converter.renamed)
        if split and donor is None:
            log.event("split.no_donor", level="warning", looked_for=list(DONOR_COLUMNS))
        counts, decision, codes = scan_obs(source, ages, donor, options, split)
        log.event("age.extracted", **counts.as_dict())
        if decision is not None:
            log.event("split.decided", donor_column=donor, **decision.describe())
        with staged_dir(final, root) as staging, _interim(dirs, name, options, root) as interim:
            folders = {s: staging / s / "chunks" for s in ("train", "test")} if decision else {"all": staging / "chunks"}
            tasks = []
            for split_name, folder in folders.items():
                folder.mkdir(parents=True)
                code = {"train": TRAIN, "test": TEST}.get(split_name)
                tasks += chunk_tasks(folder, source.n_obs, options.chunk_size, codes, code)
            if interim is not None:
                (interim / "chunks").mkdir()
                tasks += chunk_tasks(interim / "chunks", source.n_obs, options.chunk_size)
            to_write = (int((codes != DROPPED).sum()) if codes is not None else source.n_obs) + (source.n_obs if interim is not None else 0)
            written = 0

            def advance(n: int) -> None:
                # progress in cells of the input: rows written (some cells are dropped, some
                # written twice with --keep-interim) scaled to n_obs, which the last row reaches
                nonlocal written
                written += n
                if progress:
                    progress(source.n_obs * written // max(1, to_write), source.n_obs)

            per_folder = converter.run(tasks, codes, advance, cancelled)
            if progress and to_write == 0:
                progress(source.n_obs, source.n_obs)
            rows = {s: per_folder.get(f, 0) for s, f in folders.items()}
            manifest = {
                "dataset": name,
                "source": source_stamp(path),
                "cells": source.n_obs,
                "rows": rows,
                "split": decision.describe() | {"donor_column": donor} if decision else None,
                "age": counts.as_dict(),
                "genes": {"source": symbols.source, "vars": source.n_vars, "with_symbol": symbols.n_mapped, "unmapped_examples": symbols.unmapped_examples},
                "obs_renamed": converter.renamed,
                "options": options.public(),
                "created": time.time(),
            }
            write_manifest(staging, manifest)
        log.event("output.written", output=str(final), rows=rows)
        return {"cells": source.n_obs, "rows": rows, "age": {k: v for k, v in counts.as_dict().items() if k != "distribution"}, "split": manifest["split"]}


class _interim:
    """The interim chunk folder kept by --keep-interim (built hidden, renamed on success)."""

    def __init__(self, dirs: RunFolders, name: str, options: Options, root: "DataRoot | None" = None) -> None:
        self._cm = staged_dir(dirs.interim(name), root) if options.keep_interim else None

    def __enter__(self) -> Path | None:
        return self._cm.__enter__() if self._cm else None

    def __exit__(self, *exc: Any) -> bool | None:
        return self._cm.__exit__(*exc) if self._cm else None


def _maybe_upload(folder: Path, name: str, options: Options, log: FileLog) -> str:
    if not (options.repo_id and options.token):
        return ""
    from cellfeed.server.preprocess.upload import upload_dataset

    repo, added = upload_dataset(folder, name, options.repo_id, options.token)
    log.event("upload.done", repo=repo, files=added)
    return f"uploaded {len(added)} files to {repo}"
