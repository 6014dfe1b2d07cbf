"""VisCy main's collection YAML as the DataModule's input, against a real server on iohub plates.

The collection is mapped onto the same registry and index as the experiments_yaml form, so the
same experiments described both ways must stream the very same batches; and the collection's own
fields (channel markers, per-experiment exclude_fovs, ${datasets_root}, microscope, pixel sizes)
must show in what the server reports and sends.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from cellfeed.client import MultiExperimentDataModule, RequestError
from cellfeed.client.connection import Connection
from tests.fixtures.dynaclr_main import server, write_main_data  # noqa: F401 (server: a fixture)
from tests.fixtures.ecosystem_plates import IohubPlate
from tests.fixtures.plates import expected_origin
from tests.helpers import epoch

PATCH = (24, 24)
Z_RANGE = (1, 4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root, legacy = write_main_data(tmp_path_factory.mktemp("dynaclr-main-collection") / "data")
    doc = yaml.safe_load((root / "experiments.yml").read_text())
    doc["experiments"][1]["microscope"] = "dragonfly"
    (root / "experiments.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root, legacy




COMMON = dict(
    z_range=Z_RANGE,
    yx_patch_size=PATCH,
    final_yx_patch_size=PATCH,
    val_experiments=["iohub_05"],
    tau_range=(0.5, 1.5),
    batch_size=8,
    num_workers=2,
    return_index=True,
    max_border_shift=-1,
)


def test_collection_streams_the_same_batches_as_the_experiments_yaml_form(server, data):
    root, legacy = data
    main = MultiExperimentDataModule(collection_yaml="collection.yml", batch_group_by="experiment", server=server.flight_uri, **COMMON)
    old = MultiExperimentDataModule(experiments_yaml="experiments.yml", exclude_fovs=None, server=server.flight_uri, **COMMON)
    main.setup("fit")
    old.setup("fit")
    # The legacy form has no per-experiment exclude: one FOV more there.
    assert main.info["form"] == "collection_yaml" and old.info["form"] == "experiments_yaml"
    assert main.info["experiments"][0]["fovs"] == 3 and old.info["experiments"][0]["fovs"] == 4
    assert "B/2/1" not in {r["fov_name"] for b in epoch(main.train_dataloader()) for r in b["index"]}
    assert main.info["experiments"][1]["microscope"] == "dragonfly"
    assert main.info["experiments"][0]["markers"] == ["SEC61B", "Phase3D"]
    assert main.channel_keys == ["SEC61B", "Phase3D"]  # VisCy main's transform keys: the markers
    assert old.channel_keys == ["ch_0", "ch_1"]
    # Validation (the 0.5 plate, no exclusions): the same anchors either way, pixel for pixel. The
    # main form draws them with the training sampler (VisCy main), the experiments_yaml form in
    # order, so batches differ in order (tests/test_viscy_main_datamodule.py checks the draw).
    main_val, old_val = val_anchors(main.val_dataloader()), val_anchors(old.val_dataloader())
    assert main_val.keys() == old_val.keys() and main_val
    for key, anchor in main_val.items():
        assert torch_equal(anchor, old_val[key])


def val_anchors(loader) -> dict:
    """Each validation anchor's patch, keyed by (fov_name, track_id, t); padding left out."""
    return {
        (r["fov_name"], r["track_id"], r["t"]): b["anchor"][i]
        for b in epoch(loader)
        for i, (r, pad) in enumerate(zip(b["index"], b["padding"].tolist()))
        if not pad
    }


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_collection_batches_carry_main_metadata_and_iohub_pixels(server, data):
    root, legacy = data
    dm = MultiExperimentDataModule(collection_yaml="collection.yml", server=server.flight_uri, **COMMON)
    dm.setup("fit")
    name = legacy[0]["name"]
    reference = IohubPlate(root / f"{name}.zarr")
    try:
        batches = epoch(dm.train_dataloader())
        assert batches
        for batch in batches:
            meta = batch["anchor_meta"]
            assert len(meta) == len(batch["index"]) == batch["anchor"].shape[0]
            for i, (row, m) in enumerate(zip(batch["index"], meta)):
                assert m["experiment"] == row["experiment"] == name
                assert m["marker"] == "SEC61B" and row["marker"] == "SEC61B"
                assert m["microscope"] == "mantis" and row["microscope"] == "mantis"
                assert m["perturbation"] == row["condition"] == row["perturbation"]
                assert m["global_track_id"] == f"{name}_{row['fov_name']}_{row['track_id']}"
                assert m["store_path"] == f"{name}.zarr" or m["store_path"].endswith(f"/{name}.zarr")
                if batch["padding"][i]:
                    continue
                y0, x0 = expected_origin(row["y"], row["x"], PATCH)
                expected = reference.patch(row["fov_name"], row["t"], ["GFP", "Phase3D"], Z_RANGE, y0, x0, PATCH)
                np.testing.assert_array_equal(batch["anchor"][i].numpy(), expected)
                pm = batch["positive_meta"][i]
                assert pm["lineage_id"] == m["lineage_id"] and pm["t"] > m["t"]
    finally:
        reference.close()


def test_collection_refusals_name_the_fault(server, data):
    root, _ = data
    conn = Connection(server.flight_uri)
    doc = yaml.safe_load((root / "collection.yml").read_text())
    doc["experiments"][0]["channels"][0]["name"] = "GFP2"
    with pytest.raises(RequestError, match=r"channel 'GFP2' is not one of the plate's channels"):
        conn.open_session("dynaclr", {"collection_yaml": yaml.safe_dump(doc), "z_range": [0, 3], "yx_patch_size": [24, 24]})
    doc = yaml.safe_load((root / "collection.yml").read_text())
    doc["experiments"][0]["perturbaton_wells"] = {}
    with pytest.raises(RequestError, match=r"unknown key 'perturbaton_wells'"):
        conn.open_session("dynaclr", {"collection_yaml": yaml.safe_dump(doc), "z_range": [0, 3], "yx_patch_size": [24, 24]})
    with pytest.raises(RequestError, match=r"exactly one of experiments_yaml, collection_yaml, cell_index_path"):
        conn.open_session("dynaclr", {"collection_yaml": "collection.yml", "experiments_yaml": "experiments.yml", "z_range": [0, 3]})
