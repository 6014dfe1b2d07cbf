"""Shared-memory slots: how large dense tensors skip the gRPC byte stream on one host.

A slot is a file in the shared-memory folder (`CELLFEED_SHM_DIR`, default /dev/shm) that the
server creates and reuses: a 64-byte header, then data. Header bytes 0..3 are the slot's state
(uint32): SENT once the server wrote a batch into it, HELD once the client decoded that batch,
FREE again when the client has dropped every tensor viewing it. In a stream that asked for slots, each large tensor column
travels as a `shm_ref` column (slot name and byte offset per row) in place of its values;
docs/protocol.md writes the contract out.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa

HEADER_BYTES = 64
FREE, SENT, HELD = 0, 1, 2
MIN_ROW_BYTES = 4 << 10  # tensor columns with smaller rows stay in the byte stream
SLOT_NAME = re.compile(r"^cellfeed-[0-9]+-[0-9a-f]{8,64}-[0-9]+$")
PROBE_NAME = re.compile(r"^cellfeed-probe-[0-9a-f]{32}$")
REF_TYPE = pa.struct([pa.field("slot", pa.string(), nullable=False), pa.field("offset", pa.int64(), nullable=False)])
REF_KEY = b"cellfeed.shm_tensor"


def shm_dir() -> Path | None:
    """The shared-memory folder, or None when there is none (or CELLFEED_SHM_DIR is empty)."""
    value = os.environ.get("CELLFEED_SHM_DIR", "/dev/shm")
    path = Path(value) if value else None
    return path if path is not None and path.is_dir() else None


def moves_to_shm(field: pa.Field) -> bool:
    """Whether a column of this field travels in a slot: fixed-shape tensors of large rows."""
    t = field.type
    if not isinstance(t, pa.FixedShapeTensorType):
        return False
    row = t.value_type.bit_width // 8
    for n in t.shape:
        row *= n
    return row >= MIN_ROW_BYTES


def ref_schema(schema: pa.Schema) -> pa.Schema:
    """The schema of a slot stream: every large tensor field becomes a `shm_ref` field whose
    metadata keeps the tensor's shape and value type."""
    fields = []
    for field in schema:
        if moves_to_shm(field):
            t = field.type
            meta = {REF_KEY: json.dumps({"shape": list(t.shape), "dtype": str(t.value_type.to_pandas_dtype().__name__)})}
            field = pa.field(field.name, REF_TYPE, nullable=False, metadata=meta)
        fields.append(field)
    return pa.schema(fields, metadata=schema.metadata)


def ref_info(field: pa.Field) -> dict | None:
    """{"shape", "dtype"} of a `shm_ref` field, else None."""
    raw = (field.metadata or {}).get(REF_KEY)
    return json.loads(raw) if raw else None
