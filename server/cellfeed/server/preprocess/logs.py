"""Per-dataset logs: JSON lines in logs/<name>/pipeline.json and the same events readable in
pipeline.log. Each file gets its own writer, so no event of one dataset lands in another's log."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellfeed.server.errors import CellfeedError

Sink = Callable[[dict[str, Any]], None]


def _stamp(t: float) -> str:
    """ISO 8601 in UTC with its offset, to the millisecond (the jobs API's time format)."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def readable(record: dict[str, Any]) -> str:
    """One event as a line: time, level, dataset, event, then key=value pairs."""
    fields = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) or ' ' in v else v}" for k, v in record.items() if k not in ("time", "level", "dataset", "event"))
    return f"{record['time']} {record['level'].upper():<7} {record['dataset']} {record['event']} {fields}".rstrip()


class FileLog:
    """The event log of one dataset; `sinks` also receive every event (job log, console)."""

    def __init__(self, folder: Path | None, dataset: str, sinks: tuple[Sink, ...] = ()) -> None:
        self.dataset = dataset
        self.sinks = sinks
        self._json = self._text = None
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                self._json = open(folder / "pipeline.json", "a", encoding="utf-8")
                self._text = open(folder / "pipeline.log", "a", encoding="utf-8")
            except OSError as exc:
                self.close()
                raise CellfeedError(f"cannot write logs to {str(folder)!r}: {exc.strerror or exc}") from None

    def event(self, event: str, level: str = "info", **fields: Any) -> dict[str, Any]:
        record = {"time": _stamp(time.time()), "level": level, "dataset": self.dataset, "event": event, **fields}
        if self._json is not None:
            self._json.write(json.dumps(record, default=str) + "\n")
            self._json.flush()
            self._text.write(readable(record) + "\n")
            self._text.flush()
        for sink in self.sinks:
            sink(record)
        return record

    def close(self) -> None:
        for fh in (self._json, self._text):
            if fh is not None:
                fh.close()
        self._json = self._text = None

    def __enter__(self) -> "FileLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
