"""The DynaCLR stream's record batches, as both ends must agree on them: column names and the
schema builder (docs/protocol/dynaclr.md writes the contract out).

One record batch is one training batch of anchor/positive pairs (`predict`: anchors only) with
their normalisation statistics and the `padding` mask; optionally the index columns (always in
`predict`) and VisCy main's per-sample metadata (`anchor_meta.*`, `positive_meta.*`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from cellfeed.wire import codec

KIND = "dynaclr"
PREDICT = "predict"  # the split of anchors only, with the index columns

ANCHOR, POSITIVE = "anchor", "positive"  # [C, Z, Y, X] float32 tensors
IMAGES = (ANCHOR, POSITIVE)
PADDING = codec.PADDING
POSITIVE_TRACK_ID, POSITIVE_T = "positive_track_id", "positive_t"  # with the index, outside predict

_DICT = pa.dictionary(pa.int32(), pa.string())
# Index columns (predict, or return_index): strings, then numbers, then VisCy main's strings.
INDEX_DICT = ("experiment", "condition", "fov_name")
INDEX_NUMERIC: tuple[tuple[str, pa.DataType], ...] = (
    ("track_id", pa.int64()),
    ("t", pa.int32()),
    ("id", pa.int64()),
    ("parent_track_id", pa.float64()),
    ("parent_id", pa.float64()),
    ("lineage_id", pa.int64()),
    ("hours_post_infection", pa.float32()),
    ("z", pa.float32()),
    ("y", pa.float32()),
    ("x", pa.float32()),
)
INDEX_MAIN = ("perturbation", "marker", "organelle", "well", "microscope")
INDEX_COLUMNS = INDEX_DICT + tuple(name for name, _ in INDEX_NUMERIC) + INDEX_MAIN
INDEX_MARKER = "track_id"  # present exactly when the index columns are

# VisCy main's SampleMeta columns, each as "<prefix>.<name>", labels as "<prefix>.labels.<key>"
META_PREFIXES = {ANCHOR: "anchor_meta", POSITIVE: "positive_meta"}
META_DICT = ("experiment", "perturbation", "microscope", "fov_name", "marker")
META_NUMERIC: tuple[tuple[str, pa.DataType], ...] = (
    ("track_id", pa.int64()),
    ("t", pa.int32()),
    ("hours_post_perturbation", pa.float32()),
    ("lineage_id", pa.int64()),
    ("y_clamp", pa.float32()),
    ("x_clamp", pa.float32()),
)
META_COLUMNS = META_DICT + tuple(name for name, _ in META_NUMERIC)


def norm(image: str) -> str:
    """The [C, levels, stats] normalisation statistics column of image `image`."""
    return f"{image}_norm"


def meta(prefix: str, name: str) -> str:
    """Metadata column `name` of `prefix` (anchor_meta, positive_meta)."""
    return f"{prefix}.{name}"


def label(prefix: str, key: str) -> str:
    """The class-id column of label `key` in metadata `prefix`."""
    return f"{prefix}.labels.{key}"


def batch_schema(
    split: str,
    patch_shape: tuple[int, int, int, int],
    norm_shape: tuple[int, int, int],
    *,
    with_index: bool,
    labels: list[str] | None,
    facts: dict[str, Any],
) -> pa.Schema:
    """The schema of every batch of `split`: images of `patch_shape` [C, Z, Y, X] with statistics
    of `norm_shape`; the index columns when `with_index` (always in predict); the metadata
    columns with these label keys when `labels` is not None; `facts` in the schema metadata."""
    images = (ANCHOR,) if split == PREDICT else IMAGES
    fields = [pa.field(name, codec.tensor_type(patch_shape), nullable=False) for name in images]
    fields += [pa.field(norm(name), codec.tensor_type(norm_shape), nullable=False) for name in images]
    fields.append(pa.field(PADDING, pa.bool_(), nullable=False))
    if split == PREDICT or with_index:
        fields += [pa.field(n, _DICT, nullable=False) for n in INDEX_DICT]
        fields += [pa.field(n, t, nullable=False) for n, t in INDEX_NUMERIC]
        fields += [pa.field(n, _DICT, nullable=False) for n in INDEX_MAIN]
        if split != PREDICT:
            fields += [pa.field(POSITIVE_TRACK_ID, pa.int64(), nullable=False), pa.field(POSITIVE_T, pa.int32(), nullable=False)]
    if labels is not None:
        for prefix in (META_PREFIXES[name] for name in images):
            fields += [pa.field(meta(prefix, n), _DICT, nullable=False) for n in META_DICT]
            fields += [pa.field(meta(prefix, n), t, nullable=False) for n, t in META_NUMERIC]
            fields += [pa.field(label(prefix, k), pa.int32(), nullable=False) for k in labels]
    return codec.with_metadata(pa.schema(fields), {"kind": KIND, "split": split, **facts})
