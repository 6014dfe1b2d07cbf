"""Stage: a bounded queue of a source's items, filled by one background thread.

Each item is queued with the source's state after it, so `get_state()` is where the consumer
stands (not the thread, which runs ahead). An error the source raises is queued in order and
raised by `next()`; the thread then ends.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Generic, TypeVar

from cellfeed.client.pipeline.base import Node, State
from cellfeed.client.pipeline.retry import Closed

T = TypeVar("T")
_END = object()
JOIN_S = 5.0  # a thread stuck in a call past this is left to end on its own (it is told to stop)


class Prefetch(Generic[T]):
    """Node[T] reading `source` ahead into a queue of at most `size` items."""

    def __init__(self, source: Node[T], size: int, name: str) -> None:
        self.source = source
        self.size = max(1, int(size))
        self.name = name
        self._queue: queue.Queue[tuple[Any, State | None]] = queue.Queue(maxsize=self.size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state: State | None = None
        self._ended = False

    def reset(self, state: State | None = None) -> None:
        """Stop the thread, reset the source to `state`, and start reading ahead from there."""
        self._halt()
        self._stop = threading.Event()  # first: a thread that outlived _halt no longer owns the source
        self._queue = queue.Queue(maxsize=self.size)
        self.source.reset(state)
        self._state = self.source.get_state()
        self._ended = False
        self._start()

    def get_state(self) -> State:
        return dict(self._state) if self._state is not None else self.source.get_state()

    def next(self) -> T:
        if self._ended:
            raise StopIteration
        if self._thread is None:
            self._start()
        while True:
            try:
                item, state = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if self._stop.is_set():
                    raise RuntimeError("the loader was closed") from None
                if self._thread is not None and not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"{self.name} ended without its next batch") from None
        if item is _END:
            self._ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        self._state = state
        return item

    def close(self) -> None:
        self._halt()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, args=(self._queue, self._stop), name=self.name, daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        self.source.close()
        if thread is not None:
            thread.join(timeout=JOIN_S)

    def _run(self, out: "queue.Queue[tuple[Any, State | None]]", stop: threading.Event) -> None:
        """source.next() into `out` until the end, an error, or `stop`."""
        try:
            while not stop.is_set():
                try:
                    item: Any = self.source.next()
                    state: State | None = self.source.get_state()
                except StopIteration:
                    item, state = _END, None
                except Closed:
                    return
                except BaseException as exc:  # noqa: BLE001 - handed to the consumer, in order
                    item, state = exc, None
                if not _put(out, (item, state), stop) or item is _END or isinstance(item, BaseException):
                    return
        finally:
            if stop.is_set() and stop is self._stop:  # not reset meanwhile: the source is still ours
                self.source.close()  # from the reading thread: its stream is closed, not only cancelled


def _put(out: "queue.Queue[Any]", item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False
