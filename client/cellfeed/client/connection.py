"""A connection to a cellfeed server: open sessions, plan streams, open DoGet readers.

Transient failures (server restarting, connection reset) are retried with exponential backoff;
a refused request raises RequestError at once with the server's message.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from cellfeed.client.errors import RequestError, ServerUnavailable
from cellfeed.wire import cellfeed_pb2 as pb
from cellfeed.wire import codec

NOT_FOUND = b"cellfeed:not_found"
SHM_UNAVAILABLE = b"cellfeed:shm_unavailable"
INVALID = b"cellfeed:invalid"
KIND = re.compile(r" \[(cellfeed:[a-z_]+)\]")
TRANSIENT = (flight.FlightUnavailableError, flight.FlightTimedOutError, flight.FlightInternalError, ConnectionError)


@dataclass
class Session:
    """An open session: its id, the facts the server sent, and how to reopen it."""

    session_id: str
    kind: str
    info: dict[str, Any]
    tables: dict[str, pa.Table]
    config: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass
class Plan:
    """What GetFlightInfo answers for a split: batches per rank in an epoch, items per batch."""

    num_batches: int
    batch_size: int


def normalize_location(server: str) -> str:
    """Accept `host:port`, `grpc://host:port`, `grpc+tls://...`."""
    return server if "://" in server else f"grpc://{server}"


class Connection:
    """Thread-safe handle on one server; the Flight client is created on first use."""

    def __init__(self, server: str, token: str | None = None, *, retry_seconds: float = 60.0, tls_root_certs: bytes | None = None) -> None:
        self.location = normalize_location(server)
        self.token = token
        self.retry_seconds = retry_seconds
        self.tls_root_certs = tls_root_certs
        self._client: flight.FlightClient | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> flight.FlightClient:
        with self._lock:
            if self._client is None:
                kwargs = {"tls_root_certs": self.tls_root_certs} if self.tls_root_certs else {}
                self._client = flight.FlightClient(self.location, **kwargs)
            return self._client

    def options(self, timeout: float | None = None) -> flight.FlightCallOptions:
        headers = [(b"authorization", f"Bearer {self.token}".encode())] if self.token else []
        return flight.FlightCallOptions(headers=headers, timeout=timeout)

    def retrying(self) -> Retrying:
        """The retry policy for transient failures: exponential backoff within retry_seconds."""
        return Retrying(
            retry=retry_if_exception_type(TRANSIENT),
            wait=wait_exponential(multiplier=0.1, max=5.0),
            stop=stop_after_delay(self.retry_seconds),
            reraise=True,
        )

    def action(self, name: str, body: bytes) -> bytes:
        """One DoAction call (with retries); the body of its first result."""
        action = flight.Action(name, body)
        results = self._call(lambda: list(self.client.do_action(action, self.options())))
        return results[0].body.to_pybytes()

    def open_session(self, kind: str, config: dict[str, Any]) -> Session:
        request = pb.OpenSession(kind=kind, config_json=json.dumps(config))
        reply = pb.SessionInfo()
        reply.ParseFromString(self.action("open_session", request.SerializeToString()))
        return Session(
            session_id=reply.session_id,
            kind=reply.kind,
            info=json.loads(reply.info_json),
            tables={name: codec.table_from_ipc(payload) for name, payload in reply.tables.items()},
            config=config,
        )

    def plan(self, session: Session, split: str, epoch: int, rank: int, world_size: int, stream_count: int, first_batch: int) -> Plan:
        request = pb.StreamRequest(
            session_id=session.session_id,
            split=split,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            stream_count=stream_count,
            first_batch=first_batch,
        )
        descriptor = flight.FlightDescriptor.for_command(request.SerializeToString())
        info = self._call(lambda: self.client.get_flight_info(descriptor, self.options()), session=session)
        plan = pb.Plan()
        plan.ParseFromString(info.app_metadata)
        return Plan(num_batches=plan.num_batches, batch_size=plan.batch_size)

    def do_get(self, ticket: bytes) -> flight.FlightStreamReader:
        client = self.client
        try:
            return client.do_get(flight.Ticket(ticket), self.options())
        except pa.ArrowInvalid as exc:
            if "closed" not in str(exc):
                raise
            # another stream reset the connection (the server went away) between our taking the
            # client and calling it: as transient as the failure that made it reset
            raise flight.FlightUnavailableError(f"connection reset: {exc}") from None

    def reset(self) -> None:
        """Drop the Flight client so the next call reconnects (after the server went away)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a broken client may fail to close; it is discarded anyway
                pass

    def close(self) -> None:
        self.reset()

    def _call(self, fn, session: Session | None = None):
        """Run fn with retries; reopen `session` if the server no longer knows it (it restarted)."""
        try:
            for attempt in self.retrying():
                with attempt:
                    try:
                        return fn()
                    except TRANSIENT:
                        self.reset()
                        raise
                    except flight.FlightServerError as exc:
                        if session is not None and kind(exc) == NOT_FOUND:
                            self.reopen(session)
                            return fn()
                        raise
        except TRANSIENT as exc:
            raise ServerUnavailable(f"cellfeed server at {self.location} unreachable for {self.retry_seconds:.0f} s: {message(exc)}") from exc
        except flight.FlightUnauthenticatedError as exc:
            raise RequestError(f"{self.location}: {message(exc)}") from None
        except flight.FlightServerError as exc:
            raise RequestError(message(exc)) from None

    def reopen(self, session: Session) -> None:
        """Open the session again on a (restarted) server; the id is a digest of the config and the
        versions of its files, so it is unchanged unless the files changed."""
        fresh = self.open_session(session.kind, session.config)
        if fresh.session_id != session.session_id:
            raise RequestError(
                f"cannot continue session {session.session_id}: on reopening, the server gives its config the id "
                f"{fresh.session_id}, so the files it reads changed (or the server runs another cellfeed version); "
                "continuing would mix two versions of the data"
            )


def message(exc: Exception) -> str:
    """The server's message without gRPC's trailing detail or the error kind."""
    text = str(exc)
    for marker in (". Detail:", ". gRPC client debug context"):
        if marker in text:
            text = text.split(marker)[0]
    return KIND.sub("", text)


def kind(exc: Exception) -> bytes:
    """What kind of refusal a server error is (`cellfeed:invalid`, ...), or b"" for none: from
    extra_info, or from the message's `[cellfeed:...]` end when the error came mid-stream."""
    info = getattr(exc, "extra_info", b"") or b""
    if info:
        return info
    found = KIND.search(str(exc).split(". Detail:")[0])
    return found.group(1).encode() if found else b""
