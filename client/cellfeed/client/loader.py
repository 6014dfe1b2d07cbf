"""RemoteLoader: a resumable, prefetching iterable of one split's batches from a cellfeed server.

It behaves like a DataLoader to Lightning: exact `len`, `sampler.set_epoch`, `state_dict()` /
`load_state_dict()` for mid-epoch resume. Its batches come through the client pipeline
(cellfeed.client.pipeline): `num_streams` DoGet streams (stream i carries batches k with
k % num_streams == i), each read, decoded and prefetched in its own thread, merged in order, so
the sequence never depends on the number of streams. A stream that breaks, or gets no batch
within the connection's read timeout (a hung server), is reopened from the batch it owed (on its
endpoint's next replica when the job has several: cellfeed.client.replicas), so nothing is lost
or repeated; past the retry budget the loop gets ServerUnavailable. Refusals (cellfeed.wire.errors
kinds) reach the loop at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from cellfeed.client.connection import Connection, Session
from cellfeed.client.pipeline.decode import Decode
from cellfeed.client.pipeline.endpoints import Endpoints
from cellfeed.client.pipeline.merge import Cursor, OrderedMerge
from cellfeed.client.pipeline.prefetch import Prefetch
from cellfeed.client.pipeline.reader import StreamReader
from cellfeed.client.replicas import ReplicaSet
from cellfeed.client.shm import SlotReader, SlotUse
from cellfeed.wire.malloc import reuse_freed_memory

STATE_VERSION = 1
UNCLAIMED_S = 30.0  # streams gone on into an epoch nobody asks for end after this long


class RemoteLoader:
    """Batches of `split` for one rank, decoded by `decode` in the streams' threads."""

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
        self.cursor = Cursor(int(epoch), 0)  # where the loader stands: the one resume cursor
        self._resume = False  # load_state_dict asked the next pass to start at the cursor
        self.slot_use = SlotUse(connection, slots)  # same host: large tensors in shared-memory slots
        self._num_batches: int | None = None
        self._kept: OrderedMerge | None = None  # a training pass's streams, gone on into the next epoch
        self._kept_timer: threading.Timer | None = None
        self._kept_lock = threading.Lock()
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
        return self.cursor.epoch

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass reads (a fixed-epoch loader keeps its own)."""
        if self.fixed_epoch or int(epoch) == self.cursor.epoch:
            return
        self.close()  # streams gone on into another epoch are of no use
        self.cursor.move(int(epoch), self.cursor.next_batch)

    def __len__(self) -> int:
        if self._num_batches is None:
            plan = self.replicas.plan(self.session, self.split, self.cursor.epoch, self.rank, self.world_size, self.num_streams, 0)
            self._num_batches = plan.num_batches
        return self._num_batches

    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands: resuming from it yields exactly the batches not yet yielded."""
        return {
            "version": STATE_VERSION,
            "session_id": self.session.session_id,
            "split": self.split,
            **self.cursor.state(),
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
        self.cursor.move(int(state["epoch"]), int(state["next_batch"]))
        self._resume = True

    def __iter__(self) -> Iterator[Any]:
        reuse_freed_memory()
        total = len(self)
        if not self._resume:
            self.cursor.move(self.cursor.epoch, 0)  # a new pass starts at its epoch's start
        self._resume = False
        epoch, start = self.cursor.epoch, self.cursor.next_batch
        if start >= total:  # resumed at the epoch's end: nothing is left of it
            self.close()
            self.cursor.move(epoch + 1 if self.continues else epoch, 0)
            return
        pipeline = self._take_up()  # a training pass kept going stands at (epoch, 0) already
        if pipeline is None:
            pipeline = self._pipeline(total)
            self.endpoints.anchor(epoch, start)  # the streams share this FlightInfo
            pipeline.reset(self.cursor.state())
        finished = False
        try:
            for _ in range(start, total):
                yield pipeline.next()
            finished = True
        finally:
            if finished and self.continues:
                # a training loader's streams go on into the next epoch; the loop takes them up if
                # it asks for epoch + 1 from its start next (it almost always does)
                self._keep(pipeline)
            else:
                pipeline.close()
        if not self.continues:
            self.cursor.move(epoch, 0)

    def _pipeline(self, total: int) -> OrderedMerge:
        """One pass's stages: per stream, read -> decode -> prefetch; then the ordered merge."""
        streams = [
            Prefetch(Decode(StreamReader(self, i, total), self.decode, self), self.prefetch, name=f"cellfeed-stream-{i}")
            for i in range(self.num_streams)
        ]
        return OrderedMerge(streams, total, self.cursor, continues=self.continues)

    @property
    def continues(self) -> bool:
        """Whether its streams go on into the next epoch: training loaders, not fixed-epoch ones."""
        return not self.fixed_epoch

    def close(self) -> None:
        """End the streams still running into the next epoch (at the end of training)."""
        pipeline = self._take_up()
        if pipeline is not None:
            pipeline.close()

    # -- a finished training pass, kept for the next epoch --------------------------------------
    def _keep(self, pipeline: OrderedMerge) -> None:
        """Keep `pipeline` for the next pass; closed unless taken up within UNCLAIMED_S."""
        timer = threading.Timer(UNCLAIMED_S, self._expire, args=(pipeline,))
        timer.daemon = True
        with self._kept_lock:
            self._kept, self._kept_timer = pipeline, timer
        timer.start()

    def _take_up(self) -> OrderedMerge | None:
        """The kept pipeline (None if there is none, or it expired)."""
        with self._kept_lock:
            pipeline, self._kept = self._kept, None
            timer, self._kept_timer = self._kept_timer, None
        if timer is not None:
            timer.cancel()
        return pipeline

    def _expire(self, pipeline: OrderedMerge) -> None:
        with self._kept_lock:
            if self._kept is not pipeline:  # taken up just now
                return
            self._kept, self._kept_timer = None, None
        pipeline.close()

    @property
    def slots(self) -> SlotReader | None:
        """The shared-memory slots new streams read (None: gRPC)."""
        return self.slot_use.current
