"""A connection to a cellfeed server: open sessions, plan streams, open DoGet streams.

Safe to share between threads, whatever fails:
- A Flight client is never closed while a call may be inside it. Each client is a *generation*
  that counts the calls and streams using it; `reset()` (the server went away) retires it, the
  next call makes a new one, and the retired one is closed when its last call or stream ends.
  (Closing a client under another thread's do_get crashed the process in gRPC.)
- Every call has a deadline: `call_timeout` for DoAction and GetFlightInfo, `read_timeout` for
  opening a DoGet stream and for each batch read from it (a watchdog cancels a read that gets
  no batch in time). A hung server is thus a failure like a dead one.
- Failures by kind (cellfeed.wire.errors): transport failures (refused, reset, deadline) are
  retried with backoff for `retry_seconds` (the client's one policy: cellfeed.client.pipeline.retry), then raise ServerUnavailable; a refusal (bad input:
  RequestError), a server failure (ServerError), a bad token or a TLS handshake failure raise
  at once, with the server's message naming what is at fault.

Defaults come from the environment when not given, so a training job can set them without code:
CELLFEED_RETRY_SECONDS (60), CELLFEED_CALL_TIMEOUT (60), CELLFEED_READ_TIMEOUT (60).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from cellfeed.client.errors import RequestError, ServerError, ServerUnavailable
from cellfeed.client.pipeline import retry as retry_policy
from cellfeed.client.pipeline.retry import Retry
from cellfeed.wire import cellfeed_pb2 as pb
from cellfeed.wire import codec
from cellfeed.wire.errors import ErrorKind, is_tls_failure, kind_of, message_of

# Failures of the transport, not of the request: retried. A Flight error that carries a cellfeed
# kind is a refusal whatever its class; FlightServerError without one is what gRPC makes of a
# stream the server's process dropped (UNKNOWN: "Stream removed").
TRANSIENT = (
    flight.FlightUnavailableError,
    flight.FlightTimedOutError,
    flight.FlightInternalError,
    flight.FlightCancelledError,
    flight.FlightServerError,
    ConnectionError,
)
T = TypeVar("T")


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


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


def plan_of(info: flight.FlightInfo) -> Plan:
    """The Plan a FlightInfo carries in its app_metadata."""
    plan = pb.Plan()
    plan.ParseFromString(info.app_metadata)
    return Plan(num_batches=plan.num_batches, batch_size=plan.batch_size)


def normalize_location(server: str) -> str:
    """Accept `host:port`, `grpc://host:port`, `grpc+tls://...`."""
    return server if "://" in server else f"grpc://{server}"


class _Generation:
    """One Flight client and the calls and streams using it."""

    def __init__(self, number: int, client: flight.FlightClient) -> None:
        self.number = number
        self.client = client
        self.users = 0
        self.retired = False
        self.closed = False


def _close_quietly(client: flight.FlightClient) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - a broken client may fail to close; it is discarded anyway
        pass


class Connection:
    """Thread-safe handle on one server; the Flight client is created on first use."""

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        retry_seconds: float | None = None,
        call_timeout: float | None = None,
        read_timeout: float | None = None,
        tls_root_certs: bytes | None = None,
        cert_chain: bytes | None = None,
        private_key: bytes | None = None,
    ) -> None:
        self.location = normalize_location(server)
        self.token = token
        self.retry_seconds = float(retry_seconds) if retry_seconds is not None else _env_seconds("CELLFEED_RETRY_SECONDS", 60.0)
        self.call_timeout = float(call_timeout) if call_timeout is not None else _env_seconds("CELLFEED_CALL_TIMEOUT", 60.0)
        self.read_timeout = float(read_timeout) if read_timeout is not None else _env_seconds("CELLFEED_READ_TIMEOUT", 60.0)
        self.tls_root_certs = tls_root_certs
        self.cert_chain, self.private_key = cert_chain, private_key  # mutual TLS: the client's certificate and key
        self._generation: _Generation | None = None
        self._made = 0  # generations made so far
        self._lock = threading.Lock()

    # -- client generations --------------------------------------------------------------------
    def _acquire(self) -> _Generation:
        """The current generation (made if there is none), counted as used until _release."""
        with self._lock:
            gen = self._generation
            if gen is None:
                kwargs = {"tls_root_certs": self.tls_root_certs} if self.tls_root_certs else {}
                if self.cert_chain and self.private_key:
                    kwargs.update(cert_chain=self.cert_chain, private_key=self.private_key)
                self._made += 1
                gen = self._generation = _Generation(self._made, flight.FlightClient(self.location, **kwargs))
            gen.users += 1
            return gen

    def _release(self, gen: _Generation) -> None:
        with self._lock:
            gen.users -= 1
            close = gen.retired and gen.users == 0 and not gen.closed
            gen.closed = gen.closed or close
        if close:
            _close_quietly(gen.client)

    @property
    def generation(self) -> int:
        """The number of the client the next call uses (1, 2, ...): it grows at each reconnect."""
        with self._lock:
            return self._generation.number if self._generation is not None else self._made + 1

    @property
    def client(self) -> flight.FlightClient:
        """The current Flight client. For calls of your own; it may be retired (and closed once
        unused by cellfeed) at any reconnect, so prefer the methods of this class."""
        gen = self._acquire()
        self._release(gen)
        return gen.client

    def reset(self, generation: int | None = None) -> None:
        """Retire the current client (the server went away) so the next call reconnects; it is
        closed once no call or stream uses it. With `generation`, only if that one is still
        current: streams failing together reconnect once, not once each."""
        with self._lock:
            gen = self._generation
            if gen is None or (generation is not None and gen.number != generation):
                return
            self._generation = None
            gen.retired = True
            close = gen.users == 0 and not gen.closed
            gen.closed = gen.closed or close
        if close:
            _close_quietly(gen.client)

    def close(self) -> None:
        self.reset()

    def options(self, timeout: float | None = None) -> flight.FlightCallOptions:
        headers = [(b"authorization", f"Bearer {self.token}".encode())] if self.token else []
        return flight.FlightCallOptions(headers=headers, timeout=timeout)

    # -- calls ---------------------------------------------------------------------------------
    def action(self, name: str, body: bytes, *, retry: bool = True) -> bytes:
        """One DoAction call (retried unless `retry=False`); the body of its first result."""
        action = flight.Action(name, body)

        def call(client: flight.FlightClient) -> bytes:
            results = list(client.do_action(action, self.options(self.call_timeout)))
            return results[0].body.to_pybytes()

        return self._call(f"DoAction({name})", call, retry=retry)

    def open_session(self, kind: str, config: dict[str, Any], *, retry: bool = True) -> Session:
        request = pb.OpenSession(kind=kind, config_json=json.dumps(config))
        reply = pb.SessionInfo()
        reply.ParseFromString(self.action("open_session", request.SerializeToString(), retry=retry))
        return Session(
            session_id=reply.session_id,
            kind=reply.kind,
            info=json.loads(reply.info_json),
            tables={name: codec.table_from_ipc(payload) for name, payload in reply.tables.items()},
            config=config,
        )

    def plan(
        self, session: Session, split: str, epoch: int, rank: int, world_size: int, stream_count: int, first_batch: int, *, retry: bool = True
    ) -> Plan:
        request = pb.StreamRequest(
            session_id=session.session_id,
            split=split,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            stream_count=stream_count,
            first_batch=first_batch,
        )
        return plan_of(self.flight_info(request, session=session, retry=retry))

    def flight_info(self, request: pb.StreamRequest, *, session: Session | None = None, retry: bool = True) -> flight.FlightInfo:
        """GetFlightInfo for `request`: one endpoint per stream, each with its ticket and the
        replicas to read it from. With `session`, a session the server forgot is reopened once."""
        descriptor = flight.FlightDescriptor.for_command(request.SerializeToString())
        return self._call(
            f"GetFlightInfo({request.split!r})",
            lambda client: client.get_flight_info(descriptor, self.options(self.call_timeout)),
            session=session,
            retry=retry,
        )

    def flight_info_once(self, request: pb.StreamRequest) -> flight.FlightInfo:
        """GetFlightInfo for `request`, one attempt; a failure is raised as Flight raised it, for
        a caller whose retry policy sorts it (a stream reader: cellfeed.client.pipeline)."""
        descriptor = flight.FlightDescriptor.for_command(request.SerializeToString())
        gen = self._acquire()
        try:
            return gen.client.get_flight_info(descriptor, self.options(self.call_timeout))
        finally:
            self._release(gen)

    def open_stream(self, ticket: bytes) -> "Stream":
        """Open one DoGet stream (one attempt: the caller retries from the batch it owes).

        Arrow's do_get waits for the stream's schema, which a hung server never sends, and it
        takes no stop token; so the call runs in a helper thread, and is abandoned after
        `read_timeout` (it cancels its stream and lets its client go when it returns at last).
        Raises the Flight error as is, or FlightTimedOutError for a stream that did not open."""
        gen = self._acquire()
        lock = threading.Lock()
        box: dict[str, Any] = {}
        opened = threading.Event()

        def call() -> None:
            try:
                box["reader"] = gen.client.do_get(flight.Ticket(ticket), self.options())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = exc
            with lock:
                opened.set()
                abandoned = box.get("abandoned", False)
            if abandoned:
                reader = box.pop("reader", None)
                if reader is not None:
                    try:
                        reader.cancel()
                    except Exception:  # noqa: BLE001
                        pass
                    del reader
                self._release(gen)

        threading.Thread(target=call, name="cellfeed-do-get", daemon=True).start()
        opened.wait(self.read_timeout)
        with lock:
            if not opened.is_set():
                box["abandoned"] = True
        if box.get("abandoned"):
            self.reset(gen.number)
            raise flight.FlightTimedOutError(f"DoGet: no stream from {self.location} within read_timeout = {self.read_timeout:g} s")
        if "error" in box:
            self._release(gen)
            raise box.pop("error")
        return Stream(self, gen, box.pop("reader"))

    def _call(self, what: str, fn: Callable[[flight.FlightClient], T], session: Session | None = None, *, retry: bool = True) -> T:
        """fn(client) under the client's retry policy (cellfeed.client.pipeline.retry): transport
        failures retried for `retry_seconds` (none with `retry=False`), `session` reopened once if
        the server no longer knows it (it restarted), refusals raised at once."""
        reopened = False

        def attempt() -> T:
            nonlocal reopened
            gen = self._acquire()
            try:
                return fn(gen.client)
            except Exception as exc:  # noqa: BLE001 - sorted below, outside the generation
                error = exc
            finally:
                self._release(gen)
            if kind_of(error) is ErrorKind.NOT_FOUND and session is not None and not reopened:
                self.reopen(session)
                reopened = True
                raise Retry(error, at_once=True, budgeted=False)
            refusal = self.refusal(error)
            if refusal is not None:
                raise refusal from None
            if not isinstance(error, TRANSIENT):
                raise error
            self.reset(gen.number)
            if not retry:
                raise error
            raise Retry(error)

        def give_up(cause: BaseException, budget: float) -> ServerUnavailable:
            return ServerUnavailable(
                f"cellfeed server at {self.location} unreachable for {budget:g} s "
                f"({what}; deadline per call {self.call_timeout:g} s): {message_of(cause)}"
            )

        return retry_policy.call(attempt, budget_s=lambda: self.retry_seconds, give_up=give_up)

    def refusal(self, exc: BaseException) -> RequestError | None:
        """The error to raise at once for a failure that retrying cannot mend; None for one to
        retry. A refusal's message is the server's, which names what is at fault."""
        kind = kind_of(exc)
        if kind is ErrorKind.INTERNAL:
            return ServerError(f"cellfeed server at {self.location} failed: {message_of(exc)}")
        if kind is not None:
            return RequestError(message_of(exc))
        if isinstance(exc, flight.FlightUnauthenticatedError):
            return RequestError(f"{self.location}: {message_of(exc)} (check the token)")
        if is_tls_failure(exc):
            return RequestError(
                f"{self.location}: the TLS handshake failed ({message_of(exc).split('last error: ')[-1]}); "
                "check the server's certificate and the client's tls_root_certs"
            )
        return None

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


class Stream:
    """One DoGet stream. Each `read()` has a deadline (the connection's read_timeout, watched by
    a watchdog thread that cancels the read); the stream holds its client generation until
    `close()`, so the client is never closed under it. Only the thread that reads it may close
    it; any thread may cancel it."""

    def __init__(self, connection: Connection, gen: _Generation, reader: flight.FlightStreamReader) -> None:
        self.connection = connection
        self._gen = gen
        self._reader: flight.FlightStreamReader | None = reader
        self._lock = threading.Lock()
        self._finished = False
        self.stalled = False

    @property
    def generation(self) -> int:
        return self._gen.number

    def read(self) -> pa.RecordBatch | None:
        """The next record batch, or None at the stream's end. A read that gets no batch within
        read_timeout raises FlightTimedOutError (the server hangs: retry like a dead one)."""
        reader = self._reader
        if reader is None:
            raise flight.FlightCancelledError("the stream was closed")
        timeout = self.connection.read_timeout
        _WATCHDOG.arm(self, timeout)
        try:
            return reader.read_chunk().data
        except StopIteration:
            self._finished = True
            return None
        except flight.FlightError:
            if self.stalled:
                raise flight.FlightTimedOutError(
                    f"no batch from {self.connection.location} within read_timeout = {timeout:g} s"
                ) from None
            raise
        finally:
            _WATCHDOG.disarm(self)

    def cancel(self) -> None:
        """Cancel the stream (a read in progress raises); safe from any thread, at any time."""
        with self._lock:
            if self._reader is not None and not self._finished:
                try:
                    self._reader.cancel()
                except Exception:  # noqa: BLE001 - the stream may be over already
                    pass

    def _stall(self) -> None:
        self.stalled = True
        self.cancel()

    def close(self) -> None:
        """End the stream (cancelled unless read to its end) and let its client go."""
        with self._lock:
            reader, self._reader = self._reader, None
            if reader is None:
                return
            if not self._finished:
                try:
                    reader.cancel()
                except Exception:  # noqa: BLE001
                    pass
        del reader  # the C++ reader goes before its client may close
        self.connection._release(self._gen)


class _Watchdog:
    """One thread for every stream of the process: it cancels reads past their deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[Stream, float] = {}
        self._thread: threading.Thread | None = None

    def arm(self, stream: Stream, seconds: float) -> None:
        with self._cond:
            was_empty = not self._armed
            self._armed[stream] = time.monotonic() + seconds
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cellfeed-watchdog", daemon=True)
                self._thread.start()
            elif was_empty:
                self._cond.notify()

    def disarm(self, stream: Stream) -> None:
        with self._cond:
            self._armed.pop(stream, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                expired = [s for s, at in self._armed.items() if at <= now]
                for s in expired:
                    del self._armed[s]
                if not expired:
                    # at most 0.25 s late; asleep while nothing is armed
                    self._cond.wait(min(0.25, min(self._armed.values()) - now) if self._armed else None)
            for s in expired:
                s._stall()


_WATCHDOG = _Watchdog()


def message(exc: BaseException) -> str:
    """The server's message without gRPC's trailing detail or the error kind."""
    return message_of(exc)
