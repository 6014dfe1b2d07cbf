"""Open sessions (one Source per distinct kind + config) and the progress of live streams."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cellfeed.server.context import ServerContext
from cellfeed.server.errors import CellfeedError, NotFound
from cellfeed.server.limits import MAX_JSON_DEPTH, check_batch_size, object_depth
from cellfeed.server.reading.handles import Version, version_of
from cellfeed.server.sources import source_class
from cellfeed.server.sources.base import Source


def session_id(kind: str, config: dict[str, Any], files: dict[str, Any] | None = None) -> str:
    """A digest of the kind, the canonical JSON of its config and the versions of the files it
    reads: equal configs over unchanged files share a session, in any server process."""
    canonical = json.dumps({"kind": kind, "config": config, "files": files or {}}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass
class Session:
    session_id: str
    kind: str
    config: dict[str, Any]
    source: Source
    files: dict[Path, Version | None] = field(default_factory=dict)  # what it reads, at which version
    opened_at: float = field(default_factory=time.time)
    superseded_by: str | None = None  # a newer session of the same config, over changed files

    def is_current(self) -> bool:
        """Whether every file it reads is still at the version it opened."""
        return all(version_of(path) == version for path, version in self.files.items())


@dataclass
class StreamProgress:
    """One live (or recently finished) DoGet stream, for GET /v1/sessions. A stream that goes on
    into the following epochs (`continue_epochs`) shows the epoch it is in now, and its batches
    of that epoch: `total_batches`, of which `sent`."""

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
    kind: str = ""  # the session's stream kind
    transport: str = ""  # "grpc", or "shm" (shared-memory slots)
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
        self._latest: dict[str, Session] = {}  # config digest -> its newest session
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._streams: list[StreamProgress] = []
        self._keep_finished = keep_finished

    def open(self, kind: str, config: dict[str, Any]) -> Session:
        """The session of this config over the files as they are now.

        When a file changed since the config's session opened (a job rewrote it), a new session
        opens under a new id; the old one keeps serving its streams from the old version.
        A config nested too deep or asking for a batch over the server's cap is refused first.
        """
        if not isinstance(config, dict):
            raise CellfeedError(f"{kind} config must be a JSON object, got {type(config).__name__}")
        if object_depth(config) > MAX_JSON_DEPTH:
            raise CellfeedError(f"{kind} config: nested more than {MAX_JSON_DEPTH} levels deep")
        check_batch_size(config, self.ctx.settings.max_batch_size, f"{kind} config")
        key = session_id(kind, config)
        with self._lock:
            latest = self._latest.get(key)
            lock = self._opening.setdefault(key, threading.Lock())
        if latest is not None and latest.is_current():
            return latest
        with lock:
            with self._lock:
                latest = self._latest.get(key)
            if latest is not None and latest.is_current():
                return latest
            with self.ctx.handles.recording() as used:
                source = source_class(kind).open(config, self.ctx)
            files = {str(self.ctx.data_root.relative(p)): v for p, v in used.items()}
            session = Session(session_id(kind, config, files), kind, config, source, files=dict(used))
            with self._lock:
                if latest is not None:
                    latest.superseded_by = session.session_id
                self._sessions[session.session_id] = session
                self._latest[key] = session
            return session

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

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
                    "superseded_by": s.superseded_by,
                    "splits": s.source.splits(),
                    "streams": mine,
                    "live_streams": sum(1 for st in mine if st["state"] == "streaming"),
                }
            )
        return out
