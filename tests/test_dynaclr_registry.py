"""Experiments YAML: parsing, VisCy's validations (each a clear error), channel maps, tau in frames."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from cellfeed.server.kinds.dynaclr.registry import ExperimentRegistry, check_plate
from cellfeed.server.errors import CellfeedError
from cellfeed.server.paths import DataRoot
from cellfeed.server.reading.omezarr import open_plate
from tests.fixtures.plates import make_dynaclr_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dynaclr_data(tmp_path_factory.mktemp("dynaclr-registry") / "data")


def _doc(data) -> dict:
    return yaml.safe_load(data.yaml_text)


def _error(doc: dict) -> str:
    with pytest.raises(CellfeedError) as err:
        ExperimentRegistry.from_yaml(yaml.safe_dump(doc))
    return str(err.value)


def test_reads_both_experiments_with_channel_maps(data):
    registry = ExperimentRegistry.from_yaml(data.yaml_text)
    assert registry.names == ["sec61", "tomm20"]
    assert registry.num_source_channels == 2
    sec61, tomm20 = registry.experiments
    assert sec61.channel_map == [0, 1]
    assert tomm20.channel_map == [1, 0]  # RFP is zarr channel 0, Phase3D channel 1
    assert sec61.interval_minutes == 30.0 and tomm20.start_hpi == 2.0
    assert sec61.organelle == "endoplasmic_reticulum" and tomm20.moi == 0.5
    assert tomm20.well_condition == {"A/1": "uninfected", "B/1": "infected"}


def test_tau_range_in_frames_follows_each_interval(data):
    sec61, tomm20 = ExperimentRegistry.from_yaml(data.yaml_text).experiments
    assert sec61.tau_range_frames((0.5, 2.0)) == (1, 4)
    assert tomm20.tau_range_frames((0.5, 2.0)) == (2, 8)
    assert sec61.tau_range_frames((0.5, 0.5)) == (1, 1)


def test_tau_range_empty_at_an_interval_is_an_error(data):
    sec61 = ExperimentRegistry.from_yaml(data.yaml_text).experiments[0]
    with pytest.raises(CellfeedError, match=r"sec61.*\[0, 0\] frames at 30.0 min"):
        sec61.tau_range_frames((0.1, 0.2))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["experiments"][0].update(colour="red"), r"experiment 'sec61'.*unknown key 'colour'"),
        (lambda d: d.update(defaults={}), r"unknown top-level key 'defaults'"),
        (lambda d: d["experiments"][1].update(name="sec61"), r"'sec61' appears more than once"),
        (lambda d: d["experiments"][0].update(interval_minutes=0), r"sec61.*interval_minutes must be > 0"),
        (lambda d: d["experiments"][0].update(condition_wells={}), r"sec61.*condition_wells is empty"),
        (
            lambda d: d["experiments"][0].update(source_channel=["Phase3D", "RFP"]),
            r"source_channel 'RFP' is not in channel_names",
        ),
        (lambda d: d["experiments"][1].update(source_channel=["Phase3D"]), r"same number of source channels"),
        (lambda d: d["experiments"][0]["condition_wells"].update(mock=["A/1"]), r"'A/1' is in both conditions"),
        (lambda d: d["experiments"][0].pop("tracks_path"), r"sec61.*tracks_path.*[Ff]ield required"),
        (lambda d: d.update(experiments=[]), r"non-empty list"),
    ],
)
def test_each_validation_names_the_fault(data, mutate, message):
    doc = copy.deepcopy(_doc(data))
    mutate(doc)
    error = _error(doc)
    assert re.search(message, error), error


def test_invalid_yaml_is_an_error():
    with pytest.raises(CellfeedError, match="not valid YAML"):
        ExperimentRegistry.from_yaml("experiments: [name: {")


def test_paths_resolve_inside_the_data_root(data, tmp_path):
    registry = ExperimentRegistry.from_yaml(data.yaml_text)
    paths = registry.resolve_paths(DataRoot(data.root))
    assert paths["tomm20"] == (data.plate("tomm20").resolve(), data.tracks("tomm20").resolve())

    doc = _doc(data)
    doc["experiments"][0]["data_path"] = "missing.zarr"
    with pytest.raises(CellfeedError, match=r"experiment 'sec61': data_path: file not found: 'missing.zarr'"):
        ExperimentRegistry.from_yaml(yaml.safe_dump(doc)).resolve_paths(DataRoot(data.root))
    doc["experiments"][0]["data_path"] = str(tmp_path)
    with pytest.raises(CellfeedError, match="outside the server's data root"):
        ExperimentRegistry.from_yaml(yaml.safe_dump(doc)).resolve_paths(DataRoot(data.root))


def test_plate_channels_and_wells_must_match(data):
    registry = ExperimentRegistry.from_yaml(data.yaml_text)
    plate = open_plate(data.plate("sec61"), "sec61.zarr")
    check_plate(registry.experiments[0], plate)

    doc = _doc(data)
    doc["experiments"][0]["channel_names"] = ["GFP", "Phase3D", "Mito"]
    swapped = ExperimentRegistry.from_yaml(yaml.safe_dump(doc)).experiments[0]
    with pytest.raises(CellfeedError, match=r"channel_names \['GFP', 'Phase3D', 'Mito'\] differ .* sec61.zarr/A/1/0"):
        check_plate(swapped, plate)

    doc = _doc(data)
    doc["experiments"][0]["condition_wells"]["mock"] = ["C/4"]
    extra = ExperimentRegistry.from_yaml(yaml.safe_dump(doc)).experiments[0]
    with pytest.raises(CellfeedError, match=r"condition 'mock' names well 'C/4'.*wells: A/1, B/1"):
        check_plate(extra, plate)
