"""The data plane: an Arrow Flight service that opens sessions, plans streams and serves batches.

Calls: DoAction("open_session", OpenSession) -> SessionInfo; DoAction("shm_probe") -> whether
the client shares this server's shared-memory folder; GetFlightInfo(StreamRequest) -> one
endpoint per stream with its Ticket (cellfeed.wire.tickets) and its locations (the request's replicas,
or this server), and the Plan in app_metadata; DoGet(Ticket) -> batches.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import DecodeError

from cellfeed.server import limits
from cellfeed.server.errors import CellfeedError, NotFound
from cellfeed.server.serving.sessions import SessionRegistry, StreamProgress
from cellfeed.server.kinds.base import HEAP, Buffers
from cellfeed.server.serving.shm import SlotsUnavailable, SlotBuffers, SlotPool, SlotPools, to_refs
from cellfeed.wire import cellfeed_pb2 as pb
from cellfeed.wire import codec, shm, tickets
from cellfeed.wire.errors import ErrorKind, server_error

log = logging.getLogger(__name__)


def _client_error(exc: CellfeedError) -> flight.FlightServerError:
    """A request's own fault, sent with its message and its kind (cellfeed.wire.errors)."""
    kind = ErrorKind.NOT_FOUND if isinstance(exc, NotFound) else ErrorKind.SHM_UNAVAILABLE if isinstance(exc, SlotsUnavailable) else ErrorKind.INVALID
    return server_error(str(exc), kind)


def _server_failure(what: str, exc: Exception) -> flight.FlightServerError:
    """Anything else raised while serving: a server bug or a file it cannot read. Logged, and sent
    as kind `internal`, which clients do not retry (the same request would fail the same way)."""
    log.error("%s failed", what, exc_info=exc)
    return server_error(f"server error in {what}: {exc!r}", ErrorKind.INTERNAL)


def _check_stream(what: str, rank: int, world_size: int, stream_count: int, stream_index: int = 0) -> None:
    """The same bounds for a StreamRequest (GetFlightInfo) and a Ticket (DoGet)."""
    if world_size < 1 or rank >= world_size or stream_count < 1 or stream_index >= stream_count:
        raise CellfeedError(
            f"{what}: rank {rank} / world size {world_size}, stream {stream_index} / {stream_count} "
            "(needs world_size >= 1, 0 <= rank < world_size, stream_count >= 1, 0 <= stream_index < stream_count)"
        )


def _check_first_batch(what: str, first_batch: int, total: int, split: str) -> None:
    """A resume point past the end is a client's mistake, not an empty stream."""
    if first_batch > 0 and first_batch >= total:
        raise CellfeedError(f"{what}: first_batch {first_batch} is past the end of split {split!r} ({total} batches per rank)")


def _parse(message_type, payload: bytes, what: str):
    message = message_type()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        raise CellfeedError(f"malformed {what}: not a cellfeed.v1.{message_type.__name__} message") from None
    return message


MAX_LOCATIONS = 256  # replicas a StreamRequest may name


def _request_locations(locations) -> list[str]:
    """The replica URIs a StreamRequest names, checked: at most MAX_LOCATIONS, each a Flight URI."""
    if len(locations) > MAX_LOCATIONS:
        raise CellfeedError(f"StreamRequest: {len(locations)} locations; at most {MAX_LOCATIONS} are accepted")
    for uri in locations:
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme not in ("grpc", "grpc+tcp", "grpc+tls") or not rest or len(uri) > 1024:
            raise CellfeedError(f"StreamRequest: location {uri[:100]!r} is not a grpc://, grpc+tcp:// or grpc+tls:// URI")
    return list(locations)


def _advertised(location: str, port: int) -> str:
    """This server's URI as a client reaches it: the host it listens on, or this machine's name
    when it listens on every interface (0.0.0.0, ::), with the port it got."""
    scheme, _, rest = location.partition("://")
    host = rest.rpartition(":")[0].strip("[]") or "0.0.0.0"
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


class FlightService(flight.FlightServerBase):
    """cellfeed's Flight server; one per process, serving every session and client."""

    def __init__(self, location: str, sessions: SessionRegistry, pools: SlotPools | None = None, **kwargs) -> None:
        super().__init__(location, **kwargs)
        self.advertised = _advertised(location, self.port)  # each endpoint's location: this server
        self.sessions = sessions
        self.metrics = sessions.ctx.metrics
        self.pools = pools or SlotPools(None)
        self.closing = threading.Event()  # set on shutdown: streams end at their next batch

    def shutdown(self) -> None:
        """Stop serving: open streams end at their next batch, then gRPC waits for them."""
        self.closing.set()
        super().shutdown()

    def list_actions(self, context):
        return [
            ("open_session", "Open (or find) a session: body OpenSession, result SessionInfo"),
            ("shm_probe", "Body JSON {name, content}: result b'1' if this server sees that file with that content"),
        ]

    def do_action(self, context, action):
        try:
            if action.type == "shm_probe":
                return [flight.Result(pa.py_buffer(b"1" if self._probe(action.body.to_pybytes()) else b"0"))]
            if action.type != "open_session":
                raise CellfeedError(f"unknown action {action.type!r}; known: open_session, shm_probe")
            request = _parse(pb.OpenSession, action.body.to_pybytes(), "OpenSession")
            config = limits.loads(request.config_json or "{}", f"{request.kind or 'session'} config (OpenSession.config_json)")
            if not isinstance(config, dict):
                raise CellfeedError("OpenSession.config_json must be a JSON object")
            session = self.sessions.open(request.kind, config)
            reply = pb.SessionInfo(
                session_id=session.session_id,
                kind=session.kind,
                info_json=json.dumps(self._info(session)),
                tables={name: codec.table_to_ipc(t) for name, t in session.source.tables().items()},
            )
            return [flight.Result(pa.py_buffer(reply.SerializeToString()))]
        except CellfeedError as exc:
            log.info("%s refused: %s", action.type, exc)
            raise _client_error(exc) from None
        except flight.FlightError:
            raise
        except Exception as exc:
            raise _server_failure(f"DoAction({action.type})", exc) from None

    def _info(self, session) -> dict:
        """The source's facts, and `file_versions`: each file the session reads (relative to the
        data root) with its [size, mtime_ns], so that a client whose replicas give one config two
        ids can name the file that differs."""
        info = dict(session.source.info())
        root = self.sessions.ctx.data_root
        info["file_versions"] = {str(root.relative(p)): list(v) if v is not None else None for p, v in session.files.items()}
        return info

    def _probe(self, body: bytes) -> bool:
        try:
            probe = json.loads(body)
            return self.pools.probe(str(probe["name"]), bytes.fromhex(probe["content"]))
        except (ValueError, KeyError, TypeError):
            raise CellfeedError("shm_probe: the body must be JSON {\"name\": ..., \"content\": hex}") from None

    def get_flight_info(self, context, descriptor):
        try:
            if descriptor.descriptor_type != flight.DescriptorType.CMD:
                raise CellfeedError("GetFlightInfo takes a command descriptor holding a cellfeed.v1.StreamRequest, not a path descriptor")
            request = _parse(pb.StreamRequest, descriptor.command, "StreamRequest")
            _check_stream("StreamRequest", request.rank, request.world_size, request.stream_count)
            source = self.sessions.get(request.session_id).source
            world, count = request.world_size, request.stream_count
            num_batches = source.num_batches(request.split, world)
            _check_first_batch("StreamRequest", request.first_batch, num_batches, request.split)
            locations = _request_locations(request.locations) or [self.advertised]
            endpoints = [
                flight.FlightEndpoint(ticket.SerializeToString(), tickets.endpoint_locations(locations, request.rank, index, count))
                for index, ticket in enumerate(tickets.tickets(request))
            ]
            plan = pb.Plan(num_batches=num_batches, batch_size=source.batch_size(request.split))
            return flight.FlightInfo(
                source.schema(request.split),
                descriptor,
                endpoints,
                total_records=-1,
                total_bytes=-1,
                ordered=True,
                app_metadata=plan.SerializeToString(),
            )
        except CellfeedError as exc:
            raise _client_error(exc) from None
        except flight.FlightError:
            raise
        except Exception as exc:
            raise _server_failure("GetFlightInfo", exc) from None

    def do_get(self, context, ticket):
        try:
            t = _parse(pb.Ticket, ticket.ticket, "ticket")
            _check_stream("malformed ticket", t.rank, t.world_size, t.stream_count, t.stream_index)
            session = self.sessions.get(t.session_id)
            source = session.source
            schema = source.schema(t.split)
            total = source.num_batches(t.split, t.world_size)
            _check_first_batch("ticket", t.first_batch, total, t.split)
            pool = None
            if t.shm_pool and any(shm.moves_to_shm(f) for f in schema):
                pool = self.pools.acquire(t.shm_pool)
                schema = shm.ref_schema(schema)
        except CellfeedError as exc:
            raise _client_error(exc) from None
        except flight.FlightError:
            raise
        except Exception as exc:
            raise _server_failure("DoGet", exc) from None
        first = tickets.stream_start(t.first_batch, t.stream_index, t.stream_count)
        progress = self.sessions.start_stream(
            StreamProgress(
                session_id=t.session_id,
                split=t.split,
                epoch=t.epoch,
                rank=t.rank,
                world_size=t.world_size,
                stream_index=t.stream_index,
                stream_count=t.stream_count,
                first_batch=t.first_batch,
                total_batches=len(tickets.stream_batches(t.first_batch, t.stream_index, t.stream_count, total)),
                peer=context.peer(),
            )
        )

        def ended() -> bool:
            """The client went away, or the server is shutting down."""
            return context.is_cancelled() or self.closing.is_set()

        log.info(
            "stream started: %s, session %s (%s), split %r epoch %d, rank %d/%d, stream %d/%d from batch %d, %s",
            progress.peer, t.session_id, session.kind, t.split, t.epoch, t.rank, t.world_size, t.stream_index, t.stream_count,
            t.first_batch, "shared memory" if pool is not None else "gRPC",
        )
        progress.kind, progress.transport = session.kind, "shm" if pool is not None else "grpc"
        if pool is None:
            batches = self._over_grpc(self._batches(source, t, first, total, progress, ended, lambda: HEAP))
        else:
            taken: dict = {}  # slot -> generation this stream wrote: given up if the stream breaks
            built = self._batches(source, t, first, total, progress, ended, lambda: SlotBuffers(pool, ended, taken))
            batches = self._in_slots(built, schema, pool, taken, ended)
        return flight.GeneratorStream(schema, self._delivered(batches, schema))

    @staticmethod
    def _delivered(batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> Iterator[flight.FlightDataStream]:
        """The batches as one RecordBatchStream (so dictionary batches precede the first record
        batch), then the error that ended them, raised here: an error raised through the C++
        RecordBatchReader loses its extra_info (the kind), one raised by the GeneratorStream keeps it."""
        failure: list[flight.FlightError] = []

        def caught() -> Iterator[pa.RecordBatch]:
            try:
                yield from batches
            except flight.FlightError as exc:
                failure.append(exc)
            except Exception as exc:
                failure.append(_server_failure("DoGet", exc))

        inner = caught()
        try:
            yield flight.RecordBatchStream(pa.RecordBatchReader.from_batches(schema, inner))
        finally:
            inner.close()  # a client that cancels closes this generator: the batches' finally runs now
        if failure:
            raise failure[0]

    @staticmethod
    def _over_grpc(built: Iterator[tuple[pa.RecordBatch, Buffers]]) -> Iterator[pa.RecordBatch]:
        """The batches as built, for the gRPC byte stream."""
        try:
            for batch, _ in built:
                yield batch
        finally:
            built.close()

    def _in_slots(self, built: Iterator[tuple[pa.RecordBatch, SlotBuffers]], schema: pa.Schema, pool: SlotPool, taken: dict, ended) -> Iterator[pa.RecordBatch]:
        """Each batch with its large columns as references to the slots they were written in
        (or copied into, when the source wrote them elsewhere)."""
        finished = False
        try:
            for batch, buffers in built:
                yield to_refs(batch, schema, buffers)
            finished = True
        except SlotsUnavailable as exc:
            if ended():
                return
            raise _client_error(exc) from None
        except flight.FlightError:
            raise
        except Exception as exc:
            raise _server_failure("writing a batch into shared-memory slots", exc) from None
        finally:
            built.close()
            if not finished or ended():
                pool.give_up(taken)
            self.pools.release(pool)

    def _batches(
        self, source, t, first: int, total: int, progress: StreamProgress, ended, buffers: Callable[[], Buffers]
    ) -> Iterator[tuple[pa.RecordBatch, Buffers]]:
        """The stream's batches of its epoch from `first`, each with the buffers (`buffers()`, one
        set per batch) its large columns were written in; with `continue_epochs`, then those of
        each following epoch, from the stream's first, until the client cancels."""
        epoch, index = t.epoch, first
        try:
            while True:
                for index in range(first, total, t.stream_count):
                    if ended():
                        progress.state = "cancelled"
                        return
                    t0 = time.perf_counter()
                    into = buffers()
                    batch = source.batch(t.split, epoch, t.rank, t.world_size, index, buffers=into)
                    self.metrics.served(progress.kind, progress.transport, batch.nbytes, time.perf_counter() - t0)
                    yield batch, into
                    progress.sent += 1
                    progress.updated_at = time.time()
                if not t.continue_epochs or t.stream_index >= total:
                    break
                epoch, first = tickets.roll_over(epoch, t.stream_index)
                progress.epoch, progress.sent, progress.total_batches = epoch, 0, len(range(first, total, t.stream_count))
            progress.state = "done"
        except CellfeedError as exc:
            if isinstance(exc, SlotsUnavailable) and ended():
                # the slot wait ended because the client left or the server is stopping: no
                # refusal (a client told shm_unavailable would stream over gRPC for good)
                progress.state = "cancelled"
                return
            progress.state, progress.error = "failed", str(exc)
            raise _client_error(exc) from None
        except Exception as exc:
            progress.state, progress.error = "failed", repr(exc)
            raise _server_failure(
                f"building batch {index} of split {t.split!r} (epoch {epoch}, rank {t.rank}/{t.world_size}) of session {t.session_id}", exc
            ) from None
        finally:
            if progress.state == "streaming":
                progress.state = "closed"
            self.metrics.streams_ended.labels(progress.kind, progress.state).inc()
            log.info(
                "stream ended (%s): %s, session %s, split %r, rank %d/%d, stream %d/%d, at epoch %d after %d batches of it, %.1f s",
                progress.state, progress.peer, t.session_id, t.split, t.rank, t.world_size, t.stream_index, t.stream_count,
                progress.epoch, progress.sent, time.time() - progress.started_at,
            )
