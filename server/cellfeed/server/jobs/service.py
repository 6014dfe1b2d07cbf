"""The job service: accepts jobs, keeps their records, runs them one at a time on a thread.

Paths are resolved inside the data root when a job is submitted (and again when it runs), so
a request naming anything outside is refused before it is queued. Each job has a log of JSON
lines under <state_dir>/jobs/<id>.jsonl holding its own events and its files' pipeline events.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

from cellfeed.server.context import ServerContext
from cellfeed.server.errors import CellfeedError, MissingFile, NotFound
from cellfeed.server.jobs.executor import Executor, make_executor
from cellfeed.server.jobs.models import Job, PreprocessJob, SortJob
from cellfeed.server.jobs.store import JobStore
from cellfeed.server.jobs.work import OUTCOME, FileTask, JobLog, cells_of, clean_after_kill, outputs_of, resolve_options
from cellfeed.server.preprocess.convert import Cancelled
from cellfeed.server.preprocess.folders import dataset_name
from cellfeed.server.suffixes import H5AD_NAMES, is_h5ad
from cellfeed.server.preprocess.outputs import is_done

ACTIVE = ("queued", "running")
STOP_WAIT_S = 10.0  # how long a stopping server waits for its running file to stop and be recorded
STOPPED = "the server stopped while this job was queued or running"


class Conflict(CellfeedError):
    """The job is not in a state that allows this (cancel a finished job, resume a running one)."""


class JobService:
    """Owns the job store, the executor and the job thread of one server."""

    def __init__(self, ctx: ServerContext, executor: Executor | None = None) -> None:
        self.ctx = ctx
        self.folder = ctx.state_dir / "jobs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.folder / "jobs.sqlite")
        left = self.store.active()
        for job_id in left:
            self._recover_finished(job_id)
        for job_id in self.store.mark_interrupted(left):
            self._log(job_id).event("job.interrupted", level="warning", reason="the server stopped while the job was queued or running")
            self._clean_after_kill(job_id)
        self.executor = executor or make_executor(ctx.settings)
        self._cancel: set[str] = set()
        self._stopping = threading.Event()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)
        self._thread.start()

    # requests -------------------------------------------------------------------------------

    def submit(self, request: PreprocessJob | SortJob) -> Job:
        files = self._expand(request.inputs)
        options = request.options.model_dump()
        self._resolve_options(request.kind, dict(options))  # refuse bad paths now, not when it runs
        sized = request.kind in ("preprocess", "sort")  # h5ad inputs: their cells from the shape, now
        job_id = self.store.create(request.kind, request.inputs, options, [(str(p), dataset_name(p), cells_of(p) if sized else 0) for p in files])
        self._log(job_id).event("job.submitted", kind=request.kind, files=[self.ctx.data_root.relative(p) for p in files], options=options)
        self._queue.put(job_id)
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    def list(self) -> list[Job]:
        return self.store.list()

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state not in ACTIVE:
            raise Conflict(f"job {job_id} is {job.state}; only queued or running jobs can be cancelled")
        self._cancel.add(job_id)
        if job.state == "queued":
            self._finish_cancelled(job_id)
        self._log(job_id).event("job.cancel_requested")
        return self.get(job_id)

    def resume(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.resumable:
            raise Conflict(f"job {job_id} is {job.state}; only interrupted, failed or cancelled jobs with files left can be resumed")
        self._cancel.discard(job_id)
        left = self.store.reset_for_resume(job_id)
        self._log(job_id).event("job.resumed", files_left=len(left))
        self._queue.put(job_id)
        return self.get(job_id)

    def logs(self, job_id: str, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """The job's log entries from `offset` on, and the offset after them."""
        self.get(job_id)
        path = self._log(job_id).path
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        entries = []
        for line in lines[offset:]:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries, len(lines)

    def close(self, wait: float = STOP_WAIT_S) -> None:
        """Stop (the server calls this as it shuts down, on SIGTERM): the running file (if any)
        stops at its next check and leaves nothing; the job becomes interrupted, resumable, with
        every finished file recorded as finished. Jobs still queued stay queued (marked
        interrupted at the next start)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(wait)
        self.executor.close()

    # running --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self._run(job_id)
            except Exception as exc:  # the service must outlive any one job's failure
                self.store.update_job(job_id, state="failed", finished=time.time(), error=f"{type(exc).__name__}: {exc}")
                self._log(job_id).event("job.failed", level="error", error=f"{type(exc).__name__}: {exc}")

    def _run(self, job_id: str) -> None:
        job = self.get(job_id)
        if job.state != "queued" or self._stopping.is_set():
            return  # a job still queued when the server stops is marked interrupted at the next start
        log = self._log(job_id)
        pending = [f for f in job.files if f.state == "pending"]
        self.store.update_job(job_id, state="running", started=time.time())
        log.event("job.started", files=len(pending), of=len(job.files), cells=sum(f.total for f in pending))
        options = dict(job.options)
        try:
            self._resolve_options(job.kind, options)
        except CellfeedError as exc:
            self.store.update_job(job_id, state="failed", finished=time.time(), error=str(exc))
            log.event("job.failed", level="error", error=str(exc))
            return
        tasks = [
            FileTask(job_id, f.index, job.kind, f.path, f.dataset, options, str(log.path), str(self.ctx.data_root.path))
            for f in pending
        ]

        def report(index: int, fields: dict[str, Any]) -> None:
            self.store.update_file(job_id, index, **fields)

        try:
            self.executor.run(tasks, report, lambda: job_id in self._cancel or self._stopping.is_set())
        except Cancelled:
            if self._stopping.is_set() and job_id not in self._cancel:
                self.store.mark_interrupted([job_id], STOPPED)
                log.event("job.interrupted", level="warning", reason="the server is stopping; resume the job to finish its files")
                return
            self._finish_cancelled(job_id)
            return
        done = self.get(job_id)
        failed = [f for f in done.files if f.state == "failed"]
        error = f"{len(failed)} of {len(done.files)} files failed" if failed else None
        self.store.update_job(job_id, state="failed" if failed else "succeeded", finished=time.time(), error=error)
        log.event("job.finished", state="failed" if failed else "succeeded", error=error)

    def _finish_cancelled(self, job_id: str) -> None:
        for f in self.get(job_id).files:
            if f.state in ("pending", "running"):
                self.store.update_file(job_id, f.index, state="cancelled", finished=time.time())
        self.store.update_job(job_id, state="cancelled", finished=time.time(), error="cancelled on request")
        self._cancel.discard(job_id)
        self._log(job_id).event("job.cancelled")

    # paths ----------------------------------------------------------------------------------

    def _expand(self, inputs: list[str]) -> list[Path]:
        """Input files inside the data root (folders give their .h5ad and .h5 files)."""
        files: list[Path] = []
        for name in inputs:
            path = self.ctx.data_root.resolve(name, what="input")
            if path.is_dir():
                found = self.ctx.data_root.listdir(path, is_h5ad, label=name)
                found = [p for p in found if p.is_file()]
                if not found:
                    raise MissingFile(f"no {H5AD_NAMES} files in {name!r}")
                files += found
            else:
                files.append(path)
        names = [dataset_name(p) for p in files]
        clash = next((n for n in names if names.count(n) > 1), None)
        if clash:
            raise CellfeedError(f"two inputs would both write dataset {clash!r}; submit them in separate jobs")
        return files

    def _resolve_options(self, kind: str, options: dict[str, Any]) -> None:
        """Turn the option paths into absolute paths inside the data root (in place); each file
        of the job resolves them again when it starts (jobs.work.process)."""
        resolve_options(self.ctx.data_root, kind, options)

    def _recover_finished(self, job_id: str) -> None:
        """Files the stopped server left `running` whose outcome is known: from the job log
        (`file.outcome`, logged before the record is written), else, for preprocess, from their
        output's manifest (made from this very input). Those stay finished; the rest go back to
        pending when the job is marked interrupted."""
        job = self.get(job_id)
        running = {f.index: f for f in job.files if f.state == "running"}
        if not running:
            return
        outcomes: dict[int, dict[str, Any]] = {}
        path = self._log(job_id).path
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            index = entry.get("index")
            if index not in running:
                continue
            if entry.get("event") == "file.assigned":
                outcomes.pop(index, None)  # a later run of the file: only its own outcome counts
            elif entry.get("event") == OUTCOME and isinstance(entry.get("outcome"), dict):
                outcomes[index] = entry["outcome"]
        log = self._log(job_id)
        for index, f in running.items():
            outcome = outcomes.get(index)
            if outcome is None and job.kind == "preprocess":
                try:
                    output = outputs_of(job.kind, f.path, f.dataset, job.options)[0]
                    if is_done(self.ctx.data_root.contain(output, "output"), Path(f.path)):
                        outcome = {"state": "succeeded", "output": str(output), "message": "finished before the server stopped (its output is complete)"}
                except (CellfeedError, OSError, KeyError):
                    outcome = None
            if outcome is None or outcome.get("state") not in ("succeeded", "skipped", "failed"):
                continue
            fields = {k: v for k, v in outcome.items() if k in ("state", "seconds", "output", "message", "counts")}
            self.store.update_file(job_id, index, **fields, finished=time.time())
            log.event("file.recovered", dataset=f.dataset, index=index, state=fields["state"])

    def _clean_after_kill(self, job_id: str) -> None:
        """Leftovers of the interrupted job's files (staging, temp and spill files) go now."""
        job = self.get(job_id)
        for f in job.files:
            try:
                gone = clean_after_kill(self.ctx.data_root, job.kind, f.path, f.dataset, job.options)
            except (CellfeedError, OSError, KeyError):
                continue
            if gone:
                self._log(job_id).event("job.cleaned", dataset=f.dataset, removed=gone)

    def _log(self, job_id: str) -> JobLog:
        return JobLog(self.folder / f"{job_id}.jsonl")
