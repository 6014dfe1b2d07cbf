"""Several cellfeed replicas serving one job: which one each stream reads, and fail-over.

Any replica over the same data serves any ticket (a batch is a pure function of the config, seed,
epoch, rank, world size and index; a session id is a digest of the config and the files'
versions), so a job may spread its streams over several and move a stream to another replica,
from the batch it owed, when its replica dies.

- Addresses: a list, a comma-separated string (`server=` or CELLFEED_SERVER), or a DNS name that
  resolves to several hosts (socket.getaddrinfo; one replica per address). A name that resolves
  to one address (`localhost`) stays as given.
- Assignment: the client names its replicas as the StreamRequest's `locations`; GetFlightInfo's
  endpoint i (stream i) lists them all, starting at replica (rank * streams + i) % replicas, so
  the streams of every rank spread over the fleet. Stream i reads at the endpoint's first
  location whose replica is up, and when that one fails, at the next, from the batch it owed;
  a replica back from its back-off is used again at the next epoch's start.
- Sessions open lazily on each replica a stream uses; a replica that gives the session another
  id (its files differ) or cannot open it (a file missing) is refused with a RequestError naming
  the replica and, where the server says which, the file.
- A replica that fails is left out for a back-off (1 s, doubling to 30 s), then tried again;
  when every replica is down the streams retry with the loader's backoff and retry budget and
  end with ServerUnavailable, as with one server.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from cellfeed.client.connection import Connection, Session, normalize_location
from cellfeed.client.errors import RequestError, ServerUnavailable
from cellfeed.client.pipeline import retry as retry_policy
from cellfeed.client.pipeline.retry import Retry

BACKOFF_S = 1.0  # the first time a failed replica is left out
MAX_BACKOFF_S = 30.0


def split_servers(server: str | Sequence[str]) -> list[str]:
    """The addresses in `server`: a list, or a comma-separated string; each as a Flight URI."""
    items = server.split(",") if isinstance(server, str) else [str(s) for s in server]
    locations = [normalize_location(s.strip()) for s in items if s and s.strip()]
    if not locations:
        raise ValueError(f"server={server!r} names no address")
    return locations


def expand(location: str) -> list[str]:
    """One location per address its host name resolves to (several: a headless Service)."""
    scheme, _, rest = location.partition("://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return [location]
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
        return [location]  # an address already
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM)
    except OSError:
        return [location]  # unresolvable now: the connection reports it when used
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if len(addresses) <= 1:
        return [location]  # keep the name (TLS checks it against the certificate)
    return [f"{scheme}://{'[' + a + ']' if ':' in a else a}:{port}" for a in addresses]


def resolve_locations(server: str | Sequence[str]) -> list[str]:
    """Every replica's location, in order, without duplicates."""
    return list(dict.fromkeys(loc for given in split_servers(server) for loc in expand(given)))


class _Replica:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.down_until = 0.0  # monotonic time before which it is left out
        self.backoff = BACKOFF_S
        self.sessions: set[str] = set()  # session ids known open (and equal) here


class ReplicaSet:
    """The replicas of one job, each a Connection; thread-safe."""

    def __init__(self, server: str | Sequence[str] | Connection, connect: Callable[[str], Connection] | None = None) -> None:
        if isinstance(server, Connection):
            connections = [server]
        else:
            make = connect or Connection
            connections = [make(location) for location in resolve_locations(server)]
        self._replicas = [_Replica(c) for c in connections]
        self._lock = threading.Lock()

    # -- which replica -------------------------------------------------------------------------
    @property
    def primary(self) -> Connection:
        return self._replicas[0].connection

    @property
    def connections(self) -> list[Connection]:
        return [r.connection for r in self._replicas]

    def __len__(self) -> int:
        return len(self._replicas)

    @property
    def uris(self) -> list[str]:
        """Every replica's URI, in order: the `locations` a StreamRequest names."""
        return [r.connection.location for r in self._replicas]

    @property
    def locations(self) -> str:
        return ", ".join(r.connection.location for r in self._replicas)

    def _replica(self, connection: Connection) -> _Replica:
        return next(r for r in self._replicas if r.connection is connection)

    def healthy(self) -> list[Connection]:
        """Replicas not left out (those whose back-off has passed count again); if none, all of
        them, so that streams go on retrying every replica within their retry budget."""
        now = time.monotonic()
        with self._lock:
            up = [r.connection for r in self._replicas if r.down_until <= now]
        return up or self.connections

    def at(self, uri: str) -> Connection | None:
        """The replica whose location is `uri` (grpc:// and grpc+tcp:// alike); None if none is."""
        wanted = _canonical(uri)
        return next((r.connection for r in self._replicas if _canonical(r.connection.location) == wanted), None)

    def first_up(self, locations: Sequence[str]) -> Connection:
        """The replica at the first of `locations` (an endpoint's) that is not left out; when all
        are, the first of them (the retry budget then applies). Unknown URIs are skipped; with no
        known one, the replica set's own order is used."""
        known = [c for c in (self.at(uri) for uri in locations) if c is not None] or self.connections
        now = time.monotonic()
        with self._lock:
            up = [c for c in known if self._replica(c).down_until <= now]
        return (up or known)[0]

    def failed(self, connection: Connection) -> None:
        """`connection`'s replica failed (transport): leave it out for a back-off, doubling."""
        if len(self._replicas) == 1:
            return
        with self._lock:
            r = self._replica(connection)
            now = time.monotonic()
            if r.down_until > now:
                return  # another stream reported it already
            r.down_until = now + r.backoff
            r.backoff = min(r.backoff * 2, MAX_BACKOFF_S)
            r.sessions.clear()  # a restarted process knows no session

    def succeeded(self, connection: Connection) -> None:
        with self._lock:
            r = self._replica(connection)
            r.down_until, r.backoff = 0.0, BACKOFF_S

    def others_up(self, connection: Connection) -> bool:
        """Whether a replica other than `connection` is healthy now (fail over without waiting)."""
        now = time.monotonic()
        with self._lock:
            return any(r.connection is not connection and r.down_until <= now for r in self._replicas)

    # -- sessions ------------------------------------------------------------------------------
    def open_session(self, kind: str, config: dict[str, Any]) -> Session:
        """Open the session on the first replica that answers (the others open it when used)."""
        if len(self._replicas) == 1:
            session = self.primary.open_session(kind, config)
            self._replicas[0].sessions.add(session.session_id)
            return session

        def open_on(connection: Connection) -> Session:
            session = connection.open_session(kind, config, retry=False)
            with self._lock:
                self._replica(connection).sessions.add(session.session_id)
            return session

        return self._any(open_on, "DoAction(open_session)")

    def plan(self, session: Session, *args: Any) -> Any:
        """Connection.plan on the first healthy replica that answers, within the retry budget."""
        if len(self._replicas) == 1:
            return self.primary.plan(session, *args)

        def flight_info_on(connection: Connection) -> Any:
            self.ensure_session(connection, session)
            return connection.plan(session, *args, retry=False)

        return self._any(flight_info_on, "GetFlightInfo")

    def _any(self, fn: Callable[[Connection], Any], what: str) -> Any:
        """fn(replica) on the healthy replicas in turn until one answers; a refusal raises at
        once; the round is retried under the client's policy, and past the first replica's
        retry budget raises ServerUnavailable naming them all."""
        error: Exception | None = None

        def attempt() -> Any:
            nonlocal error
            for connection in self.healthy():
                try:
                    result = fn(connection)
                except RequestError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a transport failure: the next replica
                    self.failed(connection)
                    error = exc
                    continue
                self.succeeded(connection)
                return result
            raise Retry(error or ServerUnavailable(f"no replica of {self.locations} is up"))

        def give_up(cause: BaseException, budget: float) -> ServerUnavailable:
            return ServerUnavailable(f"no cellfeed replica reachable for {budget:g} s ({what}; replicas {self.locations}): {cause}")

        return retry_policy.call(attempt, budget_s=lambda: self.primary.retry_seconds, give_up=give_up)

    def ensure_session(self, connection: Connection, session: Session, *, reopen: bool = False) -> None:
        """Open `session` on `connection`'s replica unless known open there (`reopen`: the
        replica said it does not know it). One attempt: a transport failure raises, to retry.
        A replica whose files differ is refused, naming it and what the server names."""
        if len(self._replicas) == 1:
            return  # one server: the Connection reopens a session its server forgot
        r = self._replica(connection)
        with self._lock:
            known = session.session_id in r.sessions and not reopen
        if known:
            return
        try:
            fresh = connection.open_session(session.kind, session.config, retry=False)
        except RequestError as exc:
            raise RequestError(
                f"replica {connection.location} cannot open session {session.session_id} ({exc}): its data differs "
                f"from the other replicas' ({self.locations}); give the job replicas over the same files"
            ) from None
        if fresh.session_id != session.session_id:
            raise RequestError(
                f"replica {connection.location} gives session {session.session_id}'s config the id {fresh.session_id}: "
                f"the files it reads differ there ({_differing(session, fresh)}); every replica of a job "
                "must see the same files at the same versions (size and modification time)"
            )
        with self._lock:
            r.sessions.add(session.session_id)


def _canonical(uri: str) -> str:
    """A Flight URI with grpc+tcp:// written grpc:// (the same transport)."""
    return "grpc://" + uri[len("grpc+tcp://"):] if uri.startswith("grpc+tcp://") else uri


def preflight_any(replicas: ReplicaSet, connect_timeout: float) -> None:
    """The setup-time address check (cellfeed.client.preflight) passes when one replica answers;
    with none, the first replica's verdict is raised."""
    from cellfeed.client import preflight

    first: Exception | None = None
    for connection in replicas.connections:
        try:
            preflight.check(connection.location, connect_timeout)
            return
        except Exception as exc:  # noqa: BLE001 - the next replica may answer
            if len(replicas) == 1:
                raise
            replicas.failed(connection)
            first = first or exc
    assert first is not None
    raise first


def _differing(session: Session, fresh: Session) -> str:
    """The files whose versions differ between two SessionInfos (their `file_versions` facts), or a
    plain 'a file changed, was added or is missing' when the server does not list them."""
    ours, theirs = session.info.get("file_versions"), fresh.info.get("file_versions")
    if not isinstance(ours, dict) or not isinstance(theirs, dict):
        return "a file changed, was added or is missing"
    names = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
    return "file(s) " + ", ".join(names) if names else "a file changed"
