"""The perturbation stream's record batches, as both ends must agree on them: column names and
the schema builder (docs/protocol/perturbation.md writes the contract out).

A batch of B items of S cells has B*S rows in item order. Each matrix (`pert`, `ctrl` and the
optional `*_counts`) travels as CSR list columns (`{prefix}_indices`, `{prefix}_data`, marked to
travel in shared-memory slots when asked for) or as one dense tensor column `{prefix}_dense`;
with a controls table sent once with the session, control rows are named by `ctrl_row`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from cellfeed.wire import codec, shm

KIND = "perturbation"

PERT, CTRL, PERT_COUNTS, CTRL_COUNTS = "pert", "ctrl", "pert_counts", "ctrl_counts"
PERT_MATRICES = (PERT, PERT_COUNTS)
CONTROL_MATRICES = (CTRL, CTRL_COUNTS)
MATRICES = PERT_MATRICES + CONTROL_MATRICES  # in column order

CTRL_ROW = "ctrl_row"  # int32: the row of the session's controls table
TARGET = "target"  # dictionary<string>: the perturbation target of the row's item
CELL_TYPE = "cell_type"  # dictionary<string>
EXP_BATCH = "batch"  # dictionary<string>: the experimental batch of the perturbed cell
CELL_MASK = "cell_mask"  # bool: a real cell of this pass (false: padding)
PERT_BARCODE, CTRL_BARCODE = "pert_barcode", "ctrl_barcode"  # strings, with barcodes on
DATASET = "dataset"  # dictionary<string>, with dataset_column on
OBS_PREFIX = "obs."  # obs_columns, each as "obs.<name>"

# side tables sent once with the session
EMBEDDINGS_TABLE, EMBEDDING = "pert_emb", "embedding"  # columns TARGET and EMBEDDING (tensor)
CONTROLS_TABLE = "controls"  # the control rows' matrix columns, row r named by CTRL_ROW r

_DICT = pa.dictionary(pa.int32(), pa.string())


def dense(prefix: str) -> str:
    """The dense tensor column of matrix `prefix`."""
    return f"{prefix}_dense"


def csr_data(prefix: str) -> str:
    """The CSR values column of matrix `prefix` (its indices: codec.csr_fields' other column)."""
    return f"{prefix}_data"


def obs(name: str) -> str:
    """The column of obs column `name`."""
    return f"{OBS_PREFIX}{name}"


def matrix_fields(prefix: str, is_dense: bool, width: int) -> list[pa.Field]:
    """The fields of matrix `prefix` of `width` columns: one dense tensor, or two CSR list columns
    that may travel in shared-memory slots."""
    if is_dense:
        return [pa.field(dense(prefix), codec.tensor_type((width,)), nullable=False)]
    in_slots = {shm.LIST_KEY: b"1"}
    return [f.with_metadata(in_slots) for f in codec.csr_fields(prefix, codec.index_type(width))]


def batch_schema(
    matrices: dict[str, tuple[bool, int]],
    *,
    controls_by_row: bool,
    barcodes: bool,
    dataset_column: bool,
    obs_types: dict[str, pa.DataType],
    meta: dict[str, Any],
) -> pa.Schema:
    """The schema of every batch of a session: `matrices` maps each prefix sent to (dense, width);
    with `controls_by_row` the control matrices travel as CTRL_ROW; `obs_types` gives each obs
    column's type; `meta` the JSON facts put in the schema metadata."""
    fields = [f for p in PERT_MATRICES if p in matrices for f in matrix_fields(p, *matrices[p])]
    if controls_by_row:
        fields.append(pa.field(CTRL_ROW, pa.int32(), nullable=False))
    else:
        fields += [f for p in CONTROL_MATRICES if p in matrices for f in matrix_fields(p, *matrices[p])]
    fields += [
        pa.field(TARGET, _DICT, nullable=False),
        pa.field(CELL_TYPE, _DICT, nullable=False),
        pa.field(EXP_BATCH, _DICT, nullable=False),
        pa.field(CELL_MASK, pa.bool_(), nullable=False),
    ]
    if barcodes:
        fields += [pa.field(PERT_BARCODE, pa.string(), nullable=False), pa.field(CTRL_BARCODE, pa.string(), nullable=False)]
    if dataset_column:
        fields.append(pa.field(DATASET, _DICT, nullable=False))
    fields += [pa.field(obs(name), kind, nullable=False) for name, kind in obs_types.items()]
    return codec.with_metadata(pa.schema(fields), {"kind": KIND, **meta})
