"""Stage: a stream's raw record batches -> the kind's batches, shared-memory refs resolved first.

A server removes its slot files when it exits, so batches still in flight from a server that
restarted name slots that are gone (and gRPC's channel reconnects without the client seeing it
fail). So the first failure of a server process's slots reopens the stream, with slots, from the
batch whose slots failed; a second means they cannot be read here: the loader turns slots off
and the stream reopens over gRPC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from cellfeed.client.pipeline.base import Decoded, Node, Raw, State, state_at
from cellfeed.client.shm import SlotsUnavailable

if TYPE_CHECKING:
    from cellfeed.client.loader import RemoteLoader


class Decode:
    """Node[Decoded] over a Node[Raw]: decoded with `decode` in the thread that calls next()."""

    def __init__(self, source: Node[Raw], decode: Callable[[pa.RecordBatch], Any], loader: "RemoteLoader") -> None:
        self.source = source
        self.decode = decode
        self.loader = loader
        self._failed_pids: set[int] = set()  # server processes whose slots failed on this stream

    def reset(self, state: State | None = None) -> None:
        self.source.reset(state)

    def get_state(self) -> State:
        return self.source.get_state()

    def next(self) -> Decoded:
        while True:
            raw = self.source.next()
            data = raw.data
            if raw.slots is not None:
                try:
                    data = raw.slots.resolve(data)
                except SlotsUnavailable as exc:
                    self._slots_failed(exc, raw)
                    self.source.reset(state_at(raw.epoch, raw.batch))  # the batch again, as decided
                    continue
            return Decoded(raw.epoch, raw.batch, self.decode(data))

    def close(self) -> None:
        self.source.close()

    def _slots_failed(self, exc: SlotsUnavailable, raw: Raw) -> None:
        pid = exc.server_pid
        if pid is not None and pid not in self._failed_pids:
            self._failed_pids.add(pid)  # a restarted server's stale refs: once more with slots
            return
        self.loader.slot_use.off(raw.generation, f"cannot use the server's shared-memory slots ({exc})")
