"""The REST shapes of jobs: requests (validated, unknown fields refused) and records.

Paths in requests are relative to the server's data root (absolute paths inside it also work);
they are resolved, and refused if outside, before a job is accepted.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from cellfeed.server.limits import PathName
from cellfeed.server.preprocess.sort import SortOptions

MAX_INPUTS = 10_000  # files or folders named by one job

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
FileState = Literal["pending", "running", "succeeded", "failed", "skipped", "cancelled"]


def iso(t: float | None) -> str | None:
    """Epoch seconds as ISO 8601 in UTC with its offset, to the millisecond
    ("2026-12-01T20:30:00.123+00:00"); the API's one time format (records and logs)."""
    if t is None:
        return None
    return datetime.fromtimestamp(float(t), timezone.utc).isoformat(timespec="milliseconds")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PreprocessOptions(_Strict):
    """run-all's options; directories are inside the data root."""

    output_dir: PathName = Field("preprocessed/output", description="output/<name>/{train,test}/chunks go here")
    interim_dir: PathName = Field("preprocessed/interim", description="interim/parquet_chunks/<name>/chunks (with keep_interim)")
    log_dir: PathName = Field("preprocessed/logs", description="logs/<name>/pipeline.{json,log}")
    chunk_size: int = Field(10_000, ge=1, description="rows per parquet chunk")
    top_genes: int = Field(2000, ge=1, description="genes per cell sentence")
    compression: Literal["zstd", "snappy", "gzip", "brotli", "lz4", "none"] = "zstd"
    compression_level: int | None = Field(1, description="codec level (zstd, gzip, brotli); the seed used 3")
    test_size: float = Field(0.05, gt=0, lt=1, description="share of cells in test")
    seed: int = Field(42, description="split seed")
    skip_train_test_split: bool = Field(False, description="write output/<name>/chunks unsplit")
    keep_interim: bool = Field(False, description="also write interim/parquet_chunks/<name>/chunks")
    keep_null_age: bool = Field(False, description="keep cells without an age (dropped by default, as the seed does)")
    donor_column: str | None = Field(None, description="obs donor column; default: first of donor_id, donor, subject_id, individual")
    development_stage_column: str = "development_stage"
    gene_table: PathName | None = Field(None, description="an HGNC complete set or step1 gene table inside the data root")
    repo_id: str | None = Field(None, description="upload each dataset to <repo_id>-<name> (needs HF_TOKEN on the server)")


class PreprocessJob(_Strict):
    kind: Literal["preprocess"]
    inputs: list[PathName] = Field(min_length=1, max_length=MAX_INPUTS, description=".h5ad (or .h5) files or folders of them, inside the data root")
    options: PreprocessOptions = Field(default_factory=PreprocessOptions)


class SortJob(_Strict):
    kind: Literal["sort"]
    inputs: list[PathName] = Field(min_length=1, max_length=MAX_INPUTS, description=".h5ad (or .h5) files or folders of them, inside the data root")
    options: SortOptions = Field(default_factory=SortOptions)


from cellfeed.server.jobs.cell_index import CellIndexJob  # noqa: E402  (DynaCLR cell index job kind)

JobRequest = Annotated[Union[PreprocessJob, SortJob, CellIndexJob], Field(discriminator="kind")]


class FileRecord(BaseModel):
    """One input file of a job: its state, progress, timing and outcome."""

    index: int
    path: str
    dataset: str
    state: FileState
    done: int = Field(0, description="cells of this file done")
    total: int = Field(0, description="cells of this file (its h5ad's n_obs, read when the job was submitted)")
    started_at: str | None = Field(None, description="ISO 8601, UTC")
    finished_at: str | None = Field(None, description="ISO 8601, UTC")
    seconds: float | None = None
    output: str | None = None
    message: str | None = None
    counts: dict[str, Any] | None = None


class JobProgress(BaseModel):
    """The job as a whole, in cells: what is done of the total, and when the rest should be."""

    unit: Literal["cells"] = "cells"
    done: int = Field(description="cells of files that reached an end (succeeded, skipped or failed) plus cells done in running files")
    total: int = Field(description="cells of every file of the job")
    fraction: float = Field(description="done / total (0 when total is 0)")
    files_done: int = Field(description="files that reached an end (succeeded, skipped or failed)")
    files_total: int
    cells_per_second: float | None = Field(None, description="cells done in this run of the job per second since it (re)started")
    eta_seconds: float | None = Field(None, description="seconds left at that rate while running; 0 once succeeded; null when unknown")
    eta_at: str | None = Field(None, description="when the job should finish at that rate (ISO 8601, UTC)")


class Job(BaseModel):
    id: str
    kind: Literal["preprocess", "sort", "build-cell-index"]
    state: JobState
    inputs: list[str]
    options: dict[str, Any]
    created_at: str = Field(description="ISO 8601, UTC")
    started_at: str | None = Field(None, description="when this job last started running (a resume restarts it); ISO 8601, UTC")
    finished_at: str | None = Field(None, description="ISO 8601, UTC")
    error: str | None = None
    resumable: bool = Field(False, description="interrupted, failed or cancelled with files left to do")
    progress: JobProgress | None = None
    files: list[FileRecord] = Field(default_factory=list)


class Accepted(BaseModel):
    id: str
    state: JobState


class LogEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    time: str
    level: str
    event: str
    dataset: str | None = None


class JobLogs(BaseModel):
    id: str
    entries: list[LogEntry]
    next_offset: int = Field(description="pass as ?offset= to get only newer entries")
