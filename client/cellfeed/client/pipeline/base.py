"""The protocol every stage of the client pipeline follows, shaped like torchdata.nodes' BaseNode.

A stage yields items with `next()` (StopIteration at its end), says where it stands with
`get_state()` (a small dict: resetting to it yields exactly the items not yet taken), goes back
to a state (or its start) with `reset(state)`, and lets its streams and threads go on `close()`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, TypeVar

import pyarrow as pa

from cellfeed.client.shm import SlotReader

T_co = TypeVar("T_co", covariant=True)
State = dict[str, int]


class Node(Protocol[T_co]):
    """One stage: a resumable source of items."""

    def reset(self, state: State | None = None) -> None:
        """Start again from `state` (None: from the stage's start)."""

    def get_state(self) -> State:
        """Where the stage stands: `reset` to it yields exactly the items not yet taken."""

    def next(self) -> T_co:
        """The next item; StopIteration at the end."""

    def close(self) -> None:
        """End the stage's streams and threads (safe from any thread, more than once)."""


class Raw(NamedTuple):
    """A record batch as a stream delivered it: batch `batch` of `epoch`, with the slots its
    shared-memory refs name (None: over gRPC) and the client generation that read it."""

    epoch: int
    batch: int
    data: pa.RecordBatch
    slots: SlotReader | None
    generation: int


class Decoded(NamedTuple):
    """Batch `batch` of `epoch`, decoded into the kind's batch."""

    epoch: int
    batch: int
    value: Any


def position(state: State) -> tuple[int, int]:
    """(epoch, next_batch) of a stage's state."""
    return int(state["epoch"]), int(state["next_batch"])


def state_at(epoch: int, next_batch: int) -> State:
    return {"epoch": int(epoch), "next_batch": int(next_batch)}
