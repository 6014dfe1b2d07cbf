"""The server side of shared-memory slots (see cellfeed.wire.shm): pools, moving columns, probes.

A pool belongs to one client stream key and outlives its streams, so slots (and the pages
behind them) are reused epoch after epoch: a fresh 80 MB file per batch would cost more in
page faults than the gRPC copies it saves. Pools idle for `IDLE_S` are removed with their files
by a sweeper thread, so memory held for a client that went away comes back.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from cellfeed.server.errors import CellfeedError
from cellfeed.server.kinds.base import Buffers, Columns
from cellfeed.wire import shm

log = logging.getLogger(__name__)

IDLE_S = 10.0  # a pool unused this long goes, files and all; remaking one costs a few page faults
AHEAD = 2  # slots written but not yet taken up by the client: the stream's read-ahead
POLL_S = (0.0005, 0.01)  # first and longest pause between looks at a slow client's slots
ALIGN = 64  # arrays sharing a slot start at multiples of this many bytes


class SlotsUnavailable(CellfeedError):
    """Shared-memory slots unavailable: none could be made (the folder is full, or there is none),
    so the stream is refused as `shm_unavailable` and the client falls back to gRPC; the client's
    own `cellfeed.client.shm.SlotsUnavailable` is the same condition seen from its side."""


class Slot:
    """One reusable file: a header and `capacity` data bytes, mapped once."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path = path
        self.name = path.name
        self.capacity = capacity
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # reserve the pages now: a full tmpfs then fails here, not with SIGBUS on a write
            os.posix_fallocate(fd, 0, shm.HEADER_BYTES + capacity)
            self.map = mmap.mmap(fd, shm.HEADER_BYTES + capacity)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.header = np.frombuffer(self.map, dtype=np.uint32, count=3)
        self.data = np.frombuffer(self.map, dtype=np.uint8, offset=shm.HEADER_BYTES)
        self.abandoned = 0  # a generation whose stream ended before the client took it

    @property
    def generation(self) -> int:
        return int(self.header[shm.GEN])

    def is_free(self) -> bool:
        g = self.header[shm.GEN]
        return self.header[shm.DONE] == g or (self.abandoned == g and self.header[shm.TAKEN] != g)

    def in_flight(self) -> bool:
        """Written, not yet taken up by the client, not given up."""
        g = self.header[shm.GEN]
        return self.header[shm.TAKEN] != g and self.abandoned != g and self.header[shm.DONE] != g

    def fill(self) -> None:
        """Start a new generation: the batch written next is a new one."""
        self.header[shm.GEN] = int(self.header[shm.GEN]) % 0xFFFFFFFF + 1


class SlotPool:
    """The slots of one client stream key; `array` hands out a free slot or makes one."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.slots: list[Slot] = []
        self.lock = threading.Lock()
        self.active = 0
        self.last_used = time.monotonic()

    def array(self, shape: tuple[int, ...], dtype: np.dtype, cancelled=lambda: False, taken: dict | None = None) -> np.ndarray:
        """A C-contiguous array in a slot that stays out of use until the client frees it
        (`taken`, the stream's own record, maps the slot to the generation written now).

        Waits while AHEAD slots are written but not yet taken up by the client, for as long as
        the stream lives: the same back-pressure the byte stream would give (a client may pause
        for a long validation), while slots the client holds do not count.
        """
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        return self.take(nbytes, cancelled, taken).data[:nbytes].view(dtype).reshape(shape)

    def take(self, nbytes: int, cancelled=lambda: False, taken: dict | None = None) -> Slot:
        """A slot of at least `nbytes` for the next batch (waiting as `array` says), recorded in `taken`."""
        slot = self._wait_free(nbytes, cancelled)
        if taken is not None:
            taken[slot] = slot.generation
        return slot

    def _wait_free(self, nbytes: int, cancelled) -> Slot:
        pause = POLL_S[0]
        while True:
            with self.lock:
                if sum(1 for s in self.slots if s.in_flight()) < AHEAD:
                    return self._take_free(nbytes)
            if cancelled():
                raise SlotsUnavailable("the stream ended while waiting for the client")
            time.sleep(pause)
            pause = min(pause * 1.5, POLL_S[1])

    def _take_free(self, nbytes: int) -> Slot:
        for slot in self.slots:
            if slot.capacity >= nbytes and slot.is_free():
                slot.fill()
                return slot
        # a name never used before: clients keep slots mapped by name
        path = self.directory / f"cellfeed-{os.getpid()}-{secrets.token_hex(8)}-{len(self.slots)}"
        try:
            slot = Slot(path, _capacity(nbytes))
        except OSError as exc:
            raise SlotsUnavailable(f"cannot make a {nbytes:,}-byte shared-memory slot in {self.directory}: {exc.strerror or exc}") from None
        slot.fill()
        self.slots.append(slot)
        return slot

    def give_up(self, taken: dict[Slot, int] | None = None) -> None:
        """Give up the batches the client has not taken: those one stream wrote (`taken`: slot ->
        generation; a slot since refilled by another stream is not its own any more), or all."""
        with self.lock:
            for slot, generation in taken.items() if taken is not None else ((s, s.generation) for s in self.slots):
                if slot.generation == generation and slot.in_flight():
                    slot.abandoned = generation

    def close(self) -> None:
        with self.lock:
            for slot in self.slots:
                slot.path.unlink(missing_ok=True)
            self.slots.clear()


def _capacity(nbytes: int) -> int:
    """A new slot's size: an eighth more than asked, in whole MiB, so that later batches a little
    larger than this one (CSR batches vary) reuse it rather than add slot after slot."""
    return -(-(nbytes + nbytes // 8) // (1 << 20)) * (1 << 20)


class SlotPools:
    """Every pool of this server, by client key; removes idle pools and their files."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._pools: dict[str, SlotPool] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if directory is not None:
            _remove_orphans(directory)
            threading.Thread(target=self._sweep, name="cellfeed-shm-sweeper", daemon=True).start()

    def _sweep(self) -> None:
        while not self._closed.wait(IDLE_S / 2):
            self._expire()

    def usage(self) -> tuple[int, int, int]:
        """(slots written and not yet freed by their client, slots, their bytes), for metrics."""
        with self._lock:
            pools = list(self._pools.values())
        in_use = total = nbytes = 0
        for pool in pools:
            with pool.lock:
                total += len(pool.slots)
                in_use += sum(1 for s in pool.slots if not s.is_free())
                nbytes += sum(s.capacity for s in pool.slots)
        return in_use, total, nbytes

    def acquire(self, key: str) -> SlotPool:
        if self.directory is None:
            raise SlotsUnavailable("this server has no shared-memory folder")
        if not all(c in "0123456789abcdef" for c in key) or not 8 <= len(key) <= 64:
            raise CellfeedError(f"malformed ticket: shm_pool {key!r} is not 8 to 64 hex digits")
        self._expire()
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = SlotPool(self.directory)
            pool.active += 1
            pool.last_used = time.monotonic()
        # the client reads one stream per key at a time: a new one means the last one is over
        pool.give_up()
        return pool

    def release(self, pool: SlotPool) -> None:
        with self._lock:
            pool.active -= 1
            pool.last_used = time.monotonic()

    def probe(self, name: str, content: bytes) -> bool:
        """Whether the client's probe file is visible here with its content: a shared folder."""
        if self.directory is None or not shm.PROBE_NAME.match(name):
            return False
        try:
            return (self.directory / name).read_bytes() == content
        except OSError:
            return False

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [k for k, p in self._pools.items() if p.active == 0 and now - p.last_used > IDLE_S]
            gone = [self._pools.pop(k) for k in idle]
        for pool in gone:
            pool.close()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


class SlotBuffers(Buffers):
    """One batch's buffers in a pool's slots: the arrays asked for together share one slot, and
    `placed` records where each column's values lie, so the batch travels as references to them."""

    def __init__(self, pool: SlotPool, cancelled=lambda: False, taken: dict | None = None) -> None:
        self.pool = pool
        self.cancelled = cancelled
        self.taken = taken
        self.placed: dict[str, tuple[Slot, int, int]] = {}  # column -> (slot, file offset of its values, their bytes)

    def arrays(self, wanted: dict[Columns, tuple[tuple[int, ...], np.dtype]]) -> dict[Columns, np.ndarray]:
        regions, at = [], 0
        for columns, (shape, dtype) in wanted.items():
            dtype = np.dtype(dtype)
            at = -(-at // ALIGN) * ALIGN
            nbytes = int(np.prod(shape)) * dtype.itemsize
            regions.append((columns, shape, dtype, at, nbytes))
            at += nbytes
        slot = self.pool.take(at, self.cancelled, self.taken)
        out: dict[Columns, np.ndarray] = {}
        for columns, shape, dtype, start, nbytes in regions:
            names = (columns,) if isinstance(columns, str) else columns
            share = nbytes // len(names)
            for k, name in enumerate(names):
                self.placed[name] = (slot, shm.HEADER_BYTES + start + k * share, share)
            out[columns] = slot.data[start : start + nbytes].view(dtype).reshape(shape)
        return out

    def place(self, name: str, values: pa.Array, first: int) -> tuple[Slot, int]:
        """(slot, file offset of value 0) of column `name`, whose values from `first` on are sent:
        where the source wrote them, else copied into a slot of their own."""
        width = values.type.bit_width // 8
        found = self.placed.get(name)
        if found is not None:
            slot, start, nbytes = found
            if len(values) * width > nbytes:
                raise ValueError(f"column {name!r}: {len(values) * width:,} bytes of values, but its buffer holds {nbytes:,}")
            return slot, start
        nbytes = (len(values) - first) * width
        target = self.array(name, (nbytes,), np.dtype(np.uint8))
        if nbytes:
            buffer = values.buffers()[1]
            target[:] = np.frombuffer(buffer, dtype=np.uint8, count=nbytes, offset=(values.offset + first) * width)
        slot, start, _ = self.placed[name]
        return slot, start - first * width


def to_refs(batch: pa.RecordBatch, schema: pa.Schema, buffers: SlotBuffers) -> pa.RecordBatch:
    """The batch with each large tensor column as `shm_ref` rows and each marked list column as
    `shm_list_ref` rows: the values stay where the source wrote them (`buffers`), or are copied
    into a slot when it wrote them elsewhere."""
    columns = []
    for ref_field, column in zip(schema, batch.columns):
        n = len(column)
        if ref_field.type == shm.REF_TYPE:
            values = column.storage.flatten() if isinstance(column, pa.ExtensionArray) else column.flatten()
            slot, start = buffers.place(ref_field.name, values, 0)
            row = (len(values) // max(1, n)) * values.type.bit_width // 8
            names = pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), pa.array([slot.name]))
            offsets = pa.array(start + row * np.arange(n, dtype=np.int64))
            columns.append(pa.StructArray.from_arrays([names, offsets, _generations(slot, n)], fields=list(shm.REF_TYPE)))
        elif ref_field.type == shm.LIST_REF_TYPE:
            bounds = column.offsets.to_numpy()
            values = column.values.slice(0, int(bounds[-1]))
            slot, start = buffers.place(ref_field.name, values, int(bounds[0]))
            width = values.type.bit_width // 8
            names = pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), pa.array([slot.name]))
            offsets = pa.array(start + width * bounds[:-1].astype(np.int64))
            lengths = pa.array(np.diff(bounds).astype(np.int32))
            columns.append(
                pa.StructArray.from_arrays([names, offsets, lengths, _generations(slot, n)], fields=list(shm.LIST_REF_TYPE))
            )
        else:
            columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _generations(slot: Slot, n: int) -> pa.Array:
    return pa.array(np.full(n, slot.generation, np.uint32))


def _remove_orphans(directory: Path) -> None:
    """Slot files of server processes that are gone (a crash leaves them behind), and any that
    carry this process's id (a dead server's, whose pid came round again: ours are not made yet)."""
    for path in directory.glob("cellfeed-*-*-*"):
        if not shm.SLOT_NAME.match(path.name):
            continue
        pid = int(path.name.split("-")[1])
        try:
            if pid != os.getpid():
                os.kill(pid, 0)
                continue  # a live server's
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live server
        try:
            path.unlink(missing_ok=True)
        except PermissionError:
            # another user's dead server left it, in a sticky folder: ours are named by our pid
            log.warning("cannot remove %s, left by a server of another user (pid %d) that is gone", path, pid)
