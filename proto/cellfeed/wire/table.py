"""The table stream's record batches, as both ends must agree on them: the column names the
stream adds to the dataset's own and the schema builder (docs/protocol/table.md)."""

from __future__ import annotations

import pyarrow as pa

from cellfeed.wire import codec

KIND = "table"
PADDING = codec.PADDING
DATASET_NAME = "dataset_name"  # string per row, when several datasets stream as one


def batch_schema(fields: list[pa.Field], dataset: str) -> pa.Schema:
    """The schema of every batch: the dataset's `fields` asked for, then the padding mask; the
    dataset's label and the mask's name in the schema metadata."""
    schema = pa.schema([*fields, pa.field(PADDING, pa.bool_(), nullable=False)])
    return codec.with_metadata(schema, {"kind": KIND, "dataset": dataset, "padding": PADDING})
