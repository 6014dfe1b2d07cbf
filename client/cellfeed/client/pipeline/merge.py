"""Stage: the streams' batches merged in order (batch k from stream k % n), and the loader's cursor.

The Cursor is the one place that says where a loader stands, (epoch, next batch): the merge
advances it as batches are taken, and RemoteLoader's state_dict / load_state_dict save and
restore it. A training loader's merge goes on into the next epoch, as its streams do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cellfeed.client.pipeline.base import Decoded, Node, State, position, state_at
from cellfeed.wire import tickets


@dataclass
class Cursor:
    """The batch a loader yields next: `next_batch` of `epoch`."""

    epoch: int = 0
    next_batch: int = 0

    def state(self) -> State:
        return state_at(self.epoch, self.next_batch)

    def move(self, epoch: int, next_batch: int) -> None:
        self.epoch, self.next_batch = int(epoch), int(next_batch)


class OrderedMerge:
    """Node[Any] over one Node[Decoded] per stream: batches in order, whatever the stream count.
    `continues`: after an epoch's last batch, the next epoch's first; else the end."""

    def __init__(self, streams: Sequence[Node[Decoded]], total: int, cursor: Cursor, *, continues: bool) -> None:
        self.streams = list(streams)
        self.total = total
        self.cursor = cursor
        self.continues = continues

    def reset(self, state: State | None = None) -> None:
        """Every stream reset to the first of its batches at or after the cursor's."""
        if state is not None:
            self.cursor.move(*position(state))
        epoch, first = self.cursor.epoch, self.cursor.next_batch
        n = len(self.streams)
        for i, stream in enumerate(self.streams):
            stream.reset(state_at(epoch, tickets.stream_start(first, i, n)))

    def get_state(self) -> State:
        return self.cursor.state()

    def next(self) -> Any:
        epoch, k = self.cursor.epoch, self.cursor.next_batch
        if k >= self.total:
            raise StopIteration
        at = self.streams[tickets.stream_of(k, len(self.streams))].next()
        if (at.epoch, at.batch) != (epoch, k):
            raise RuntimeError(f"stream {tickets.stream_of(k, len(self.streams))} delivered batch {at.batch} of epoch {at.epoch}, expected {k} of {epoch}")
        if k + 1 < self.total or not self.continues:
            self.cursor.move(epoch, k + 1)
        else:
            self.cursor.move(epoch + 1, 0)
        return at.value

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
