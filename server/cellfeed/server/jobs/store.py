"""Job records in SQLite under the state directory, so they survive restarts.

Every change commits at once. A server that starts finds jobs that were queued or running when
the previous one died and marks them interrupted (their files that were running go back to
pending); such a job can be resumed and skips the files it already finished.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cellfeed.server.jobs.models import FileRecord, Job, JobProgress, iso

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, inputs TEXT NOT NULL,
    options TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL, error TEXT
);
CREATE TABLE IF NOT EXISTS files (
    job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, path TEXT NOT NULL,
    dataset TEXT NOT NULL, state TEXT NOT NULL, done INTEGER DEFAULT 0, total INTEGER DEFAULT 0,
    started REAL, finished REAL, seconds REAL, output TEXT, message TEXT, counts TEXT,
    PRIMARY KEY (job_id, idx)
);
"""
FINISHED_FILES = ("succeeded", "skipped")
ENDED_FILES = ("succeeded", "skipped", "failed")  # counted as done in a job's progress
_JOB_FIELDS = {"state", "started", "finished", "error"}
_FILE_FIELDS = {"state", "done", "total", "started", "finished", "seconds", "output", "message", "counts"}


class JobStore:
    """The jobs database (one file); safe to use from several threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def create(self, kind: str, inputs: list[str], options: dict[str, Any], files: list[tuple[str, str, int]]) -> str:
        """A queued job; `files` are (path, dataset, cells) with cells known at submit time (0: unknown)."""
        job_id = uuid.uuid4().hex[:12]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO jobs (id, kind, state, inputs, options, created) VALUES (?, ?, 'queued', ?, ?, ?)",
                (job_id, kind, json.dumps(inputs), json.dumps(options), time.time()),
            )
            self._db.executemany(
                "INSERT INTO files (job_id, idx, path, dataset, state, total) VALUES (?, ?, ?, ?, 'pending', ?)",
                [(job_id, i, path, dataset, int(total)) for i, (path, dataset, total) in enumerate(files)],
            )
            self._db.execute("COMMIT")
        return job_id

    def update_job(self, job_id: str, **fields: Any) -> None:
        self._update("jobs", _JOB_FIELDS, fields, "id = ?", (job_id,))

    def update_file(self, job_id: str, index: int, **fields: Any) -> None:
        """Set fields of one file; a file that succeeds or is skipped counts all its cells done."""
        if "counts" in fields and fields["counts"] is not None:
            fields["counts"] = json.dumps(fields["counts"], default=str)
        extra = "done = total" if fields.get("state") in FINISHED_FILES and "done" not in fields else None
        self._update("files", _FILE_FIELDS, fields, "job_id = ? AND idx = ?", (job_id, index), extra)

    def _update(self, table: str, allowed: set[str], fields: dict[str, Any], where: str, key: tuple, extra: str | None = None) -> None:
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown {table} fields: {sorted(unknown)}")
        if not fields:
            return
        assignments = ", ".join([f"{name} = ?" for name in fields] + ([extra] if extra else []))
        with self._lock:
            self._db.execute(f"UPDATE {table} SET {assignments} WHERE {where}", (*fields.values(), *key))

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            files = self._db.execute("SELECT * FROM files WHERE job_id = ? ORDER BY idx", (job_id,)).fetchall()
        return _job(row, files) if row else None

    def list(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created").fetchall()
            files = self._db.execute("SELECT * FROM files ORDER BY job_id, idx").fetchall()
        by_job: dict[str, list[sqlite3.Row]] = {}
        for f in files:
            by_job.setdefault(f["job_id"], []).append(f)
        return [_job(row, by_job.get(row["id"], [])) for row in rows]

    def active(self) -> list[str]:
        """Jobs queued or running (at start-up: left so by a server that stopped)."""
        with self._lock:
            return [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running') ORDER BY created")]

    def mark_interrupted(self, ids: list[str] | None = None, error: str = "the server stopped while this job was queued or running") -> list[str]:
        """Jobs left queued or running by a server that stopped: now interrupted, ready to resume;
        their files still running go back to pending (the caller first records the outcomes of
        files that did finish, see JobService)."""
        with self._lock:
            if ids is None:
                ids = [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running')")]
            for job_id in ids:
                self._db.execute("UPDATE jobs SET state = 'interrupted', error = ? WHERE id = ?", (error, job_id))
                self._db.execute("UPDATE files SET state = 'pending', done = 0 WHERE job_id = ? AND state = 'running'", (job_id,))
        return ids

    def reset_for_resume(self, job_id: str) -> list[int]:
        """Queue the job again; files not finished go back to pending. Returns their indices."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE jobs SET state = 'queued', finished = NULL, error = NULL WHERE id = ?", (job_id,))
            self._db.execute(
                f"UPDATE files SET state = 'pending', done = 0, message = NULL WHERE job_id = ? AND state NOT IN {FINISHED_FILES}",
                (job_id,),
            )
            rows = self._db.execute(f"SELECT idx FROM files WHERE job_id = ? AND state NOT IN {FINISHED_FILES} ORDER BY idx", (job_id,)).fetchall()
            self._db.execute("COMMIT")
        return [r["idx"] for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def progress(state: str, started: float | None, files: list[sqlite3.Row], now: float | None = None) -> JobProgress:
    """The job's progress in cells and, while it runs, its rate and ETA. The rate counts only the
    cells of files started in this run (a resumed job's earlier files would inflate it)."""
    now = time.time() if now is None else now
    total = sum(f["total"] or 0 for f in files)

    def done_of(f: sqlite3.Row) -> int:
        if f["state"] in ENDED_FILES:
            return max(f["total"] or 0, f["done"] or 0) if f["state"] != "failed" else (f["total"] or 0)
        return (f["done"] or 0) if f["state"] == "running" else 0

    done = min(total, sum(done_of(f) for f in files)) if total else sum(done_of(f) for f in files)
    ended = sum(1 for f in files if f["state"] in ENDED_FILES)
    out = JobProgress(done=done, total=total, fraction=round(done / total, 6) if total else 0.0, files_done=ended, files_total=len(files))
    if state == "succeeded":
        out.eta_seconds = 0.0
    elif state == "running" and started is not None:
        this_run = sum(done_of(f) for f in files if f["started"] is not None and f["started"] >= started)
        elapsed = now - started
        if this_run > 0 and elapsed > 0:
            out.cells_per_second = round(this_run / elapsed, 3)
            out.eta_seconds = round(max(0, total - done) / out.cells_per_second, 3)
            out.eta_at = iso(now + out.eta_seconds)
    return out


def _job(row: sqlite3.Row, files: list[sqlite3.Row]) -> Job:
    records = [
        FileRecord(
            index=f["idx"], path=f["path"], dataset=f["dataset"], state=f["state"], done=f["done"] or 0, total=f["total"] or 0,
            started_at=iso(f["started"]), finished_at=iso(f["finished"]), seconds=f["seconds"], output=f["output"], message=f["message"],
            counts=json.loads(f["counts"]) if f["counts"] else None,
        )
        for f in files
    ]
    left = any(f.state not in FINISHED_FILES for f in records)
    return Job(
        id=row["id"], kind=row["kind"], state=row["state"], inputs=json.loads(row["inputs"]), options=json.loads(row["options"]),
        created_at=iso(row["created"]), started_at=iso(row["started"]), finished_at=iso(row["finished"]), error=row["error"],
        resumable=row["state"] in ("interrupted", "failed", "cancelled") and left, progress=progress(row["state"], row["started"], files), files=records,
    )
