"""VisCy main's sampling and selection arguments through a real server on iohub plates: FOV-level
split, batch_group_by / stratify_by / group_weights, channels_per_sample (bag of channels and a
fixed list), positive_cell_source, positive_match_columns, positive_channel_source and
label_columns with anchor and positive metadata; and the arguments in a LightningCLI config."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cellfeed.client import MultiExperimentDataModule
from tests.fixtures.dynaclr_main import server, write_main_data  # noqa: F401 (server: a fixture)
from tests.fixtures.ecosystem_plates import IohubPlate
from tests.fixtures.plates import expected_origin
from tests.helpers import epoch

PATCH = (24, 24)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_main_data(tmp_path_factory.mktemp("dynaclr-main-sampling") / "data", exclude=None)




def _dm(server, **kwargs) -> MultiExperimentDataModule:
    options = dict(
        collection_yaml="collection.yml",
        z_window=3,
        yx_patch_size=PATCH,
        final_yx_patch_size=PATCH,
        tau_range=(0.5, 1.5),
        batch_size=8,
        num_workers=2,
        return_index=True,
        server=server.flight_uri,
    )
    options.update(kwargs)
    dm = MultiExperimentDataModule(**options)
    dm.setup("fit")
    return dm


def _real(batch) -> list[int]:
    return [i for i, pad in enumerate(batch["padding"].tolist()) if not pad]


def test_fov_split_follows_viscy_mains_rule_and_keeps_splits_apart(server):
    dm = _dm(server, split_ratio=0.5, seed=3)  # no val_experiments: FOVs within each experiment
    rng = np.random.default_rng(3)
    expected_val = {}
    for name in ("iohub_04", "iohub_05"):
        fovs = sorted(["A/1/0", "A/1/1", "B/2/0", "B/2/1"])
        rng.shuffle(fovs)
        expected_val[name] = sorted(fovs[max(1, int(4 * 0.5)) :])
    assert dm.info["split_mode"] == "fov" and dm.info["val_fovs"] == expected_val
    train = {(r["experiment"], r["fov_name"]) for b in epoch(dm.train_dataloader()) for r in b["index"]}
    val = {(r["experiment"], r["fov_name"]) for b in epoch(dm.val_dataloader()) for r in b["index"]}
    assert val == {(e, f) for e, fs in expected_val.items() for f in fs}
    assert train and not train & val
    assert _dm(server).info["split_mode"] == "fov"  # main's default split_ratio 0.8 with no val_experiments
    assert _dm(server, collection_yaml=None, experiments_yaml="experiments.yml").info["split_mode"] == "none"


def test_bag_of_channels_grouped_by_marker(server, data):
    root, _ = data
    dm = _dm(server, channels_per_sample=1, batch_group_by="marker", stratify_by=None, split_ratio=1.0)
    assert dm.channel_keys == ["channel_0"] and dm.info["patch_shape"][0] == 1
    rows = dm.info["splits"]["train"]["items"]
    single = _dm(server, split_ratio=1.0, stratify_by=None).info["splits"]["train"]["items"]
    assert rows == 2 * single  # every anchor once per channel
    references = {n: IohubPlate(root / f"{n}.zarr") for n in ("iohub_04", "iohub_05")}
    channel = {"SEC61B": "GFP", "Phase3D": "Phase3D"}
    try:
        markers_seen = Counter()
        for batch in epoch(dm.train_dataloader()):
            real = _real(batch)
            markers = {batch["anchor_meta"][i]["marker"] for i in real}
            assert len(markers) == 1  # one marker a batch
            markers_seen.update(markers)
            for i in real:
                m, p = batch["anchor_meta"][i], batch["positive_meta"][i]
                assert p["marker"] == m["marker"]  # positive_channel_source="same"
                row = batch["index"][i]
                y0, x0 = expected_origin(row["y"], row["x"], PATCH)
                z = tuple(e["z_range"] for e in dm.info["experiments"] if e["name"] == m["experiment"])[0]
                expected = references[m["experiment"]].patch(row["fov_name"], row["t"], [channel[m["marker"]]], z, y0, x0, PATCH)
                np.testing.assert_array_equal(batch["anchor"][i].numpy(), expected)
        assert set(markers_seen) == {"SEC61B", "Phase3D"}
    finally:
        for r in references.values():
            r.close()
    anywhere = _dm(server, channels_per_sample=1, positive_channel_source="any", split_ratio=1.0, seed=1)
    pairs = [(b["anchor_meta"][i]["marker"], b["positive_meta"][i]["marker"]) for b in epoch(anywhere.train_dataloader()) for i in _real(b)]
    assert any(a != p for a, p in pairs) and any(a == p for a, p in pairs)


def test_fixed_channel_list_by_marker(server, data):
    root, _ = data
    dm = _dm(server, channels_per_sample=["Phase3D"], val_experiments=["iohub_05"])
    assert dm.channel_keys == ["Phase3D"] and dm.info["patch_shape"][0] == 1
    reference = IohubPlate(root / "iohub_05.zarr")
    z = tuple(dm.info["experiments"][1]["z_range"])
    try:
        batch = epoch(dm.val_dataloader())[0]
        for i, row in enumerate(batch["index"]):
            y0, x0 = expected_origin(row["y"], row["x"], PATCH)
            np.testing.assert_array_equal(batch["anchor"][i].numpy(), reference.patch(row["fov_name"], row["t"], ["Phase3D"], z, y0, x0, PATCH))
    finally:
        reference.close()


def test_group_weights_and_strata(server):
    dm = _dm(server, batch_group_by="experiment", stratify_by="perturbation", group_weights={"iohub_04": 1.0, "iohub_05": 0.0}, split_ratio=1.0)
    for batch in epoch(dm.train_dataloader()):
        assert {r["experiment"] for r in batch["index"]} == {"iohub_04"}
        counts = Counter(r["perturbation"] for r in batch["index"])
        assert set(counts) == {"infected", "uninfected"} and max(counts.values()) - min(counts.values()) <= 1
    two = _dm(server, batch_group_by=["experiment", "perturbation"], stratify_by=None, split_ratio=1.0,
              group_weights={"iohub_05|infected": 1.0})
    for batch in epoch(two.train_dataloader()):
        assert {(r["experiment"], r["perturbation"]) for r in batch["index"]} == {("iohub_05", "infected")}
    with pytest.raises(Exception, match="group_weights names 'iohub_06'"):
        _dm(server, batch_group_by="experiment", group_weights={"iohub_06": 1.0}, split_ratio=1.0)
    with pytest.raises(Exception, match="batch_group_by names column 'plate'"):
        _dm(server, batch_group_by="plate", split_ratio=1.0)


def test_positive_sources_and_labels(server):
    selfish = _dm(server, positive_cell_source="self", split_ratio=1.0)
    assert selfish.info["splits"]["train"]["items"] == selfish.info["splits"]["predict"]["items"]  # every cell anchors
    for batch in epoch(selfish.train_dataloader())[:3]:
        assert bool((batch["anchor"] == batch["positive"]).all())
    labelled = _dm(server, positive_match_columns=["perturbation"], label_columns={"pert": "perturbation"}, split_ratio=1.0)
    vocab = labelled.info["label_encoders"]["pert"]
    assert vocab == ["infected", "uninfected"]
    differs = 0
    for batch in epoch(labelled.train_dataloader()):
        for i in _real(batch):
            a, p = batch["anchor_meta"][i], batch["positive_meta"][i]
            assert a["perturbation"] == p["perturbation"]
            assert a["labels"]["pert"] == vocab.index(a["perturbation"]) == p["labels"]["pert"]
            assert (a["global_track_id"], a["t"]) != (p["global_track_id"], p["t"])  # never the anchor itself
            differs += a["lineage_id"] != p["lineage_id"]
    assert differs  # not the temporal lineage rule
    split = _dm(server, positive_match_columns=["perturbation"], val_experiments=["iohub_05"])
    for loader, name in ((split.train_dataloader(), "iohub_04"), (split.val_dataloader(), "iohub_05")):
        for batch in epoch(loader):
            assert {batch["positive_meta"][i]["experiment"] for i in _real(batch)} == {name}  # never across splits


def test_main_arguments_in_a_lightningcli_config(server, tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MultiExperimentDataModule, "data")
    config = tmp_path / "fit.yml"
    config.write_text(
        f"""data:
  collection_yaml: collection.yml
  z_window: 1
  z_extraction_window: 3
  z_focus_offset: 0.3
  focus_channel: Phase3D
  z_reduction: mip
  yx_patch_size: [24, 24]
  final_yx_patch_size: [24, 24]
  split_ratio: 0.5
  batch_group_by: marker
  stratify_by: [perturbation]
  channels_per_sample: 1
  positive_cell_source: lookup
  positive_match_columns: [lineage_id]
  positive_channel_source: same
  label_columns: {{pert: perturbation}}
  pin_memory: true
  buffer_size: 4
  prefetch_factor: 3
  shuffle_val: false
  recheck_cached_data: open
  file_io_concurrency: 8
  max_border_shift: -1
  reference_pixel_size_xy_um: 0.1494
  batch_size: 8
  server: {server.flight_uri}
"""
    )
    cfg = parser.parse_path(str(config))
    init = parser.instantiate_classes(cfg)
    dm = init.data
    assert isinstance(dm, MultiExperimentDataModule) and dm.hparams.z_reduction == "mip" and dm.prefetch == 3
    dm.setup("fit")
    assert dm.channel_keys == ["channel_0"] and dm.info["split_mode"] == "fov"
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["anchor"].shape[1:] == (1, 1, 24, 24)
    assert set(batch["anchor_meta"][0]["labels"]) == {"pert"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"z_range": [0, 3]}, r"either z_range or z_window"),
        ({"z_window": None}, r"either z_range or z_window"),
        ({"z_extraction_window": 2}, r"z_extraction_window 2 is smaller than z_window 3"),
        ({"z_window": 6}, r"Z window \(6 slices read\) is deeper than the plate's 4 slices"),
        ({"channels_per_sample": 2}, r"channels_per_sample as a number must be 1"),
        ({"channels_per_sample": ["Mito2"]}, r"channels_per_sample names 'Mito2', which is neither a marker"),
        ({"stratify_by": ["plate"]}, r"stratify_by names column 'plate'"),
        ({"positive_match_columns": ["gene_name"]}, r"positive_match_columns names column 'gene_name'"),
        ({"positive_cell_source": "random"}, r"positive_cell_source"),
        ({"max_border_shift": -2}, r"max_border_shift"),
        ({"split_ratio": 0}, r"split_ratio"),
        ({"label_columns": {"x": "nope"}}, r"label_columns names column 'nope'"),
        ({"cell_index_path": "missing.parquet", "collection_yaml": None}, r"missing.parquet"),
    ],
)
def test_bad_main_form_configs_are_refused_naming_the_key(server, overrides, message):
    from cellfeed.client import RequestError
    from cellfeed.client.connection import Connection

    config = {"collection_yaml": "collection.yml", "z_window": 3, "yx_patch_size": [24, 24], "batch_size": 8}
    config.update(overrides)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(RequestError, match=message):
        Connection(server.flight_uri).open_session("dynaclr", config)
