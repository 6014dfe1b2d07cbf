"""Open sessions (one Source per distinct kind + config) and the progress of live streams."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cellfeed.server.context import ServerContext
from cellfeed.server.errors import CellfeedError, NotFound
from cellfeed.server.limits import MAX_JSON_DEPTH, check_batch_size, object_depth
from cellfeed.server.reading.handles import Version, version_of
from cellfeed.server.kinds import source_class
from cellfeed.server.kinds.base import Source
from cellfeed.wire.malloc import return_freed_memory


SWEEP_S = 30.0
GRACE_S = 5.0  # a session used this recently is kept even over the budgets
log = logging.getLogger(__name__)


def _held_bytes(session: "Session") -> int:
    """What a session holds beyond the shared caches (its tables and plans), as its source says."""
    try:
        return int(session.source.nbytes())
    except Exception:  # noqa: BLE001 - an estimate; never a reason to fail
        return 0


def normalised_config(source: Source, raw: dict[str, Any]) -> Any:
    """The config as the source's kind read it, defaults filled in (its pydantic model dumped), so
    configs of one meaning (`{}` and `{"batch_size": <its default>}`) are one; `raw` for a kind
    without a model."""
    config = getattr(source, "config", None)
    return config.model_dump(mode="json") if isinstance(config, BaseModel) else raw


def session_id(kind: str, config: Any, files: dict[str, Any] | None = None) -> str:
    """A digest of the kind, the canonical JSON of its (normalised) config and the versions of the
    files it reads: configs of one meaning over unchanged files share a session, in any server process."""
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
    used_at: float = field(default_factory=time.monotonic)  # last opened, planned or streamed

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

    def __init__(self, ctx: ServerContext, keep_finished: int = 64, *, sweep_seconds: float = SWEEP_S) -> None:
        self.ctx = ctx
        self._sessions: dict[str, Session] = {}
        self._latest: dict[str, Session] = {}  # config digest -> its newest session
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._streams: list[StreamProgress] = []
        self._keep_finished = keep_finished
        self.evicted = 0
        self._closed = threading.Event()
        if sweep_seconds > 0:
            threading.Thread(target=self._sweep, args=(sweep_seconds,), name="cellfeed-session-sweeper", daemon=True).start()

    def open(self, kind: str, config: dict[str, Any]) -> Session:
        """The session of this config over the files as they are now.

        Its id digests the config as the kind's model reads it (defaults filled in), so a config
        that means the same as an open session's gets that session (the source just opened for
        it is closed). The raw config's digest only finds, without opening anything, the session
        it was last given. When a file changed since the config's session opened (a job rewrote it), a new session
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
            latest.used_at = time.monotonic()
            return latest
        with lock:
            with self._lock:
                latest = self._latest.get(key)
            if latest is not None and latest.is_current():
                latest.used_at = time.monotonic()
                return latest
            with self.ctx.handles.recording() as used:
                source = source_class(kind).open(config, self.ctx)
            files = {str(self.ctx.data_root.relative(p)): v for p, v in used.items()}
            sid = session_id(kind, normalised_config(source, config), files)
            with self._lock:
                existing = self._sessions.get(sid)
                session = existing or Session(sid, kind, config, source, files=dict(used))
                if latest is not None and latest is not session:
                    latest.superseded_by = session.session_id
                self._sessions[sid] = session
                self._latest[key] = session
                session.used_at = time.monotonic()
            if existing is not None:  # the same meaning as an open session: that one serves it
                source.close()
                log.info("session reused: %s (%s) for a config of the same meaning", sid, kind)
                return existing
            log.info("session opened: %s (%s), %d file(s): %s", session.session_id, kind, len(files), ", ".join(sorted(files)[:5]))
        self.evict()
        return session

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def get(self, sid: str) -> Session:
        with self._lock:
            session = self._sessions.get(sid)
        if session is None:
            raise NotFound(f"unknown session {sid!r} (the server may have restarted or closed it when idle: open the session again)")
        session.used_at = time.monotonic()
        return session

    # -- bounded memory ------------------------------------------------------------------------
    def evict(self, now: float | None = None) -> list[str]:
        """Close sessions without live streams that have been idle past `session_idle_seconds`,
        then the least recently used idle ones while more than `max_sessions` are open or they
        hold more than `max_session_bytes`. A later request for one reopens it (same id)."""
        settings = self.ctx.settings
        now = time.monotonic() if now is None else now
        with self._lock:
            live = {st.session_id for st in self._streams if st.state == "streaming"}
            idle = sorted((s for s in self._sessions.values() if s.session_id not in live), key=lambda s: s.used_at)
            held = {s.session_id: _held_bytes(s) for s in self._sessions.values()}
            total, count = sum(held.values()), len(self._sessions)
            gone: list[Session] = []
            for s in idle:
                over = count > settings.max_sessions or total > settings.max_session_bytes
                if now - s.used_at < (GRACE_S if over else settings.session_idle_seconds):
                    break  # the rest were used more recently still (a stream may be starting)
                gone.append(s)
                count -= 1
                total -= held[s.session_id]
            for s in gone:
                del self._sessions[s.session_id]
                for key, latest in list(self._latest.items()):
                    if latest is s:
                        del self._latest[key]
            if gone:  # the opening locks of configs with no session left (none is opening now)
                for key in [k for k, lock in self._opening.items() if k not in self._latest and not lock.locked()]:
                    del self._opening[key]
            kept_files = {p for s in self._sessions.values() for p in s.files}
        for s in gone:
            try:
                s.source.close()
            except Exception:  # noqa: BLE001 - a source that fails to close is dropped all the same
                log.exception("closing session %s", s.session_id)
            log.info("session closed: %s (%s), idle %.0f s", s.session_id, s.kind, now - s.used_at)
        if gone:
            self.evicted += len(gone)
            self.ctx.handles.release(keep=kept_files, idle_seconds=min(60.0, settings.session_idle_seconds))
            # a cycle in a closed source would wait for a full collection, which a server making few
            # Python objects seldom runs (issue 15); then what they held goes back to the system
            gc.collect()
            return_freed_memory()
        return [s.session_id for s in gone]

    def _sweep(self, every: float) -> None:
        while not self._closed.wait(every):
            try:
                self.evict()
            except Exception:  # noqa: BLE001 - the sweeper must outlive one bad pass
                log.exception("session sweep")

    def close(self) -> None:
        """Stop the sweeper and close every session's source (at shutdown)."""
        self._closed.set()
        with self._lock:
            sessions, self._sessions, self._latest = list(self._sessions.values()), {}, {}
        for s in sessions:
            try:
                s.source.close()
            except Exception:  # noqa: BLE001
                log.exception("closing session %s", s.session_id)

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
