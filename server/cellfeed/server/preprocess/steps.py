"""The seed's four steps as separate commands, for running (or re-running) one at a time.

step1 writes the gene table; step2 writes interim/parquet_chunks/<name>/chunks; step3 adds the
age column to those chunks; step4 splits them into output/<name>/{train,test}/chunks. Each step
streams, and each of its outputs appears whole (folder or chunk renamed into place).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cellfeed.server.errors import CellfeedError
from cellfeed.server.preprocess import age as age_mod
from cellfeed.server.preprocess.age import AgeCounts
from cellfeed.server.preprocess.atomic import remove_stale, staged_dir
from cellfeed.server.preprocess.chunks import ROW_GROUP_ROWS, chunk_files, open_parquet, read_chunks
from cellfeed.server.preprocess.convert import Converter, chunk_tasks
from cellfeed.server.preprocess.genes import GeneTable
from cellfeed.server.preprocess.folders import RunFolders, dataset_name
from cellfeed.server.preprocess.logs import Sink
from cellfeed.server.preprocess.outputs import DatasetWriter, write_manifest
from cellfeed.server.preprocess.pipeline import FileResult, Options, Progress, guarded, open_input
from cellfeed.server.preprocess.split import DONOR_COLUMNS, SplitCounter


def write_gene_table(dirs: RunFolders, hgnc_file: Path | None) -> tuple[Path, int]:
    """step1: the gene table step2 uses, from an HGNC complete set or the shipped GENCODE table."""
    table = GeneTable.load(hgnc_file) if hgnc_file else GeneTable.shipped()
    target = dirs.gene_table()
    table.write(target)
    return target, len(table)


def convert(path: Path, dirs: RunFolders, options: Options, *, progress: Progress | None = None, sinks: tuple[Sink, ...] = ()) -> FileResult:
    """step2: one h5ad to interim chunks (obs_names, obs columns, cell_sentence, genes, values)."""
    name = dataset_name(path)
    final = dirs.interim(name)

    def work(log) -> dict[str, Any]:
        remove_stale(final)
        source, symbols = open_input(Path(path), options, log)
        with source, staged_dir(final) as staging:
            converter = Converter(source, symbols, options.block_options())
            (staging / "chunks").mkdir()
            written = 0

            def advance(n: int) -> None:
                nonlocal written
                written += n
                if progress:
                    progress(written, source.n_obs)

            per_folder = converter.run(chunk_tasks(staging / "chunks", source.n_obs, options.chunk_size), None, advance, lambda: False)
            rows = {"all": sum(per_folder.values())}
        log.event("convert.done", output=str(final), rows=rows)
        return {"cells": source.n_obs, "rows": rows}

    return guarded(Path(path), name, final, dirs, sinks, work, options)


def add_age(name: str, dirs: RunFolders, options: Options, *, sinks: tuple[Sink, ...] = ()) -> FileResult:
    """step3: add (or recompute) `age` in every interim chunk of a dataset, one chunk at a time."""
    folder = dirs.interim_chunks(name)

    def work(log) -> dict[str, Any]:
        files = _interim_files(folder, name)
        counts = AgeCounts()
        for path in files:
            table = pq.read_table(path)
            labels, terms = (table.column(c).combine_chunks() if c in table.column_names else None for c in (options.development_stage_column, options.ontology_term_column))
            if labels is None and terms is None:
                raise CellfeedError(f"{name}: {path.name} has no column {options.development_stage_column!r}, so no age can be derived")
            values = age_mod.ages(labels, terms)
            counts.add(labels if labels is not None else terms, values)
            if "age" in table.column_names:
                table = table.drop_columns(["age"])
            at = table.column_names.index("cell_sentence") if "cell_sentence" in table.column_names else table.num_columns
            _replace_chunk(path, table.add_column(at, "age", values), options)
        log.event("age.extracted", chunks=len(files), **counts.as_dict())
        return {"cells": counts.cells, "rows": {"all": counts.cells}, "age": {k: v for k, v in counts.as_dict().items() if k != "distribution"}}

    return guarded(folder, name, folder, dirs, sinks, work, options)


def split(name: str, dirs: RunFolders, options: Options, *, sinks: tuple[Sink, ...] = ()) -> FileResult:
    """step4: interim chunks (with age) to output/<name>/{train,test}/chunks, or /chunks unsplit."""
    folder = dirs.interim_chunks(name)
    final = dirs.output(name)

    def work(log) -> dict[str, Any]:
        remove_stale(final)
        files = _interim_files(folder, name)
        columns = pq.read_schema(files[0]).names
        if "age" not in columns:
            raise CellfeedError(f"{name}: interim chunks have no age column; run step3-add-age first")
        donor = _donor(columns, options, name)
        decision = None
        if not options.skip_train_test_split:
            counter = SplitCounter(by_donor=donor is not None, drop_null_age=not options.keep_null_age)
            for table in read_chunks(folder, [c for c in (donor, "age") if c]):
                counter.add(table.column(donor).combine_chunks() if donor else None, table.column("age").combine_chunks())
            decision = counter.decide(options.test_size, options.seed)
            log.event("split.decided", donor_column=donor, **decision.describe())
        with staged_dir(final) as staging:
            writer = DatasetWriter(staging, decision is not None, options.chunk_size, options.compression, options.compression_level)
            assigner = decision.assigner() if decision else None
            for table in read_chunks(folder):
                age = table.column("age").combine_chunks()
                writer.write(table, assigner.codes(table.column(donor).combine_chunks() if donor else None, age) if assigner else None)
            rows = writer.close()
            described = decision.describe() | {"donor_column": donor} if decision else None
            write_manifest(staging, {"dataset": name, "source": {"path": str(folder)}, "rows": rows, "split": described, "options": options.public()})
        log.event("output.written", output=str(final), rows=rows)
        return {"rows": rows, "split": described}

    return guarded(folder, name, final, dirs, sinks, work, options)


def _interim_files(folder: Path, name: str) -> list[Path]:
    files = chunk_files(folder)
    if not files:
        raise CellfeedError(f"{name}: no interim chunks in {str(folder)!r}; run step2-convert-h5ad first")
    return files


def _donor(columns: list[str], options: Options, name: str) -> str | None:
    if options.donor_column:
        if options.donor_column not in columns:
            raise CellfeedError(f"{name}: interim chunks have no donor column {options.donor_column!r}")
        return options.donor_column
    return next((c for c in DONOR_COLUMNS if c in columns), None)


def _replace_chunk(path: Path, table: pa.Table, options: Options) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open_parquet(tmp, table.schema, options.compression, options.compression_level) as writer:
        writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
    os.replace(tmp, path)
