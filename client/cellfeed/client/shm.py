"""The client side of shared-memory slots (see cellfeed.wire.shm): probe, map, view, free.

Tensors decoded from a slot are views of it, not copies; the slot returns to the server (DONE
set to its generation) only when every tensor viewing it is gone, so holding a batch is safe.
"""

from __future__ import annotations

import json
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


def probe(connection: "Connection") -> Path | None:
    """This host's shared-memory folder if the server sees it too (same host or shared /dev/shm)."""
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
        return directory if connection.action("shm_probe", body) == b"1" else None
    except RequestError:  # a server without slots (an older cellfeed): the byte stream it is
        return None
    finally:
        path.unlink(missing_ok=True)


class SlotsUnavailable(OSError):
    """A slot file the server names cannot be opened here (another user's file, say)."""


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


class SlotReader:
    """Maps the server's slot files (each once) and turns `shm_ref`/`shm_list_ref` columns into views."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()

    def resolve(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch with each `shm_ref` column back as the tensor column it stands for and each
        `shm_list_ref` column back as its list column, the values a view of the slot (no copy);
        each slot stays the client's until those views are gone."""
        refs = [(i, f, shm.ref_info(f)) for i, f in enumerate(batch.schema) if shm.ref_info(f)]
        if not refs:
            return batch
        located = {i: self._locate(f, batch.column(i), info) for i, f, info in refs}
        leases: dict[str, _Lease] = {}
        for run in located.values():
            if run.slot:
                if run.slot not in leases:
                    header = np.frombuffer(self._map(run.slot), dtype=np.uint32, count=3)
                    if header[shm.GEN] != run.generation:
                        raise SlotsUnavailable(f"slot {run.slot} holds generation {header[shm.GEN]}, the batch names {run.generation}")
                    header[shm.TAKEN] = run.generation
                    leases[run.slot] = _Lease(header, run.generation)
                leases[run.slot].count += 1
        fields, columns = list(batch.schema), list(batch.columns)
        for i, field, info in refs:
            run = located[i]
            value_type = pa.from_numpy_dtype(np.dtype(info["dtype"]))
            if run.slot:
                mapped = self._map(run.slot)
                address = np.frombuffer(mapped, dtype=np.uint8, count=1).ctypes.data + run.offset
                values = pa.foreign_buffer(address, run.nbytes, base=_Hold(mapped, leases[run.slot]))
            else:
                values = pa.py_buffer(b"")
            flat = pa.Array.from_buffers(value_type, run.nbytes // value_type.byte_width, [None, values])
            if run.bounds is not None:  # a list column
                columns[i] = pa.ListArray.from_arrays(pa.array(run.bounds), flat)
                fields[i] = pa.field(field.name, pa.list_(value_type), nullable=False)
            else:
                tensor_type = pa.fixed_shape_tensor(value_type, info["shape"])
                storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(info["shape"])))
                columns[i] = pa.ExtensionArray.from_storage(tensor_type, storage)
                fields[i] = pa.field(field.name, tensor_type, nullable=False)
        return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields, metadata=batch.schema.metadata))

    def _locate(self, field: pa.Field, column: pa.StructArray, info: dict) -> "_Run":
        """Where a column's rows lie: they must be one contiguous run of one slot's data."""
        width = np.dtype(info["dtype"]).itemsize
        is_list = field.type == shm.LIST_REF_TYPE
        bounds = np.zeros(len(column) + 1, dtype=np.int32) if is_list else None
        if len(column) == 0:
            return _Run("", 0, 0, 0, bounds)
        slots = column.field("slot")
        offsets = column.field("offset").to_numpy()
        if is_list:
            np.cumsum(column.field("length").to_numpy(), out=bounds[1:])
            row_bytes = width * bounds[:-1].astype(np.int64)
            name = slots.dictionary[slots.indices[0].as_py()].as_py()
            one_slot = len(slots.dictionary) == 1 or len(np.unique(slots.indices.to_numpy())) == 1
            nbytes = width * int(bounds[-1])
        else:
            row = int(np.prod(info["shape"])) * width
            row_bytes = row * np.arange(len(column), dtype=np.int64)
            name = slots[0].as_py()
            one_slot = len(slots.unique()) == 1
            nbytes = len(column) * row
        if not one_slot or np.any(offsets - offsets[0] != row_bytes):
            raise ValueError(f"column {field.name!r}: its shm refs are not one contiguous run of one slot")
        if int(offsets[0]) < shm.HEADER_BYTES or int(offsets[0]) + nbytes > len(self._map(name)):
            raise ValueError(f"column {field.name!r}: shm refs lie outside the data of slot {name}")
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
                    raise SlotsUnavailable(f"{self.directory / name}: {exc.strerror or exc}") from None
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
