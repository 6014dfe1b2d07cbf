"""DynaCLRSource in process: batch contents against independent reads, determinism, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from cellfeed.server.context import ServerContext
from cellfeed.server.errors import CellfeedError, NotFound
from cellfeed.server.reading.omezarr import NORM_LEVELS, NORM_STATS
from cellfeed.server.settings import Settings
from cellfeed.server.kinds.dynaclr.source import DynaCLRSource
from cellfeed.wire import codec
from tests.fixtures.plates import expected_origin, make_dynaclr_data, read_patch

PATCH = (32, 32)
Z_RANGE = (1, 4)
FAMILY = {2: {2, 3, 4}}  # the division in every FOV: 2 -> 3, 4
CHANNELS = {"sec61": [0, 1], "tomm20": [1, 0]}
TAU_FRAMES = {"sec61": (1, 4), "tomm20": (2, 8)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dynaclr_data(tmp_path_factory.mktemp("dynaclr-source") / "data")


@pytest.fixture(scope="module")
def ctx(data):
    return ServerContext.from_settings(Settings(data_root=str(data.root)))


def _config(**overrides) -> dict:
    config = {
        "experiments_yaml": "experiments.yml",
        "z_range": list(Z_RANGE),
        "yx_patch_size": list(PATCH),
        "val_experiments": ["tomm20"],
        "batch_size": 8,
        "return_index": True,
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def source(ctx):
    return DynaCLRSource.open(_config(), ctx)


def _tracks(data, experiment: str, fov: str) -> pd.DataFrame:
    return pd.read_csv(data.tracks(experiment) / fov / "tracks.csv")


def _table(rb):
    return rb.drop_columns([c for c in rb.schema.names if c.endswith(("anchor", "positive", "_norm"))]).to_pandas()


def test_info_describes_splits_and_experiments(source):
    info = source.info()
    assert info["train_experiments"] == ["sec61"] and info["val_experiments"] == ["tomm20"]
    assert info["patch_shape"] == [2, 3, *PATCH] and info["channel_keys"] == ["ch_0", "ch_1"]
    assert [e["tau_range_frames"] for e in info["experiments"]] == [[1, 4], [2, 8]]
    assert info["splits"]["predict"]["items"] == 504
    assert info["splits"]["train"]["items"] == info["experiments"][0]["valid_anchors"]
    assert info["sampling"] == "weighted"
    json.dumps(info)  # JSON-able


@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_hold_the_right_patches(data, source, split):
    rb = source.batch(split, 0, 0, 1, 1)
    assert rb.num_rows == 8 and rb.schema == source.schema(split)
    anchor = codec.tensor_from_column(rb.column("anchor"))
    positive = codec.tensor_from_column(rb.column("positive"))
    assert anchor.shape == positive.shape == (8, 2, 3, *PATCH) and anchor.dtype == np.float32
    for i, row in _table(rb).iterrows():
        exp, fov = row["experiment"], row["fov_name"]
        assert exp == ("sec61" if split == "train" else "tomm20")
        y0, x0 = expected_origin(row["y"], row["x"], PATCH)
        expected = read_patch(data.plate(exp), fov, row["t"], CHANNELS[exp], Z_RANGE, y0, x0, PATCH)
        np.testing.assert_array_equal(anchor[i], expected)
        # The positive: same lineage, tau frames later, read at its own centroid.
        tau = row["positive_t"] - row["t"]
        lo, hi = TAU_FRAMES[exp]
        assert max(lo, 1) <= tau <= hi
        assert row["positive_track_id"] in FAMILY.get(row["lineage_id"], {row["lineage_id"]})
        tracks = _tracks(data, exp, fov)
        match = tracks[(tracks.track_id == row["positive_track_id"]) & (tracks.t == row["positive_t"])].iloc[0]
        y0, x0 = expected_origin(match.y, match.x, PATCH)
        expected = read_patch(data.plate(exp), fov, row["positive_t"], CHANNELS[exp], Z_RANGE, y0, x0, PATCH)
        np.testing.assert_array_equal(positive[i], expected)


def test_normalization_metadata_per_sample(data, source):
    rb = source.batch("val", 0, 0, 1, 0)
    norm = codec.tensor_from_column(rb.column("anchor_norm"))
    assert norm.shape == (8, 2, len(NORM_LEVELS), len(NORM_STATS))
    table = _table(rb)
    for i, row in table.iterrows():
        attrs = json.loads((data.plate("tomm20") / row["fov_name"] / "zarr.json").read_text())["attributes"]["normalization"]
        for c, channel in enumerate(["Phase3D", "RFP"]):
            assert norm[i, c, 1, NORM_STATS.index("mean")] == pytest.approx(attrs[channel]["fov_statistics"]["mean"])
            tp = attrs[channel]["timepoint_statistics"][str(row["t"])]
            assert norm[i, c, 2, NORM_STATS.index("p99")] == pytest.approx(tp["p99"])


def _same(a, b) -> bool:
    """Record batches equal column by column, NaN equal to NaN (absent statistics are NaN)."""
    if a.schema != b.schema:
        return False
    for name in a.schema.names:
        x, y = a.column(name), b.column(name)
        if isinstance(x.type, pa.FixedShapeTensorType):
            x, y = codec.tensor_from_column(x), codec.tensor_from_column(y)
        elif pa.types.is_dictionary(x.type):
            x, y = np.asarray(x.to_pylist(), dtype=object), np.asarray(y.to_pylist(), dtype=object)
        else:
            x, y = x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False)
        if not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            return False
    return True


def test_batches_are_a_pure_function_of_their_arguments(ctx, source):
    again = DynaCLRSource.open(_config(), ctx)
    a, b = source.batch("train", 3, 1, 2, 2), again.batch("train", 3, 1, 2, 2)
    assert _same(a, b)
    assert not _same(source.batch("train", 4, 1, 2, 2), a)
    # Validation is the same every epoch, positives included.
    assert _same(source.batch("val", 0, 0, 1, 3), source.batch("val", 9, 0, 1, 3))
    reseeded = DynaCLRSource.open(_config(seed=5), ctx)
    assert not _same(reseeded.batch("train", 3, 1, 2, 2), a)


def test_predict_streams_every_cell_once(source):
    n = source.num_batches("predict", 1)
    assert n == 63
    seen = []
    for k in range(n):
        rb = source.batch("predict", 0, 0, 1, k)
        assert "positive" not in rb.schema.names
        t = _table(rb)
        seen += list(zip(t.experiment, t.fov_name, t.track_id, t.t))
    assert len(seen) == len(set(seen)) == 504
    world = 2
    shared = []
    for rank in range(world):
        for k in range(source.num_batches("predict", world)):
            rb = source.batch("predict", 0, rank, world, k)
            t = _table(rb)
            shared += [key for key, pad in zip(zip(t.experiment, t.fov_name, t.track_id, t.t), t.padding) if not pad]
    assert sorted(shared) == sorted(seen)


def test_unknown_split_and_batch_out_of_range(source):
    with pytest.raises(CellfeedError, match="unknown split 'test'") as info:
        source.num_batches("test", 1)
    assert not isinstance(info.value, NotFound)  # invalid: a client must not reopen and retry
    with pytest.raises(CellfeedError, match="outside this epoch"):
        source.batch("train", 0, 0, 1, source.num_batches("train", 1))


def test_batches_without_index_carry_images_only(ctx):
    lean = DynaCLRSource.open(_config(return_index=False), ctx)
    assert lean.schema("train").names == ["anchor", "positive", "anchor_norm", "positive_norm", "padding"]
    assert "track_id" in lean.schema("predict").names


def _with_yaml(data, tmp_path, mutate) -> tuple[ServerContext, dict]:
    """A copy of the data root whose experiments YAML was changed by `mutate`."""
    root = tmp_path / "root"
    shutil.copytree(data.root, root)
    doc = yaml.safe_load(data.yaml_text)
    mutate(doc, root)
    (root / "experiments.yml").write_text(yaml.safe_dump(doc))
    return ServerContext.from_settings(Settings(data_root=str(root))), _config()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d, r: d["experiments"][0].update(data_path="gone.zarr"), r"sec61': data_path: file not found: 'gone.zarr'"),
        (lambda d, r: shutil.rmtree(r / "sec61.zarr/B/1/0/0"), r"sec61.zarr/B/1/0: no image array '0'"),
        (
            lambda d, r: d["experiments"][1].update(channel_names=["Phase3D", "RFP", "StressGranules"]),
            r"tomm20'.*differ from the channels \['RFP', 'Phase3D'",
        ),
        (
            lambda d, r: d["experiments"][0].update(source_channel=["Phase3D", "BFP"]),
            r"source_channel 'BFP' is not in channel_names",
        ),
        (lambda d, r: d["experiments"][0].update(pixel_size=0.1), r"unknown key 'pixel_size'"),
    ],
)
def test_bad_experiments_yaml(data, tmp_path, mutate, message):
    ctx, config = _with_yaml(data, tmp_path, mutate)
    with pytest.raises(CellfeedError, match=message):
        DynaCLRSource.open(config, ctx)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tau_range": [0.1, 0.2]}, r"sec61.*holds no offset of at least one frame"),
        ({"yx_patch_size": [80, 80]}, r"yx_patch_size \[80, 80\] is larger than the image \(64 x 64\)"),
        ({"z_range": [0, 6]}, r"z_range \[0, 6\] reaches past the image's 4 Z slices"),
        ({"val_experiments": ["tomm21"]}, r"unknown experiment 'tomm21'"),
        ({"val_experiments": ["sec61", "tomm20"]}, r"none is left to train on"),
        ({"experiment_weights": {"sec62": 1.0}}, r"experiment_weights names 'sec62'"),
        ({"condition_ratio": {"mock": 1.0}}, r"condition_ratio names 'mock'"),
        ({"batchsize": 8}, r"unknown key 'batchsize'"),
        ({"experiments_yaml": "../outside.yml"}, r"outside the server's data root"),
        ({"experiments_yaml": "nothing.yml"}, r"file not found: 'nothing.yml'"),
        ({"leaky": 1.5}, r"leaky: Input should be less than 1"),
    ],
)
def test_bad_session_config(ctx, overrides, message):
    with pytest.raises(CellfeedError, match=message):
        DynaCLRSource.open(_config(**overrides), ctx)


def test_inline_yaml_text_is_accepted(ctx, data):
    inline = DynaCLRSource.open(_config(experiments_yaml=data.yaml_text), ctx)
    assert inline.info()["splits"]["train"]["items"] > 0


@pytest.mark.parametrize("split", ["train", "predict"])
def test_patches_are_read_straight_into_shared_memory_slots(source, split, tmp_path):
    """Serving's slot buffers: the source reads anchors and positives into one slot, the batch
    travels as references to it (no copy: one slot per batch), and resolves to the same batch."""
    from cellfeed.client.shm import SlotReader
    from cellfeed.server.serving.shm import SlotBuffers, SlotPool, to_refs
    from cellfeed.wire import shm

    pool = SlotPool(tmp_path)
    buffers = SlotBuffers(pool)
    rb = source.batch(split, 0, 0, 1, 1, buffers=buffers)
    schema = shm.ref_schema(source.schema(split))
    refs = to_refs(rb, schema, buffers)
    assert len(pool.slots) == 1, "a column was copied rather than written in place"
    images = ["anchor"] if split == "predict" else ["anchor", "positive"]
    assert [f.name for f in schema if f.type == shm.REF_TYPE] == images
    slot = pool.slots[0]
    assert {refs.column(name).field("slot")[0].as_py() for name in images} == {slot.name}
    resolved = SlotReader(tmp_path).resolve(refs)
    assert _same(resolved, source.batch(split, 0, 0, 1, 1))
    pool.close()
