"""One file of a job, run the same way in the server process or on a Dask worker.

`process` never raises for a bad file (its outcome says failed, with the message); it raises
Cancelled when told to stop. Its events also go to the job's log (JSON lines, append-only).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellfeed.server.errors import CellfeedError
from cellfeed.server.jobs.models import iso
from cellfeed.server.paths import DataRoot
from cellfeed.server.preprocess.atomic import remove_stale
from cellfeed.server.preprocess.h5ad_reader import cells_of  # noqa: F401  (the service sizes files with it)
from cellfeed.server.preprocess.folders import RunFolders
from cellfeed.server.preprocess.logs import FileLog
from cellfeed.server.preprocess.pipeline import Options, run_file
from cellfeed.server.preprocess.sort import SortOptions, default_output, sort_file

STATES = {"SUCCESS": "succeeded", "FAILED": "failed", "SKIPPED": "skipped"}
OUTCOME = "file.outcome"  # logged with a file's outcome before its record is updated (see JobService)


def stamp(t: float | None = None) -> str:
    """Now (or t) in the API's time format: ISO 8601, UTC, with its offset."""
    return iso(time.time() if t is None else t)


@dataclass(frozen=True)
class FileTask:
    """Everything a worker needs for one file (plain values: it is pickled to Dask workers)."""

    job_id: str
    index: int
    kind: str
    path: str
    dataset: str
    options: dict[str, Any]
    job_log: str
    data_root: str | None = None  # every path is resolved inside it again when the file starts


DIR_OPTIONS = {"preprocess": ("output_dir", "interim_dir", "log_dir"), "sort": ("output_dir",), "build-cell-index": ("output",)}
FILE_OPTIONS = {"preprocess": ("gene_table",), "sort": (), "build-cell-index": ()}


def resolve_options(root: DataRoot, kind: str, options: dict[str, Any]) -> None:
    """Turn the option paths into absolute paths inside the data root, as they are now (in place)."""
    for key in DIR_OPTIONS[kind]:
        if options.get(key):
            options[key] = str(root.resolve(options[key], must_exist=False, what=key))
    for key in FILE_OPTIONS[kind]:
        if options.get(key):
            options[key] = str(root.resolve(options[key], what=key))


_server_log = logging.getLogger("cellfeed.jobs")


class JobLog:
    """Appends event records to the job's log file as JSON lines (one write per line)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __call__(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)

    def event(self, event: str, level: str = "info", **fields: Any) -> None:
        dataset = fields.pop("dataset", None)
        self({"time": stamp(), "level": level, "dataset": dataset, "event": event, **fields})
        if event.startswith("job."):  # job transitions also go to the server's own log, one line each
            detail = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            _server_log.log(logging.getLevelName(level.upper()) if level.upper() in ("WARNING", "ERROR") else logging.INFO,
                            "%s %s %s", event, self.path.stem, detail)


def outputs_of(kind: str, path: str, dataset: str, options: dict[str, Any]) -> list[Path]:
    """Where one file of a job writes (its staging and temp files lie beside these)."""
    if kind == "preprocess":
        out = [Path(options["output_dir"]) / dataset]
        if options.get("keep_interim"):
            out.append(RunFolders(Path(options["interim_dir"]), Path(options["output_dir"]), Path(options["log_dir"])).interim(dataset))
        return out
    if kind == "build-cell-index":
        from cellfeed.server.jobs.cell_index import output_of

        return [output_of(path, options)]
    return [default_output(Path(path), options.get("output_dir"))]


def clean_after_kill(root: DataRoot, kind: str, path: str, dataset: str, options: dict[str, Any]) -> list[str]:
    """Remove what a killed run of this file left beside its outputs (staging folders, temp
    files, spill folders), each under its output's lock (skipped while another writer holds it)."""
    gone: list[str] = []
    for output in outputs_of(kind, path, dataset, options):
        try:
            folder = root.contain(output.parent)
        except CellfeedError:
            continue
        gone += remove_stale(folder / output.name, root)
    return gone


def process(task: FileTask, progress: Callable[[int, int], None], cancelled: Callable[[], bool]) -> dict[str, Any]:
    """Run one file; returns the outcome as FileRecord fields (state, seconds, output, message, counts).

    The outcome is also logged (`file.outcome`, with the file's index) before it is returned, so
    a server that stops before recording it finds it in the job log when it starts again.
    The file's paths are resolved inside the data root now, not when the job was submitted: a
    folder swapped for a symlink out of the root meanwhile fails this file, naming it."""
    JobLog(task.job_log).event("file.assigned", dataset=task.dataset, index=task.index, host=socket.gethostname(), pid=os.getpid())
    outcome = _process(task, progress, cancelled)
    JobLog(task.job_log).event(OUTCOME, dataset=task.dataset, index=task.index, outcome=outcome)
    return outcome


def _process(task: FileTask, progress: Callable[[int, int], None], cancelled: Callable[[], bool]) -> dict[str, Any]:
    root = DataRoot(task.data_root) if task.data_root else None
    options = dict(task.options)
    try:
        if root is not None:
            resolve_options(root, task.kind, options)
            root.contain(task.path, Path(task.path).name)
    except CellfeedError as exc:
        JobLog(task.job_log).event("file.failed", level="error", dataset=task.dataset, error=str(exc))
        return {"state": "failed", "seconds": 0.0, "message": str(exc)}
    if task.kind == "preprocess":
        return _preprocess(task, options, root, progress, cancelled)
    if task.kind == "build-cell-index":
        from cellfeed.server.jobs import cell_index

        return cell_index.run(task, options, root, progress, cancelled, JobLog(task.job_log))
    return _sort(task, options, root, progress, cancelled)


def _preprocess(task: FileTask, options: dict[str, Any], root: DataRoot | None, progress, cancelled) -> dict[str, Any]:
    opts = dict(options)
    dirs = RunFolders(Path(opts.pop("interim_dir")), Path(opts.pop("output_dir")), Path(opts.pop("log_dir")))
    options = Options(**opts, token=os.environ.get("HF_TOKEN"))
    result = run_file(Path(task.path), dirs, options, progress=progress, cancelled=cancelled, sinks=(JobLog(task.job_log),), root=root)
    return {"state": STATES[result.status], "seconds": result.seconds, "output": result.output, "message": result.message, "counts": result.counts}


def _sort(task: FileTask, options: dict[str, Any], root: DataRoot | None, progress, cancelled) -> dict[str, Any]:
    sort_options = SortOptions.model_validate(options)
    path = Path(task.path)
    output = default_output(path, sort_options.output_dir)
    log = FileLog(None, task.dataset, (JobLog(task.job_log),))
    started = time.time()
    log.event("sort.started", path=str(path), options=task.options)
    try:
        done = sort_file(path, output, sort_options, progress=progress, cancelled=cancelled, root=root)
    except CellfeedError as exc:
        log.event("sort.failed", level="error", error=str(exc))
        return {"state": "failed", "seconds": round(time.time() - started, 3), "message": str(exc)}
    except Exception as exc:  # a bug or an I/O error: this file fails, the trace goes to the log
        log.event("sort.failed", level="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return {"state": "failed", "seconds": round(time.time() - started, 3), "message": f"{type(exc).__name__}: {exc}"}
    log.event("sort.finished", output=str(done.output), rows=done.rows, moved=done.moved, seconds=done.seconds)
    return {"state": "succeeded", "seconds": done.seconds, "output": str(done.output), "message": done.message, "counts": {"rows": done.rows, "moved": done.moved}}
