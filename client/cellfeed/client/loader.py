"""RemoteLoader: a resumable, prefetching iterable of one split's batches from a cellfeed server.

It behaves like a DataLoader to Lightning: exact `len`, `sampler.set_epoch`, `state_dict()` /
`load_state_dict()` for mid-epoch resume. `num_streams` DoGet streams are read in background
threads (stream i carries batches k with k % num_streams == i); batches come out in order, so
the sequence never depends on the number of streams. A stream that breaks, or gets no batch
within the connection's read timeout (a hung server), is reopened from the batch it owed, after
backoff (at once on another replica when the job has several: cellfeed.client.replicas), so
nothing is lost or repeated; past the retry budget the loop gets ServerUnavailable.
Refusals (cellfeed.wire.errors kinds) reach the loop at once.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from cellfeed.client import shm
from cellfeed.client.connection import TRANSIENT, Connection, Session, Stream
from cellfeed.client.errors import RequestError, ServerUnavailable
from cellfeed.client.pipeline.endpoints import Endpoints
from cellfeed.client.replicas import ReplicaSet
from cellfeed.client.shm import SlotReader, SlotsUnavailable
from cellfeed.wire.errors import ErrorKind, kind_of, message_of
from cellfeed.wire import tickets
from cellfeed.wire.malloc import reuse_freed_memory

STATE_VERSION = 1
UNCLAIMED_S = 30.0  # streams gone on into an epoch nobody asks for end after this long
MAX_REOPENS = 5  # a session the server forgets this often with no batch between is a refusal
log = logging.getLogger(__name__)


class RemoteLoader:
    """Batches of `split` for one rank, decoded by `decode` in the fetch threads."""

    def __init__(
        self,
        connection: Connection,
        session: Session,
        split: str,
        decode: Callable[[pa.RecordBatch], Any],
        *,
        rank: int = 0,
        world_size: int = 1,
        num_streams: int = 1,
        prefetch: int = 2,
        epoch: int = 0,
        fixed_epoch: bool = False,
        slots: SlotReader | None = None,
        replicas: ReplicaSet | None = None,
    ) -> None:
        self.connection = connection
        self.replicas = replicas if replicas is not None else ReplicaSet(connection)  # stream i reads at its endpoint's locations
        self.session = session
        self.split = split
        self.decode = decode
        self.rank = rank
        self.world_size = world_size
        self.num_streams = max(1, int(num_streams))
        self.prefetch = max(1, int(prefetch))
        self.fixed_epoch = fixed_epoch
        self._epoch = epoch
        self.slots = slots  # same host: large tensors come in shared-memory slots (None: over gRPC)
        self._slot_reader = slots  # what `slots` was given: tried again after a reconnect
        self._slots_off_at = 0  # the client generation whose streams could not use the slots
        self._probe_lock = threading.Lock()
        self._slot_key = secrets.token_hex(8)
        self._next = 0
        self._resume_from: int | None = None
        self._num_batches: int | None = None
        self._running: _Fetcher | None = None  # streams gone on into the next epoch
        self.endpoints = Endpoints(
            session, split, rank=rank, world_size=world_size, stream_count=self.num_streams,
            continue_epochs=self.continues, locations=self.replicas.uris,
        )  # every stream's ticket and replicas, from GetFlightInfo

    # -- what Lightning and torch expect of a loader ------------------------------------------
    @property
    def sampler(self) -> "RemoteLoader":
        """Lightning calls `dataloader.sampler.set_epoch(epoch)` before each epoch."""
        return self

    @property
    def batch_sampler(self) -> None:
        """Lightning reads this on evaluation loaders; batches are planned on the server, so none."""
        return None

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        if not self.fixed_epoch:
            self._epoch = int(epoch)

    def __len__(self) -> int:
        if self._num_batches is None:
            plan = self.replicas.plan(self.session, self.split, self._epoch, self.rank, self.world_size, self.num_streams, 0)
            self._num_batches = plan.num_batches
        return self._num_batches

    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands: resuming from it yields exactly the batches not yet yielded."""
        return {
            "version": STATE_VERSION,
            "session_id": self.session.session_id,
            "split": self.split,
            "epoch": self._epoch,
            "next_batch": self._next,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = {"session_id": self.session.session_id, "split": self.split, "world_size": self.world_size}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(
                    f"cannot resume: the saved state has {key}={state.get(key)!r}, this loader has {value!r} "
                    "(resuming needs the same config, split and world size)"
                )
        self.close()
        self._epoch = int(state["epoch"])
        self._next = int(state["next_batch"])
        self._resume_from = self._next

    def __iter__(self) -> Iterator[Any]:
        reuse_freed_memory()
        epoch = self._epoch
        start, self._resume_from = (self._resume_from or 0), None
        total = len(self)
        self._next = start
        fetcher, self._running = self._running, None
        if fetcher is not None and (fetcher.next != (epoch, start) or not fetcher.take_up()):
            fetcher.close()
            fetcher = None
        if fetcher is None:
            fetcher = _Fetcher(self, epoch, start, total)
        finished = False
        try:
            for k in range(start, total):
                batch = fetcher.get(epoch, k)
                self._next = k + 1
                yield batch
            finished = True
        finally:
            if finished and self.continues:
                # a training loader's streams go on into the next epoch; the loop takes them up if
                # it asks for epoch + 1 from its start next (it almost always does)
                self._running = fetcher
                fetcher.expire_after(UNCLAIMED_S)
            else:
                fetcher.close()
        self._next = 0
        if not self.fixed_epoch:
            self._epoch = epoch + 1

    @property
    def continues(self) -> bool:
        """Whether its streams go on into the next epoch: training loaders, not fixed-epoch ones."""
        return not self.fixed_epoch

    def close(self) -> None:
        """End the streams still running into the next epoch (at the end of training)."""
        fetcher, self._running = self._running, None
        if fetcher is not None:
            fetcher.close()

    def slots_off(self, generation: int) -> None:
        """Stream over gRPC from now on: slots failed on a stream of client `generation`. They are
        tried again once the connection has reconnected (a restarted server offers them anew)."""
        with self._probe_lock:
            self.slots = None
            self._slots_off_at = max(self._slots_off_at, generation)

    def slots_for_stream(self) -> SlotReader | None:
        """The slots a new stream uses: after the connection reconnected since they failed, the
        server is probed again (one attempt; a transport failure raises, to be retried)."""
        if self.slots is not None or self._slot_reader is None:
            return self.slots
        generation = self.connection.generation
        if generation <= self._slots_off_at:
            return None
        with self._probe_lock:
            if self.slots is None and generation > self._slots_off_at:
                if shm.probe(self.connection, retry=False) is not None:
                    log.info("the server at %s offers shared-memory slots again", self.connection.location)
                    self.slots = self._slot_reader
                else:
                    self._slots_off_at = generation
            return self.slots

    def shm_pool(self, shared_memory: bool) -> str:
        """The slot-pool key prefix a stream asks for (the server appends the stream's index); "": gRPC."""
        return self._slot_key if shared_memory else ""


class _Fetcher:
    """The background threads of one pass: one per stream, each with a bounded queue of
    ((epoch, batch), item). A training loader's pass goes on into the following epochs."""

    def __init__(self, loader: RemoteLoader, epoch: int, start: int, total: int) -> None:
        self.loader = loader
        self.total = total
        self.next = (epoch, start)  # what the consumer takes next
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._expiry: threading.Timer | None = None
        self.queues = [queue.Queue(maxsize=loader.prefetch) for _ in range(loader.num_streams)]
        self.readers: dict[int, Stream] = {}
        self.threads = []
        loader.endpoints.anchor(epoch, start)
        for i in range(loader.num_streams):
            first = tickets.stream_start(start, i, loader.num_streams)
            if first < total:
                thread = threading.Thread(target=self._run, args=(i, epoch, first), name=f"cellfeed-stream-{i}", daemon=True)
                thread.start()
                self.threads.append(thread)

    def get(self, epoch: int, k: int) -> Any:
        q = self.queues[tickets.stream_of(k, self.loader.num_streams)]
        while True:
            try:
                at, item = q.get(timeout=1.0)
                break
            except queue.Empty:
                if self.stop.is_set():
                    raise RuntimeError("the loader was closed")
        if isinstance(item, BaseException):
            raise item
        assert at == (epoch, k), f"stream delivered batch {at[1]} of epoch {at[0]}, expected {k} of {epoch}"
        self.next = (epoch, k + 1) if k + 1 < self.total else (epoch + 1, 0)
        return item

    def expire_after(self, seconds: float) -> None:
        """Close unless taken up (`take_up`) within `seconds`: the loop may not ask for more."""
        with self._lock:
            self._expiry = threading.Timer(seconds, self._expire)
            self._expiry.daemon = True
            self._expiry.start()

    def take_up(self) -> bool:
        """Claim a pass kept running for the next epoch; False if it has expired meanwhile."""
        with self._lock:
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
            return not self.stop.is_set()

    def _expire(self) -> None:
        with self._lock:
            if self._expiry is None:  # taken up just now
                return
            self._expiry = None
            self.stop.set()
        self.close()

    def _put(self, i: int, item: tuple[tuple[int, int], Any]) -> bool:
        while not self.stop.is_set():
            try:
                self.queues[i].put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, i: int, epoch: int, k: int) -> None:
        """Stream i's batches from k on, into its queue. A transport failure (the server died,
        hung or restarted) reopens the stream from the batch it owed, after backoff, until the
        retry budget is spent; a refusal or a decode error goes to the consumer at once."""
        loader, replicas = self.loader, self.loader.replicas
        step = loader.num_streams
        last_ok = time.monotonic()
        delay = 0.1
        failed_pids: set[int] = set()  # server processes whose slots failed on this stream
        reopens = 0  # sessions reopened since the last batch came
        locations: list[str] = []  # endpoint i's replicas, in the order to try them
        while k < self.total and not self.stop.is_set():
            stream: Stream | None = None
            conn = replicas.first_up(locations or replicas.uris)  # the next location once this one failed
            generation = conn.generation
            moving = False
            slots: SlotReader | None = None
            try:
                replicas.ensure_session(conn, loader.session)  # on each replica once (lazily)
                slots = loader.slots_for_stream()  # this stream's choice, whatever other streams decide meanwhile
                endpoint = loader.endpoints.endpoint(conn, epoch, i, k, loader.shm_pool(slots is not None))
                locations = [location.uri.decode() for location in endpoint.locations]
                conn = replicas.first_up(locations)
                generation = conn.generation
                replicas.ensure_session(conn, loader.session)
                stream = conn.open_stream(endpoint.ticket.ticket)
                generation = stream.generation
                self.readers[i] = stream
                stream_opened = time.monotonic()
                if self.stop.is_set():  # closed while the stream opened: close() may have missed it
                    return
                while (data := stream.read()) is not None:
                    if slots is not None:
                        data = slots.resolve(data)
                    batch = loader.decode(data)
                    if not self._put(i, ((epoch, k), batch)):
                        return
                    k += step
                    if last_ok < stream_opened:
                        replicas.succeeded(conn)
                    last_ok, delay, reopens = time.monotonic(), 0.1, 0
                    if k >= self.total and loader.continues:  # the server goes on likewise
                        epoch, k = tickets.roll_over(epoch, i)
                        if replicas.first_up(locations) is not conn:  # a replica came back: rebalance at the epoch's start
                            moving = True
                            break
                if k < self.total and not self.stop.is_set() and not moving:
                    raise flight.FlightUnavailableError("stream ended early")
            except SlotsUnavailable as exc:
                if self.stop.is_set():  # a closed pass: its server-side batches were given up
                    return
                # A server removes its slot files when it exits, so batches still in flight from
                # a server that restarted name slots that are gone; the restarted process makes
                # new ones (and gRPC's channel reconnects without the client seeing it fail). So
                # the first failure of a server process's slots gets one more stream with slots;
                # a second means they cannot be read here: gRPC, then.
                pid = exc.server_pid
                if pid is not None and pid not in failed_pids:
                    failed_pids.add(pid)
                    continue
                log.warning("cannot use the server's shared-memory slots (%s); streaming batches over gRPC instead", exc)
                loader.slots_off(generation)
            except Exception as exc:  # noqa: BLE001 - sorted by kind below
                if self.stop.is_set():
                    return
                what = kind_of(exc)
                if what is ErrorKind.NOT_FOUND and reopens < MAX_REOPENS:  # the server restarted, or closed it when idle
                    try:
                        if reopens:  # again with no batch between: wait a little first
                            self.stop.wait(delay)
                            delay = min(delay * 2, 5.0)
                        if len(replicas) > 1:
                            replicas.ensure_session(conn, loader.session, reopen=True)
                        else:
                            conn.reopen(loader.session)
                        reopens += 1
                        continue
                    except (ServerUnavailable, RequestError) as exc2:
                        self._put(i, ((epoch, k), exc2))
                        return
                    except TRANSIENT:  # the replica went away meanwhile: another one, or backoff
                        exc = flight.FlightUnavailableError(f"reopening the session on {conn.location} failed")
                if what is ErrorKind.SHM_UNAVAILABLE and slots is not None:
                    log.warning("shared memory unavailable (%s); streaming batches over gRPC instead", message_of(exc))
                    loader.slots_off(generation)
                    continue
                refusal = conn.refusal(exc) if isinstance(exc, flight.FlightError) else None
                if refusal is not None:
                    self._put(i, ((epoch, k), refusal))
                    return
                if not isinstance(exc, TRANSIENT + (OSError,)):
                    self._put(i, ((epoch, k), exc))  # a decode error must reach the training loop
                    return
                replicas.failed(conn)
                if not self._backoff(last_ok, conn.retry_seconds, delay, exc, i, epoch, k, generation, conn):
                    return
                delay = min(delay * 2, 5.0)
            finally:
                self.readers.pop(i, None)
                if stream is not None:
                    stream.close()

    def _backoff(
        self, last_ok: float, budget: float, delay: float, exc: Exception, i: int, epoch: int, k: int, generation: int, conn: Connection
    ) -> bool:
        """Sleep before a retry (none when another replica is up: fail over at once); past the
        budget, hand a clear error to the consumer instead."""
        replicas = self.loader.replicas
        if time.monotonic() - last_ok > budget:
            where = conn.location if len(replicas) == 1 else f"replicas {replicas.locations}"
            error = ServerUnavailable(
                f"cellfeed server at {where} failed for {budget:.0f} s while streaming "
                f"batch {k} of {self.loader.split!r} (epoch {epoch}): {message_of(exc)}"
            )
            self._put(i, ((epoch, k), error))
            return False
        conn.reset(generation)
        return not self.stop.wait(0.0 if replicas.others_up(conn) else delay)

    def close(self) -> None:
        with self._lock:
            self.stop.set()
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
        for stream in list(self.readers.values()):
            stream.cancel()  # a read in progress ends; its thread closes the stream
        for thread in self.threads:
            thread.join(timeout=5)
