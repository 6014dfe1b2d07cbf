"""Shared-memory slots: how large tensors and CSR rows skip the gRPC byte stream on one host.

A slot is a file in the shared-memory folder (`CELLFEED_SHM_DIR`, default /dev/shm) that the
server creates and reuses: a 64-byte header, then data. The header holds three uint32 words,
each with one writer: GEN (the server: a new number each time it writes a batch into the slot),
TAKEN (the client: the GEN it decoded) and DONE (the client: the GEN whose tensors are all gone).
The server reuses a slot once DONE == GEN, or when it gave the batch up (its stream ended) and
TAKEN != GEN. In a stream that asked for slots, each large tensor column travels as a `shm_ref`
column (slot, byte offset, generation per row) in place of its values, and each list column its
source marks as a `shm_list_ref` column (the same, plus each row's length); docs/protocol.md
writes the contract out.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa

HEADER_BYTES = 64
GEN, TAKEN, DONE = 0, 1, 2  # header words
MIN_ROW_BYTES = 4 << 10  # tensor columns with smaller rows stay in the byte stream
SLOT_NAME = re.compile(r"^cellfeed-[0-9]+-[0-9a-f]{8,64}-[0-9]+$")
PROBE_NAME = re.compile(r"^cellfeed-probe-[0-9a-f]{32}$")
# the slot name is dictionary-encoded (sent once a batch), in both ref types
REF_TYPE = pa.struct(
    [
        pa.field("slot", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("generation", pa.uint32(), nullable=False),
    ]
)
REF_KEY = b"cellfeed.shm_tensor"
# lists of numbers marked LIST_KEY by their source
LIST_REF_TYPE = pa.struct(
    [
        pa.field("slot", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
        pa.field("generation", pa.uint32(), nullable=False),
    ]
)
LIST_KEY = b"cellfeed.shm_list"


def shm_dir() -> Path | None:
    """The shared-memory folder, or None when there is none (or CELLFEED_SHM_DIR is empty)."""
    value = os.environ.get("CELLFEED_SHM_DIR", "/dev/shm")
    path = Path(value) if value else None
    return path if path is not None and path.is_dir() else None


def moves_to_shm(field: pa.Field) -> bool:
    """Whether a column of this field travels in a slot: fixed-shape tensors of large rows."""
    t = field.type
    if LIST_KEY in (field.metadata or {}):
        return True
    if not isinstance(t, pa.FixedShapeTensorType):
        return False
    row = t.value_type.bit_width // 8
    for n in t.shape:
        row *= n
    return row >= MIN_ROW_BYTES


def ref_schema(schema: pa.Schema) -> pa.Schema:
    """The schema of a slot stream: every large tensor field becomes a `shm_ref` field whose
    metadata keeps the tensor's shape and value type, every marked list field a `shm_list_ref`."""
    fields = []
    for field in schema:
        if LIST_KEY in (field.metadata or {}):
            meta = {LIST_KEY: json.dumps({"dtype": str(field.type.value_type.to_pandas_dtype().__name__)})}
            field = pa.field(field.name, LIST_REF_TYPE, nullable=False, metadata=meta)
        elif moves_to_shm(field):
            t = field.type
            meta = {REF_KEY: json.dumps({"shape": list(t.shape), "dtype": str(t.value_type.to_pandas_dtype().__name__)})}
            field = pa.field(field.name, REF_TYPE, nullable=False, metadata=meta)
        fields.append(field)
    return pa.schema(fields, metadata=schema.metadata)


def ref_info(field: pa.Field) -> dict | None:
    """{"shape", "dtype"} of a `shm_ref` field, {"dtype"} of a `shm_list_ref` one, else None."""
    meta = field.metadata or {}
    raw = meta.get(REF_KEY) or meta.get(LIST_KEY)
    return json.loads(raw) if raw and field.type in (REF_TYPE, LIST_REF_TYPE) else None
