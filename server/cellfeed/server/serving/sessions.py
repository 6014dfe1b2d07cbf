"""Open sessions (one Source per distinct kind + config) and the progress of live streams."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cellfeed.server.context import ServerContext
from cellfeed.server.errors import NotFound
from cellfeed.server.sources import source_class
from cellfeed.server.sources.base import Source


def session_id(kind: str, config: dict[str, Any]) -> str:
    """A digest of the kind and the canonical JSON of its config: equal configs share a session."""
    canonical = json.dumps({"kind": kind, "config": config}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass
class Session:
    session_id: str
    kind: str
    config: dict[str, Any]
    source: Source
    opened_at: float = field(default_factory=time.time)


@dataclass
class StreamProgress:
    """One live (or recently finished) DoGet stream, for GET /v1/sessions."""

    session_id: str
    split: str
    epoch: int
    rank: int
    world_size: int
    stream_index: int
    stream_count: int
    first_batch: int
    total_batches: int
    peer: str
    sent: int = 0
    state: str = "streaming"
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


class SessionRegistry:
    """Thread-safe map of session id -> Session; opening the same config twice opens it once."""

    def __init__(self, ctx: ServerContext, keep_finished: int = 64) -> None:
        self.ctx = ctx
        self._sessions: dict[str, Session] = {}
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._streams: list[StreamProgress] = []
        self._keep_finished = keep_finished

    def open(self, kind: str, config: dict[str, Any]) -> Session:
        sid = session_id(kind, config)
        with self._lock:
            if sid in self._sessions:
                return self._sessions[sid]
            lock = self._opening.setdefault(sid, threading.Lock())
        with lock:
            with self._lock:
                if sid in self._sessions:
                    return self._sessions[sid]
            source = source_class(kind).open(config, self.ctx)
            session = Session(session_id=sid, kind=kind, config=config, source=source)
            with self._lock:
                self._sessions[sid] = session
                self._opening.pop(sid, None)
            return session

    def get(self, sid: str) -> Session:
        with self._lock:
            session = self._sessions.get(sid)
        if session is None:
            raise NotFound(f"unknown session {sid!r} (the server may have restarted: open the session again)")
        return session

    def start_stream(self, progress: StreamProgress) -> StreamProgress:
        with self._lock:
            self._streams.append(progress)
            finished = [s for s in self._streams if s.state != "streaming"]
            for old in finished[: max(0, len(finished) - self._keep_finished)]:
                self._streams.remove(old)
        return progress

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            sessions = list(self._sessions.values())
            streams = [asdict(s) for s in self._streams]
        out = []
        for s in sessions:
            mine = [st for st in streams if st["session_id"] == s.session_id]
            out.append(
                {
                    "session_id": s.session_id,
                    "kind": s.kind,
                    "opened_at": s.opened_at,
                    "splits": s.source.splits(),
                    "streams": mine,
                    "live_streams": sum(1 for st in mine if st["state"] == "streaming"),
                }
            )
        return out
