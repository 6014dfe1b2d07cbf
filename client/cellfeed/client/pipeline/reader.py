"""Stage: one DoGet stream of one stream index, resumed from the batch it owes whatever fails.

Stream i carries batches i, i + n, ... of each epoch (cellfeed.wire.tickets). It opens through
its endpoint of GetFlightInfo (the ticket, and the replicas to read it from), at the endpoint's
first location that is up; a transport failure (a dead, hung or restarted server) marks that
replica failed and reopens from the batch owed, at the next location, under the client's retry
policy; a session the server forgot is reopened (at most MAX_REOPENS times with no batch
between); a server that cannot make shared-memory slots sends the rest over gRPC. A training
loader's stream goes on into the next epoch, moving back to a replica that came back.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import pyarrow.flight as flight

from cellfeed.client.connection import TRANSIENT, Connection, Stream
from cellfeed.client.errors import RequestError, ServerUnavailable
from cellfeed.client.pipeline import retry
from cellfeed.client.pipeline.base import Raw, State, position, state_at
from cellfeed.client.shm import SlotReader
from cellfeed.wire import tickets
from cellfeed.wire.errors import ErrorKind, kind_of, message_of

if TYPE_CHECKING:
    from cellfeed.client.loader import RemoteLoader

MAX_REOPENS = 5  # a session the server forgets this often with no batch between is a refusal


class StreamReader:
    """Node[Raw] of stream `index` of `loader`'s streams; its state is the batch it owes next."""

    def __init__(self, loader: "RemoteLoader", index: int, total: int) -> None:
        self.loader = loader
        self.index = index
        self.total = total
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards _stream against close() from another thread
        self._busy = False  # a next() is under way: only its thread may close the stream
        self._idle = threading.Condition(self._lock)
        self._epoch, self._batch = 0, index
        self._done = False
        self._stream: Stream | None = None
        self._conn: Connection | None = None
        self._generation = 0
        self._slots: SlotReader | None = None
        self._locations: list[str] = []  # the endpoint's replicas, in the order to try them
        self._opened = 0.0
        self._last_batch = 0.0
        self._reopen_on: Connection | None = None  # said it does not know the session
        self._reopens = 0
        self._resuming = False  # reopening after a failure: GetFlightInfo from the batch owed

    # -- the protocol --------------------------------------------------------------------------
    def reset(self, state: State | None = None) -> None:
        """Owe batch `next_batch` of `epoch` (one of this stream's); the open stream is closed."""
        epoch, batch = position(state) if state is not None else (self._epoch, self.index)
        with self._lock:
            while self._busy:  # a thread told to stop ends its call first (bounded by the deadlines)
                self._idle.wait()
            stream, self._stream = self._stream, None
            self._stop.clear()
        if stream is not None:
            stream.close()
        self._epoch, self._batch, self._done = self._normalized(epoch, batch)
        self._reopens, self._reopen_on, self._resuming = 0, None, False

    def get_state(self) -> State:
        return state_at(self._epoch, self._batch)

    def next(self) -> Raw:
        with self._lock:
            self._busy = True
        try:
            if self._stop.is_set():
                raise retry.Closed()
            if self._done:
                self._finish()
                raise StopIteration
            conn = self._conn or self.loader.replicas.primary
            return retry.call(self._attempt, budget_s=lambda: (self._conn or conn).retry_seconds, give_up=self._give_up, stop=self._stop)
        except BaseException:
            self._close_stream()
            raise
        finally:
            with self._lock:
                self._busy = False
                self._idle.notify_all()
            if self._stop.is_set():
                self._close_stream()

    def close(self) -> None:
        """Stop: a read under way is cancelled (its thread then closes the stream)."""
        self._stop.set()
        with self._lock:
            stream, busy = self._stream, self._busy
            if stream is not None and not busy:
                self._stream = None
        if stream is not None:
            stream.cancel() if busy else stream.close()

    # -- reading -------------------------------------------------------------------------------
    def _normalized(self, epoch: int, batch: int) -> tuple[int, int, bool]:
        """(epoch, batch, done) for a stream owing `batch`: past its epoch's end, a training
        stream goes on into the next epoch; any other is done."""
        if batch < self.total:
            return epoch, batch, False
        if self.loader.continues and self.index < self.total:
            return (*tickets.roll_over(epoch, self.index), False)
        return epoch, batch, True

    def _attempt(self) -> Raw:
        """One try at the batch owed: open the stream if none is, read one batch."""
        if self._stop.is_set():
            raise retry.Closed()
        try:
            if self._stream is None:
                self._open()
            assert self._stream is not None
            data = self._stream.read()
            if data is None:
                raise flight.FlightUnavailableError(f"stream {self.index} ended before batch {self._batch}")
        except retry.Closed:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted by kind in _sorted
            self._close_stream()
            raise self._sorted(exc) from None
        raw = Raw(self._epoch, self._batch, data, self._slots, self._generation)
        self._delivered()
        return raw

    def _open(self) -> None:
        """Open the stream owing (epoch, batch): its endpoint's ticket from GetFlightInfo (cached
        for a pass's start), at the first location of the endpoint whose replica is up."""
        loader, replicas = self.loader, self.loader.replicas
        reopened, self._reopen_on = self._reopen_on, None  # the replica that said it does not know the session
        if reopened is not None:
            self._conn, self._generation = reopened, reopened.generation
            if len(replicas) > 1:
                replicas.ensure_session(reopened, loader.session, reopen=True)
            else:
                reopened.reopen(loader.session)
        slots = loader.slot_use.for_stream()  # this stream's choice, whatever other streams decide meanwhile
        asked = replicas.first_up(self._locations or replicas.uris)
        self._conn, self._generation = asked, asked.generation
        if asked is not reopened:
            replicas.ensure_session(asked, loader.session)  # on each replica once (lazily)
        pool = loader.slot_use.pool(slots is not None)
        endpoint = loader.endpoints.endpoint(asked, self._epoch, self.index, self._batch, pool, shared=not self._resuming)
        self._locations = [location.uri.decode() for location in endpoint.locations]
        conn = replicas.first_up(self._locations)
        self._conn, self._generation = conn, conn.generation
        if conn is not asked and conn is not reopened:  # the endpoint's first replica up is another one
            replicas.ensure_session(conn, loader.session)
        stream = conn.open_stream(endpoint.ticket.ticket)
        with self._lock:
            if self._stop.is_set():  # closed while it opened: close() could not see it
                closed = True
            else:
                closed, self._stream = False, stream
        if closed:
            stream.close()
            raise retry.Closed()
        self._generation, self._slots, self._opened = stream.generation, slots, time.monotonic()
        self._resuming = False

    def _delivered(self) -> None:
        """Batch owed delivered: owe the stream's next; at a training epoch's end, move back to
        a replica that came back (the endpoint's first location up) by reopening there."""
        if self._last_batch < self._opened and self._conn is not None:
            self.loader.replicas.succeeded(self._conn)
        self._last_batch, self._reopens = time.monotonic(), 0
        epoch, batch, done = self._normalized(self._epoch, self._batch + self.loader.num_streams)
        rolled = epoch != self._epoch
        self._epoch, self._batch, self._done = epoch, batch, done
        if rolled and self._conn is not None and self.loader.replicas.first_up(self._locations) is not self._conn:
            self._close_stream()

    def _finish(self) -> None:
        """The last batch is delivered: read the stream's end (the server ends it cleanly)."""
        stream = self._stream
        if stream is None:
            return
        try:
            stream.read()
        except Exception:  # noqa: BLE001 - its batches are all here; how it ended does not matter
            pass
        self._close_stream()

    def _close_stream(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    # -- failures ------------------------------------------------------------------------------
    def _sorted(self, exc: Exception) -> BaseException:
        """What to raise for a failed attempt: Retry (after what the retry needs), or the error
        that reaches the training loop at once (a refusal, a failure that retrying cannot mend)."""
        if self._stop.is_set():
            return retry.Closed()
        if isinstance(exc, (RequestError, ServerUnavailable)):
            return exc  # from reopening a session: a refusal, or its own budget spent
        loader, conn = self.loader, self._conn or self.loader.replicas.primary
        self._resuming = True
        what = kind_of(exc)
        if what is ErrorKind.NOT_FOUND and self._reopens < MAX_REOPENS:  # the server restarted, or closed it when idle
            self._reopens += 1
            self._reopen_on = conn
            return retry.Retry(exc, at_once=self._reopens == 1, budgeted=False)
        if what is ErrorKind.SHM_UNAVAILABLE and self._slots is not None:
            loader.slot_use.off(self._generation, message_of(exc))
            return retry.Retry(exc, at_once=True, budgeted=False)
        refusal = conn.refusal(exc) if isinstance(exc, flight.FlightError) else None
        if refusal is not None:
            return refusal
        if not isinstance(exc, TRANSIENT + (OSError,)):
            return exc
        loader.replicas.failed(conn)
        conn.reset(self._generation)
        return retry.Retry(exc, at_once=loader.replicas.others_up(conn))

    def _give_up(self, cause: BaseException, budget: float) -> ServerUnavailable:
        replicas = self.loader.replicas
        where = (self._conn or replicas.primary).location if len(replicas) == 1 else f"replicas {replicas.locations}"
        return ServerUnavailable(
            f"cellfeed server at {where} failed for {budget:.0f} s while streaming "
            f"batch {self._batch} of {self.loader.split!r} (epoch {self._epoch}): {message_of(cause)}"
        )
