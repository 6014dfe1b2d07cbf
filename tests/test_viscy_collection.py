"""Port of VisCy main's `packages/viscy-data/tests/test_collection.py` (mehta-lab/VisCy, branch
main, commit 4b62365c0df25929bffc7f01b3bb2d1c11d69cce): the collection YAML (validation, I/O,
per-channel wells, `${datasets_root}`).

VisCy validates a `Collection` in process; cellfeed reads the collection when a session opens
(`collection_yaml`, the file or the YAML text), so a collection VisCy accepts is a session a real
server on loopback opens over iohub plates, and one VisCy refuses is a refused session.
`build_collection` / `_group_records` (collections built from Airtable FOV records) and
`save_collection` have no counterpart: cellfeed only reads collections. Their tests are listed
in docs/dynaclr.md ("Ported VisCy tests"); the per-channel `wells` they produce are tested here on
what the server streams.
"""

from __future__ import annotations

import pytest
import yaml

from cellfeed.client import MultiExperimentDataModule, RequestError
from tests.fixtures.viscy_ports import make_experiment, ported_server, standard_tracks


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with ported_server(tmp_path_factory, "viscy-collection") as p:
        yield p


@pytest.fixture(scope="module")
def plate(ported):
    """exp1: Phase3D and mCherry, wells B/1, B/2, B/3 (uninfected) and C/2 (infected)."""
    return make_experiment(ported.folder("exp1"), "exp1", ["Phase3D", "mCherry"], ["B/1", "B/2", "B/3", "C/2"],
                           {"uninfected": ["B/1", "B/2", "B/3"], "infected": ["C/2"]}, zyx=(1, 32, 32),
                           tracks=standard_tracks(y=16.0, x=16.0))


def _entry(plate, name="exp1", **kw) -> dict:
    entry = {
        "name": name,
        "data_path": plate["data_path"],
        "tracks_path": plate["tracks_path"],
        "channels": [{"name": "Phase3D", "marker": "Phase3D"}, {"name": "mCherry", "marker": "mCherry"}],
        "channel_names": ["Phase3D", "mCherry"],
        "perturbation_wells": {"mock": ["B/1", "B/2", "B/3"], "infected": ["C/2"]},
        "interval_minutes": 15.0,
    }
    entry.update(kw)
    return entry


def _collection(*entries, **kw) -> dict:
    return {"name": kw.pop("name", "test_collection"), "experiments": list(entries), **kw}


def _dm(ported, collection, **kw) -> MultiExperimentDataModule:
    text = collection if isinstance(collection, str) else yaml.safe_dump(collection, sort_keys=False)
    return MultiExperimentDataModule(collection_yaml=text, z_range=(0, 1), yx_patch_size=(16, 16), final_yx_patch_size=(16, 16),
                                     batch_size=8, server=ported.server.flight_uri, **kw)


def _info(ported, collection, **kw) -> dict:
    dm = _dm(ported, collection, **kw)
    dm.setup("fit")
    return dm.info


def _refused(ported, collection, pattern: str) -> None:
    with pytest.raises(RequestError, match=pattern):
        _info(ported, collection)


# -- validation ------------------------------------------------------------------------------------

def test_valid_collection(ported, plate):
    info = _info(ported, _collection(_entry(plate)))
    assert info["form"] == "collection_yaml"
    assert [e["name"] for e in info["experiments"]] == ["exp1"]


def test_duplicate_experiment_names(ported, plate):
    _refused(ported, _collection(_entry(plate, "dup"), _entry(plate, "dup")), r"dup.*(more than once|[Dd]uplicate)")


def test_zero_interval_minutes_allowed(ported, plate):
    # Documented difference: VisCy main accepts interval_minutes 0 (non-timelapse data); cellfeed
    # refuses it, because a temporal positive (tau in frames) needs a frame interval.
    _refused(ported, _collection(_entry(plate, interval_minutes=0.0)), "interval_minutes")


def test_negative_interval_minutes(ported, plate):
    _refused(ported, _collection(_entry(plate, interval_minutes=-5.0)), "interval_minutes")


def test_perturbation_wells_empty(ported, plate):
    _refused(ported, _collection(_entry(plate, perturbation_wells={})), "perturbation_wells")


# -- I/O -------------------------------------------------------------------------------------------

def test_round_trip(ported, plate):
    """The collection as a file in the data root and as text: the same experiments, channels, wells."""
    collection = _collection(_entry(plate), description="round-trip test")
    folder = ported.folder("round-trip")
    (folder / "collection.yml").write_text(yaml.safe_dump(collection, sort_keys=False))
    from_file = _info(ported, str((folder / "collection.yml").relative_to(ported.root)))
    from_text = _info(ported, collection)
    for info in (from_file, from_text):
        (exp,) = info["experiments"]
        assert exp["name"] == "exp1" and exp["channel_names"] == ["Phase3D", "mCherry"]
        assert exp["markers"] == ["Phase3D", "mCherry"] and exp["interval_minutes"] == 15.0
        assert sorted(exp["conditions"]) == ["infected", "mock"]
    assert from_file["experiments"] == from_text["experiments"]


# test_groups_by_dataset, test_splits_multi_marker_dataset, test_single_marker_dataset_not_split:
# no counterpart (build_collection from Airtable FOV records; cellfeed reads collections only).


# -- per-channel wells -----------------------------------------------------------------------------

def _served(ported, collection) -> set[tuple[str, str]]:
    """(marker, well) of every sample of a training epoch and of validation, one channel per sample."""
    dm = _dm(ported, collection, channels_per_sample=1, split_ratio=0.75)
    dm.setup("fit")
    out = set()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for batch in loader:
            for meta, pad in zip(batch["anchor_meta"], batch["padding"].tolist()):
                if not pad:
                    out.add((meta["marker"], meta["fov_name"].rsplit("/", 1)[0]))
    return out


def test_wells_auto_populated_for_partial_channel(ported, plate):
    # What build_collection writes (the viral sensor valid only in B/3 and C/2) is served so.
    channels = [{"name": "Phase3D", "marker": "Phase3D"}, {"name": "mCherry", "marker": "pAL40", "wells": ["B/3", "C/2"]}]
    served = _served(ported, _collection(_entry(plate, channels=channels)))
    assert {w for m, w in served if m == "pAL40"} == {"B/3", "C/2"}
    assert {w for m, w in served if m == "Phase3D"} == {"B/1", "B/2", "B/3", "C/2"}


def test_wells_empty_when_all_wells_have_marker(ported, plate):
    served = _served(ported, _collection(_entry(plate)))
    assert {w for m, w in served if m == "mCherry"} == {w for m, w in served if m == "Phase3D"} == {"B/1", "B/2", "B/3", "C/2"}


def test_wells_round_trips_yaml(ported, plate):
    channels = [{"name": "Phase3D", "marker": "Phase3D"}, {"name": "mCherry", "marker": "pAL40", "wells": ["B/3", "C/2"]}]
    folder = ported.folder("wells")
    (folder / "col.yml").write_text(yaml.safe_dump(_collection(_entry(plate, channels=channels))))
    served = _served(ported, str((folder / "col.yml").relative_to(ported.root)))
    assert {w for m, w in served if m == "pAL40"} == {"B/3", "C/2"}


def test_channel_entry_wells_default_empty(ported, plate):
    # A channel given without `wells` is valid in every well.
    channels = [{"name": "Phase3D", "marker": "Phase3D"}]
    served = _served(ported, _collection(_entry(plate, channels=channels)))
    assert served == {("Phase3D", w) for w in ("B/1", "B/2", "B/3", "C/2")}


# -- ${datasets_root} ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rooted(ported):
    """Plates under {root}/datasets/exp1 and {root}/datasets/exp2 (tracks of exp2 elsewhere)."""
    base = ported.folder("datasets_root")
    exp1 = make_experiment(base / "datasets" / "exp1", "exp1", ["Phase3D"], ["A/1"], {"mock": ["A/1"]}, source_channel=["Phase3D"],
                           zyx=(1, 32, 32), tracks=standard_tracks(y=16.0, x=16.0))
    exp2 = make_experiment(base / "datasets" / "exp2", "exp2", ["Phase3D"], ["A/1"], {"mock": ["A/1"]}, source_channel=["Phase3D"],
                           zyx=(1, 32, 32), tracks=standard_tracks(y=16.0, x=16.0))
    return base, exp1, exp2


def _minimal(name, data_path, tracks_path) -> dict:
    return {"name": name, "data_path": data_path, "tracks_path": tracks_path,
            "channels": [{"name": "Phase3D", "marker": "Phase3D"}], "perturbation_wells": {"mock": ["A/1"]}}


def test_resolve_datasets_root(ported, rooted):
    base, exp1, _ = rooted
    collection = {"name": "test", "datasets_root": str(base), "experiments": [
        _minimal("exp1", "${datasets_root}/datasets/exp1/exp1.zarr", "${datasets_root}/datasets/exp1/tracks_exp1")]}
    (exp,) = _info(ported, collection, split_ratio=1.0)["experiments"]
    assert exp["data_path"] == exp1["data_path"]


# test_round_trip_preserves_templates: no counterpart (save_collection).


def test_mixed_paths_non_root_stays_absolute(ported, rooted):
    base, _, exp2 = rooted
    collection = {"name": "test", "datasets_root": str(base), "experiments": [
        _minimal("exp_vast", "${datasets_root}/datasets/exp1/exp1.zarr", "${datasets_root}/datasets/exp1/tracks_exp1"),
        _minimal("exp_nfs", "${datasets_root}/datasets/exp2/exp2.zarr", exp2["tracks_path"]),  # absolute, not templated
    ]}
    info = _info(ported, collection, split_ratio=1.0)
    assert [e["name"] for e in info["experiments"]] == ["exp_vast", "exp_nfs"]
    assert all(e["rows"] == 50 for e in info["experiments"])


def test_no_datasets_root_passthrough(ported, rooted):
    _, exp1, _ = rooted
    collection = {"name": "test", "experiments": [_minimal("exp1", exp1["data_path"], exp1["tracks_path"])]}
    (exp,) = _info(ported, collection, split_ratio=1.0)["experiments"]
    assert exp["data_path"] == exp1["data_path"] and exp["rows"] == 50
