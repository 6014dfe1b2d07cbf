"""Where a job's files run: in the server process (default) or on a Dask cluster.

Both report the same events back: a file started, its progress (cells or elements done of the
total), and its outcome. With Dask, files fan out to the workers at once; progress comes back
over a Dask event topic and a cancel reaches running files through a Dask Event.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from cellfeed.server.jobs.work import FileTask, process
from cellfeed.server.preprocess.convert import Cancelled
from cellfeed.server.settings import Settings

Report = Callable[[int, dict[str, Any]], None]
PROGRESS_EVERY_S = 0.5


class Executor(ABC):
    """Runs the files of one job; `run` returns when all are done and raises Cancelled if stopped."""

    @abstractmethod
    def run(self, tasks: list[FileTask], report: Report, cancelled: Callable[[], bool]) -> None:
        """Run every task, calling report(index, fields) as files start, progress and finish."""

    def close(self) -> None:
        """Release what the executor holds (a cluster connection)."""


def _throttled(fn: Callable[..., None], every: float = PROGRESS_EVERY_S) -> Callable[..., None]:
    """Pass at most one call per `every` seconds, and always a progress call that reaches its total."""
    last = [0.0]

    def call(*args: Any) -> None:
        now = time.monotonic()
        final = len(args) == 2 and args[0] >= args[1]
        if final or now - last[0] >= every:
            last[0] = now
            fn(*args)

    return call


class InProcess(Executor):
    """Files one after another on the job thread of the server process."""

    def run(self, tasks: list[FileTask], report: Report, cancelled: Callable[[], bool]) -> None:
        for task in tasks:
            if cancelled():
                raise Cancelled()
            report(task.index, {"state": "running", "started": time.time()})
            progress = _throttled(lambda done, total, i=task.index: report(i, {"done": done, "total": total}))
            outcome = process(task, progress, cancelled)
            report(task.index, outcome | {"finished": time.time()})


def _on_worker(task: FileTask, topic: str, cancel_event: str) -> dict[str, Any]:
    """Runs on a Dask worker: one file, with progress sent back on `topic`."""
    from distributed import Event, get_client, get_worker

    worker = get_worker()
    stop = Event(cancel_event, client=get_client())  # bound here: it is polled from other threads

    def send(fields: dict[str, Any]) -> None:
        worker.log_event(topic, [task.index, fields])

    stopped = [False]

    def check() -> None:
        stopped[0] = stop.is_set()

    poll = _throttled(check, 1.0)

    def cancelled() -> bool:
        poll()
        return stopped[0]

    send({"state": "running", "started": time.time()})
    return process(task, _throttled(lambda done, total: send({"done": done, "total": total})), cancelled)


def _report_outcome(future: Any, task: FileTask, report: Report) -> type[Cancelled] | None:
    """Report a finished future's file outcome; returns Cancelled (reporting nothing) if it stopped."""
    if future.status == "cancelled":
        return Cancelled
    if future.status == "error":
        error = future.exception()
        if isinstance(error, Cancelled):
            return Cancelled
        outcome = {"state": "failed", "message": f"worker error: {type(error).__name__}: {error}"}
    else:
        outcome = future.result()
    report(task.index, outcome | {"finished": time.time()})
    return None


class OnDask(Executor):
    """Files fanned out to a Dask distributed cluster (shared file system assumed)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client = None

    def _connect(self):
        if self._client is None:
            from distributed import Client

            self._client = Client(self.address, set_as_default=False, timeout=30)
        return self._client

    def run(self, tasks: list[FileTask], report: Report, cancelled: Callable[[], bool]) -> None:
        from distributed import Event

        client = self._connect()
        run_id = uuid.uuid4().hex[:8]
        topic, cancel_event = f"cellfeed-progress-{run_id}", f"cellfeed-cancel-{run_id}"
        client.subscribe_topic(topic, lambda event: report(*event[1]))
        futures = {client.submit(_on_worker, t, topic, cancel_event, pure=False, key=f"cellfeed-{t.job_id}-{t.index}-{run_id}"): t for t in tasks}
        pending = set(futures)
        try:
            while pending:
                for future in [f for f in pending if f.done()]:
                    pending.discard(future)
                    if _report_outcome(future, futures[future], report) is Cancelled:
                        raise Cancelled()
                if cancelled():
                    # Files already running stop at their next check and clean up, or finish
                    # (and count as done); queued files see the event as they start. Waiting for
                    # all of them keeps each file's reported state true to what is on disk.
                    Event(cancel_event, client=client).set()
                    while not all(f.done() for f in pending):
                        time.sleep(0.1)
                    for future in pending:
                        _report_outcome(future, futures[future], report)
                    raise Cancelled()
                time.sleep(0.1)
        finally:
            client.unsubscribe_topic(topic)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def make_executor(settings: Settings) -> Executor:
    return OnDask(settings.dask_scheduler) if settings.dask_scheduler else InProcess()
