"""The REST shapes of jobs: requests (validated, unknown fields refused) and records.

Paths in requests are relative to the server's data root (absolute paths inside it also work);
they are resolved, and refused if outside, before a job is accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_INPUTS = 10_000  # files or folders named by one job

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
FileState = Literal["pending", "running", "succeeded", "failed", "skipped", "cancelled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PreprocessOptions(_Strict):
    """run-all's options; directories are inside the data root."""

    output_dir: str = Field("preprocessed/output", description="output/<name>/{train,test}/chunks go here")
    interim_dir: str = Field("preprocessed/interim", description="interim/parquet_chunks/<name>/chunks (with keep_interim)")
    log_dir: str = Field("preprocessed/logs", description="logs/<name>/pipeline.{json,log}")
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
    gene_table: str | None = Field(None, description="an HGNC complete set or step1 gene table inside the data root")
    repo_id: str | None = Field(None, description="upload each dataset to <repo_id>-<name> (needs HF_TOKEN on the server)")


class SortOptions(_Strict):
    target_label: str = "target_gene"
    batch_label: str = "batch_var"
    output_dir: str | None = Field(None, description="folder for <stem>.sorted.h5ad; default: beside each input")


class PreprocessJob(_Strict):
    kind: Literal["preprocess"]
    inputs: list[str] = Field(min_length=1, max_length=MAX_INPUTS, description=".h5ad files or folders of them, inside the data root")
    options: PreprocessOptions = Field(default_factory=PreprocessOptions)


class SortJob(_Strict):
    kind: Literal["sort"]
    inputs: list[str] = Field(min_length=1, max_length=MAX_INPUTS, description=".h5ad files or folders of them, inside the data root")
    options: SortOptions = Field(default_factory=SortOptions)


from cellfeed.server.jobs.cell_index import CellIndexJob  # noqa: E402  (DynaCLR cell index job kind)

JobRequest = Annotated[Union[PreprocessJob, SortJob, CellIndexJob], Field(discriminator="kind")]


class FileRecord(BaseModel):
    """One input file of a job: its state, progress, timing and outcome."""

    index: int
    path: str
    dataset: str
    state: FileState
    done: int = 0
    total: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    seconds: float | None = None
    output: str | None = None
    message: str | None = None
    counts: dict[str, Any] | None = None


class Job(BaseModel):
    id: str
    kind: Literal["preprocess", "sort", "build-cell-index"]
    state: JobState
    inputs: list[str]
    options: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    resumable: bool = Field(False, description="interrupted, failed or cancelled with files left to do")
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
