"""The tickets and replica locations of a loader's streams, as GetFlightInfo gives them.

The client builds no ticket: to open stream i from batch k it asks GetFlightInfo (first_batch,
shm_pool, continue_epochs, and its replicas as `locations`) and reads endpoint i. A FlightInfo for
first batch F serves every stream i whose first batch from F is the one it owes, so the
FlightInfo of a pass's start is asked once and serves all its streams.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import pyarrow.flight as flight

from cellfeed.client.connection import Connection, Session
from cellfeed.client.errors import ServerError
from cellfeed.wire import cellfeed_pb2 as pb
from cellfeed.wire import tickets

MAX_CACHED = 8  # FlightInfos kept: a pass's start, the epoch roll-over, a few reopens
Key = tuple[int, int, str]  # (epoch, first_batch, shm_pool)


class Endpoints:
    """GetFlightInfo's endpoints for one rank's streams of one split; thread-safe."""

    def __init__(
        self,
        session: Session,
        split: str,
        *,
        rank: int,
        world_size: int,
        stream_count: int,
        continue_epochs: bool,
        locations: Sequence[str],
    ) -> None:
        self.session = session
        self.split = split
        self.rank, self.world_size, self.stream_count = rank, world_size, stream_count
        self.continue_epochs = continue_epochs
        self.locations = list(locations)
        self._infos: OrderedDict[Key, flight.FlightInfo] = OrderedDict()
        self._asking: dict[Key, threading.Lock] = {}
        self._lock = threading.Lock()
        self._anchor: tuple[int, int] = (0, 0)

    def anchor(self, epoch: int, first_batch: int) -> None:
        """A pass starts at (epoch, first_batch): its streams share that FlightInfo."""
        with self._lock:
            self._anchor = (epoch, first_batch)

    def request(self, epoch: int, first_batch: int, shm_pool: str) -> pb.StreamRequest:
        return pb.StreamRequest(
            session_id=self.session.session_id,
            split=self.split,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            stream_count=self.stream_count,
            first_batch=first_batch,
            shm_pool=shm_pool,
            continue_epochs=self.continue_epochs,
            locations=self.locations,
        )

    def endpoint(
        self, connection: Connection, epoch: int, stream_index: int, batch: int, shm_pool: str, *, shared: bool = True
    ) -> flight.FlightEndpoint:
        """Endpoint `stream_index` of a FlightInfo whose stream starts at `batch` of `epoch`:
        cached, else asked of `connection` (one attempt; a failure raises as Flight raised it).
        `shared`: one the other streams use may serve (a pass's start); else first_batch = batch
        (a stream resuming after a failure asks for its own resume point)."""
        first = self._first_batch(epoch, stream_index, batch, shm_pool) if shared else batch
        key = (epoch, first, shm_pool)
        with self._lock:
            info = self._infos.get(key)
            asking = self._asking.setdefault(key, threading.Lock())
        if info is None:
            with asking:  # streams opening together make one call
                with self._lock:
                    info = self._infos.get(key)
                if info is None:
                    info = connection.flight_info_once(self.request(epoch, key[1], shm_pool))
                    with self._lock:
                        self._infos[key] = info
                        while len(self._infos) > MAX_CACHED:
                            old, _ = self._infos.popitem(last=False)
                            self._asking.pop(old, None)
        with self._lock:
            if key in self._infos:
                self._infos.move_to_end(key)
        endpoints = info.endpoints
        if len(endpoints) != self.stream_count:
            raise ServerError(
                f"GetFlightInfo({self.split!r}) from {connection.location} gave {len(endpoints)} endpoints for {self.stream_count} streams"
            )
        return endpoints[stream_index]

    def _first_batch(self, epoch: int, stream_index: int, batch: int, shm_pool: str) -> int:
        """The first_batch to ask for: one already asked (the pass's start, the epoch's start)
        whose stream `stream_index` starts at `batch`, else `batch` itself."""
        n = self.stream_count
        with self._lock:
            cached = [f for (e, f, pool) in self._infos if e == epoch and pool == shm_pool]
            anchor_epoch, anchor_first = self._anchor
        candidates = [*cached, *([anchor_first] if anchor_epoch == epoch else []), 0]
        return next((f for f in candidates if tickets.stream_start(f, stream_index, n) == batch), batch)
