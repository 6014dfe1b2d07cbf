"""The client side of shared-memory slots (see cellfeed.wire.shm): probe, map, view, free.

Tensors decoded from a slot are views of it, not copies; the slot returns to the server (DONE
set to its generation) only when every tensor viewing it is gone, so holding a batch is safe.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from cellfeed.client.errors import RequestError
from cellfeed.wire import shm

MAX_MAPS = 256

if TYPE_CHECKING:
    from cellfeed.client.connection import Connection


log = logging.getLogger(__name__)


def probe(connection: "Connection", *, retry: bool = True) -> Path | None:
    """This host's shared-memory folder if the server sees it too (same host or shared /dev/shm).

    `retry=False`: one attempt, whose transport failure is raised as is (a stream re-probing
    after a reconnect retries by itself)."""
    directory = shm.shm_dir()
    if directory is None:
        return None
    name, content = f"cellfeed-probe-{secrets.token_hex(16)}", secrets.token_bytes(16)
    path = directory / name
    try:
        path.write_bytes(content)
    except OSError:
        return None
    try:
        body = json.dumps({"name": name, "content": content.hex()}).encode()
        return directory if connection.action("shm_probe", body, retry=retry) == b"1" else None
    except RequestError:  # a server without slots (an older cellfeed): the byte stream it is
        return None
    finally:
        path.unlink(missing_ok=True)


class SlotsUnavailable(OSError):
    """A slot file the server names cannot be opened here (another user's file, say), or no
    longer holds the batch. `slot` is its name (`cellfeed-<server pid>-...`)."""

    def __init__(self, message: str, slot: str = "") -> None:
        super().__init__(message)
        self.slot = slot

    @property
    def server_pid(self) -> int | None:
        """The pid of the server process that wrote the slot (from its name), if known."""
        parts = self.slot.split("-")
        return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None


class _Lease:
    """The tensors of one batch that view one slot; the last one to go hands the slot back."""

    def __init__(self, header: np.ndarray, generation: int) -> None:
        self.header = header
        self.generation = generation
        self.count = 0
        self.lock = threading.Lock()

    def drop(self) -> None:
        with self.lock:
            self.count -= 1
            if self.count == 0:
                self.header[shm.DONE] = self.generation


class _Hold:
    """The owner of one column's Arrow buffer over a slot: every view of the column (numpy,
    torch) keeps it alive, and its end drops the lease. It also keeps the mapping open."""

    def __init__(self, mapped: mmap.mmap, lease: _Lease) -> None:
        self.mapped = mapped
        self.lease = lease

    def __del__(self) -> None:
        self.lease.drop()


@dataclass(frozen=True)
class _Run:
    """A column's values in a slot: name ("" when it has none), byte offset and length, the
    generation, and for a list column its row bounds."""

    slot: str
    offset: int
    nbytes: int
    generation: int
    bounds: np.ndarray | None


@dataclass(frozen=True)
class _RefColumn:
    """A ref column of a stream's schema: its place and name, the value type it stands for, and
    the values per row of a tensor column (None for a list column)."""

    index: int
    name: str
    value_type: pa.DataType
    row_values: int | None


@dataclass(frozen=True)
class _SlotSchema:
    """A stream schema's ref columns and the schema a resolved batch of it has."""

    source: pa.Schema
    refs: list[_RefColumn]
    schema: pa.Schema  # the resolved batch's


class SlotReader:
    """Maps the server's slot files (each once) and turns `shm_ref`/`shm_list_ref` columns into views."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._last_schema: _SlotSchema | None = None

    def resolve(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch with each `shm_ref` column back as the tensor column it stands for and each
        `shm_list_ref` column back as its list column, the values a view of the slot (no copy);
        each slot stays the client's until those views are gone."""
        slot_schema = self._slot_schema(batch.schema)
        if not slot_schema.refs:
            return batch
        located = [self._locate(ref, batch.column(ref.index)) for ref in slot_schema.refs]
        leases: dict[str, _Lease] = {}
        for run in located:
            if run.slot:
                if run.slot not in leases:
                    header = np.frombuffer(self._map(run.slot), dtype=np.uint32, count=3)
                    if header[shm.GEN] != run.generation:
                        raise SlotsUnavailable(f"slot {run.slot} holds generation {header[shm.GEN]}, the batch names {run.generation}", run.slot)
                    header[shm.TAKEN] = run.generation
                    leases[run.slot] = _Lease(header, run.generation)
                leases[run.slot].count += 1
        columns = list(batch.columns)
        offsets: tuple[np.ndarray, pa.Array] | None = None  # list columns of one batch share their bounds
        for ref, run in zip(slot_schema.refs, located):
            if run.slot:
                mapped = self._map(run.slot)
                address = np.frombuffer(mapped, dtype=np.uint8, count=1).ctypes.data + run.offset
                values = pa.foreign_buffer(address, run.nbytes, base=_Hold(mapped, leases[run.slot]))
            else:
                values = pa.py_buffer(b"")
            flat = pa.Array.from_buffers(ref.value_type, run.nbytes // ref.value_type.byte_width, [None, values])
            if run.bounds is not None:  # a list column
                if offsets is None or not np.array_equal(offsets[0], run.bounds):
                    offsets = (run.bounds, pa.array(run.bounds))
                columns[ref.index] = pa.ListArray.from_arrays(offsets[1], flat)
            else:
                storage = pa.FixedSizeListArray.from_arrays(flat, ref.row_values)
                columns[ref.index] = pa.ExtensionArray.from_storage(slot_schema.schema.field(ref.index).type, storage)
        return pa.RecordBatch.from_arrays(columns, schema=slot_schema.schema)

    def _slot_schema(self, schema: pa.Schema) -> "_SlotSchema":
        """The ref columns of a stream's schema and the schema they resolve to, made once."""
        cached = self._last_schema
        if cached is not None and cached.source.equals(schema, check_metadata=True):
            return cached
        refs, fields = [], list(schema)
        for i, field in enumerate(schema):
            info = shm.ref_info(field)
            if info is None:
                continue
            value_type = pa.from_numpy_dtype(np.dtype(info["dtype"]))
            if field.type == shm.LIST_REF_TYPE:
                refs.append(_RefColumn(i, field.name, value_type, None))
                fields[i] = pa.field(field.name, pa.list_(value_type), nullable=False)
            else:
                refs.append(_RefColumn(i, field.name, value_type, int(np.prod(info["shape"]))))
                fields[i] = pa.field(field.name, pa.fixed_shape_tensor(value_type, info["shape"]), nullable=False)
        made = _SlotSchema(schema, refs, pa.schema(fields, metadata=schema.metadata))
        self._last_schema = made
        return made

    def _locate(self, ref: "_RefColumn", column: pa.StructArray) -> "_Run":
        """Where a column's rows lie: they must be one contiguous run of one slot's data."""
        width = ref.value_type.byte_width
        n = len(column)
        bounds = np.zeros(n + 1, dtype=np.int32) if ref.row_values is None else None
        if n == 0:
            return _Run("", 0, 0, 0, bounds)
        slots = column.field("slot")
        offsets = column.field("offset").to_numpy()
        codes = slots.indices.to_numpy()
        if int(codes.min()) < 0 or int(codes.max()) >= len(slots.dictionary):
            raise ValueError(f"column {ref.name!r}: shm refs name slot {int(codes.max())} of a {len(slots.dictionary)}-name dictionary")
        name = slots.dictionary[int(codes[0])].as_py()
        one_slot = len(slots.dictionary) == 1 or not np.any(codes != codes[0])
        if bounds is not None:
            np.cumsum(column.field("length").to_numpy(), out=bounds[1:])
            expected = bounds[:-1].astype(np.int64)  # each row's byte offset from the first's
            expected *= width
            nbytes = width * int(bounds[-1])
        else:
            row_bytes = width * ref.row_values
            expected = np.arange(n, dtype=np.int64)
            expected *= row_bytes
            nbytes = n * row_bytes
        expected += offsets[0]
        if not one_slot or not np.array_equal(offsets, expected):
            raise ValueError(f"column {ref.name!r}: its shm refs are not one contiguous run of one slot")
        if int(offsets[0]) < shm.HEADER_BYTES or int(offsets[0]) + nbytes > len(self._map(name)):
            raise ValueError(f"column {ref.name!r}: shm refs lie outside the data of slot {name}")
        return _Run(name, int(offsets[0]), nbytes, int(column.field("generation")[0].as_py()), bounds)

    def _map(self, name: str) -> mmap.mmap:
        if not shm.SLOT_NAME.match(name):
            raise ValueError(f"shm_ref names {name!r}, not a cellfeed slot")
        with self._lock:
            mapped = self._maps.get(name)
            if mapped is None:
                try:
                    fd = os.open(self.directory / name, os.O_RDWR)
                except OSError as exc:
                    raise SlotsUnavailable(f"{self.directory / name}: {exc.strerror or exc}", name) from None
                try:
                    mapped = mmap.mmap(fd, 0)
                finally:
                    os.close(fd)
                # a new slot: forget the slots the server removed (their memory returns once no
                # tensor views them), and the oldest ones past MAX_MAPS
                for old in [n for n in self._maps if not (self.directory / n).exists()]:
                    del self._maps[old]
                while len(self._maps) >= MAX_MAPS:
                    self._maps.pop(next(iter(self._maps)))
                self._maps[name] = mapped
            return mapped


class SlotUse:
    """Whether a loader's new streams read shared-memory slots: off once slots fail on a stream,
    offered again after the connection reconnects (a restarted server), the server probed once."""

    def __init__(self, connection: "Connection", reader: SlotReader | None) -> None:
        self.connection = connection
        self.reader = reader  # the slots given (None: gRPC only), tried again after a reconnect
        self.current = reader  # what a new stream uses now
        self.key = secrets.token_hex(8)  # the slot-pool key prefix (the server appends the stream index)
        self._off_at = 0  # the client generation whose streams could not use the slots
        self._lock = threading.Lock()

    def pool(self, shared_memory: bool) -> str:
        """The `shm_pool` a stream asks for; "": gRPC."""
        return self.key if shared_memory else ""

    def off(self, generation: int, reason: str) -> None:
        """Stream over gRPC from now on: slots failed (`reason`) on a stream of client `generation`."""
        log.warning("%s; streaming batches over gRPC instead", reason)
        with self._lock:
            self.current = None
            self._off_at = max(self._off_at, generation)

    def for_stream(self) -> SlotReader | None:
        """The slots a new stream uses: after a reconnect since they failed, the server is probed
        again (one attempt; a transport failure raises, to be retried)."""
        if self.current is not None or self.reader is None:
            return self.current
        generation = self.connection.generation
        if generation <= self._off_at:
            return None
        with self._lock:
            if self.current is None and generation > self._off_at:
                if probe(self.connection, retry=False) is not None:
                    log.info("the server at %s offers shared-memory slots again", self.connection.location)
                    self.current = self.reader
                else:
                    self._off_at = generation
            return self.current
