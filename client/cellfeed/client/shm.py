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


class SlotReader:
    """Maps the server's slot files (each once) and turns `shm_ref` columns into array views."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()

    def resolve(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch with each `shm_ref` column back as the tensor column it stands for, its
        values a view of the slot (no copy); each slot stays the client's until those views are gone."""
        refs = [(i, f, shm.ref_info(f)) for i, f in enumerate(batch.schema) if shm.ref_info(f)]
        if not refs:
            return batch
        located = {i: self._locate(f.name, batch.column(i), info) for i, f, info in refs}
        leases: dict[str, _Lease] = {}
        for name, _, _, generation in located.values():
            if name:
                if name not in leases:
                    header = np.frombuffer(self._map(name), dtype=np.uint32, count=3)
                    if header[shm.GEN] != generation:
                        raise SlotsUnavailable(f"slot {name} holds generation {header[shm.GEN]}, the batch names {generation}")
                    header[shm.TAKEN] = generation
                    leases[name] = _Lease(header, generation)
                leases[name].count += 1
        fields, columns = list(batch.schema), list(batch.columns)
        for i, field, info in refs:
            name, offset, nbytes, _ = located[i]
            value_type = pa.from_numpy_dtype(np.dtype(info["dtype"]))
            tensor_type = pa.fixed_shape_tensor(value_type, info["shape"])
            if name:
                mapped = self._map(name)
                address = np.frombuffer(mapped, dtype=np.uint8, count=1).ctypes.data + offset
                values = pa.foreign_buffer(address, nbytes, base=_Hold(mapped, leases[name]))
            else:
                values = pa.py_buffer(b"")
            width = int(np.prod(info["shape"]))
            flat = pa.Array.from_buffers(value_type, len(batch) * width, [None, values])
            storage = pa.FixedSizeListArray.from_arrays(flat, width)
            columns[i] = pa.ExtensionArray.from_storage(tensor_type, storage)
            fields[i] = pa.field(field.name, tensor_type, nullable=False)
        return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields, metadata=batch.schema.metadata))

    def _locate(self, column_name: str, column: pa.StructArray, info: dict) -> tuple[str, int, int, int]:
        """(slot name, byte offset, byte length, generation) of a column's rows; ("", 0, 0, 0) when
        it has none."""
        if len(column) == 0:
            return "", 0, 0, 0
        slots = column.field("slot")
        offsets = column.field("offset").to_numpy()
        name = slots[0].as_py()
        row = int(np.prod(info["shape"])) * np.dtype(info["dtype"]).itemsize
        if len(slots.unique()) != 1 or np.any(np.diff(offsets) != row):
            raise ValueError(f"column {column_name!r}: its shm_ref rows are not one contiguous run of one slot")
        nbytes = len(column) * row
        if int(offsets[0]) < shm.HEADER_BYTES or int(offsets[0]) + nbytes > len(self._map(name)):
            raise ValueError(f"column {column_name!r}: shm_ref rows lie outside the data of slot {name}")
        return name, int(offsets[0]), nbytes, int(column.field("generation")[0].as_py())

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
