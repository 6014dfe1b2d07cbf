"""run-all for one file: gene symbols, sentences, age and split in a single pass over X.

Every cell is read, ranked and compressed once: the split is planned first from obs (donor and
age only), then each block goes straight to output/<name>/{train,test}/chunks. The dataset folder
is built hidden and renamed into place, so a failure or a cancel leaves nothing behind.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cellfeed.server.errors import CellfeedError
from cellfeed.server.preprocess import age as age_mod
from cellfeed.server.preprocess.age import AgeCounts
from cellfeed.server.preprocess.atomic import remove_stale, staged_dir
from cellfeed.server.preprocess.convert import AgeSource, BlockOptions, Cancelled, Converter
from cellfeed.server.preprocess.genes import GeneSymbols, GeneTable, resolve_symbols
from cellfeed.server.preprocess.h5ad_reader import H5adInput
from cellfeed.server.preprocess.layout import Layout, dataset_name
from cellfeed.server.preprocess.logs import FileLog, Sink
from cellfeed.server.preprocess.outputs import DatasetWriter, is_done, source_stamp, write_manifest
from cellfeed.server.preprocess.split import DONOR_COLUMNS, SplitCounter, SplitPlan

Progress = Callable[[int, int], None]


@dataclass
class Options:
    """Every knob of run-all; the CLI flags and the REST job options map onto these fields."""

    chunk_size: int = 10_000
    top_genes: int = 2000
    compression: str = "zstd"
    compression_level: int | None = 3
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


def plan_split(source: H5adInput, ages: AgeSource, donor: str | None, options: Options, blocks: list[tuple[int, int]]) -> SplitPlan:
    """Pass one over obs only: count cells per donor and age, then plan."""
    counter = SplitCounter(by_donor=donor is not None, drop_null_age=not options.keep_null_age)
    wanted = [c for c in (donor, ages.label_column, ages.term_column) if c]
    for start, stop in blocks:
        obs = source.obs(start, stop, wanted)
        values = age_mod.ages(obs.get(ages.label_column) if ages.label_column else None, obs.get(ages.term_column) if ages.term_column else None)
        counter.add(obs.get(donor) if donor else None, values)
    return counter.plan(options.test_size, options.seed)


def run_file(
    path: Path,
    layout: Layout,
    options: Options,
    *,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    sinks: tuple[Sink, ...] = (),
) -> FileResult:
    """run-all on one file; its failure is reported in the result, never raised (Cancelled is)."""
    path = Path(path)
    name = dataset_name(path)
    final = layout.output(name)

    def work(log: FileLog) -> dict[str, Any] | None:
        remove_stale(final)
        if options.skip_existing and is_done(final, path):
            log.event("file.skipped", reason="output exists and was made from this file", output=str(final))
            return None
        counts = _convert(path, name, final, layout, options, log, progress, cancelled)
        note = _maybe_upload(final, name, options, log)
        if note:
            counts["upload"] = note
        return counts

    return guarded(path, name, final, layout, sinks, work, options)


def guarded(
    path: Path, name: str, output: Path, layout: Layout, sinks: tuple[Sink, ...],
    work: Callable[[FileLog], dict[str, Any] | None], options: Options,
) -> FileResult:
    """Run one file's `work` with its own log: errors become a FAILED result; None means SKIPPED."""
    started = time.time()
    result = FileResult(path=str(path), dataset=name, status="FAILED", output=str(output))
    try:
        log = FileLog(layout.logs(name), name, sinks)
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
    path: Path, name: str, final: Path, layout: Layout, options: Options, log: FileLog,
    progress: Progress | None, cancelled: Callable[[], bool],
) -> dict[str, Any]:
    source, symbols = open_input(path, options, log)
    with source:
        ages = age_source(source.obs_columns, options, source.label)
        donor = None if options.skip_train_test_split else donor_column(source.obs_columns, options, source.label)
        converter = Converter(source, symbols, BlockOptions(top_genes=options.top_genes, threads=options.threads), ages)
        if converter.renamed:
            log.event("obs.renamed", level="warning", columns=converter.renamed)
        plan = None
        if not options.skip_train_test_split:
            if donor is None:
                log.event("split.no_donor", level="warning", looked_for=list(DONOR_COLUMNS))
            plan = plan_split(source, ages, donor, options, converter.blocks)
            log.event("split.planned", donor_column=donor, **plan.describe())
        counts = AgeCounts()
        with staged_dir(final) as staging, _interim(layout, name, options) as interim:
            writer = DatasetWriter(staging, plan is not None, options.chunk_size, options.compression, options.compression_level)
            keep = DatasetWriter(interim, False, options.chunk_size, options.compression, options.compression_level) if interim else None
            assigner = plan.assigner() if plan else None
            done = 0
            label_column = converter.output_name(ages.label_column or ages.term_column or "")
            donor_out = converter.output_name(donor) if donor else None
            for table in converter.tables(cancelled):
                age = table.column("age").combine_chunks()
                counts.add(table.column(label_column).combine_chunks(), age)
                codes = assigner.codes(table.column(donor_out).combine_chunks() if donor_out else None, age) if assigner else None
                writer.write(table, codes)
                if keep is not None:
                    keep.write(table)
                done += table.num_rows
                if progress:
                    progress(done, source.n_obs)
            rows = writer.close()
            if keep is not None:
                keep.close()
            log.event("age.extracted", **counts.as_dict())
            manifest = {
                "dataset": name,
                "source": source_stamp(path),
                "cells": source.n_obs,
                "rows": rows,
                "split": plan.describe() | {"donor_column": donor} if plan else None,
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

    def __init__(self, layout: Layout, name: str, options: Options) -> None:
        self._cm = staged_dir(layout.interim(name)) if options.keep_interim else None

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
