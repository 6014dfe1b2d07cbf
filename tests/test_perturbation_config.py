"""TOML configs in protoplast's and cell-load's schemas, resolved inside the data root."""

from __future__ import annotations

import pytest

from cellfeed.server.errors import CellfeedError
from cellfeed.server.paths import DataRoot
from cellfeed.server.kinds.perturbation.config import PerturbationConfig, resolve_files


@pytest.fixture
def root(tmp_path):
    for rel in ("a/k562.h5ad", "a/rpe1.h5ad", "a/hepg2.h5", "b/jurkat.h5ad", "b/readme.txt"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    return DataRoot(tmp_path)


def files(root, toml: str):
    return resolve_files(PerturbationConfig.parse({"toml": toml}), root)


def test_brace_glob_directory_and_plain_paths(root):
    found = files(root, '[datasets]\nbrace = "a/{k562,rpe1}.h5ad"\nglob = "a/*.h5"\ndir = "b"\n')
    got = {(f.dataset, f.stem) for f in found.files}
    assert got == {("brace", "k562"), ("brace", "rpe1"), ("glob", "hepg2"), ("dir", "jurkat")}
    absolute = files(root, f'[datasets]\nabs = "{root.path}/a/k562.h5ad"\n')
    assert [f.label for f in absolute.files] == ["a/k562.h5ad"]


def test_cell_load_loads_only_named_datasets(root):
    found = files(root, '[datasets]\nx = "a/k562.h5ad"\ny = "b"\n[training]\nx = "train"\n')
    assert {f.dataset for f in found.files} == {"x"}


def test_protoplast_loads_every_dataset_and_reads_opts(root):
    found = files(root, '[datasets]\nx = "a/k562.h5ad"\ny = "b"\n[dataset_opts]\nn_basal_samples = 8\n[loader]\nnum_workers = 2\n')
    assert {f.dataset for f in found.files} == {"x", "y"}
    assert found.dataset_opts == {"n_basal_samples": 8}


def test_zeroshot_and_fewshot_rules_attach_to_their_dataset(root):
    found = files(
        root,
        '[datasets]\nx = "a/{k562,rpe1}.h5ad"\n[zeroshot]\n"x.k562" = "val"\n'
        '[fewshot."x.rpe1"]\nval = ["G1"]\ntest = ["G2", "G1"]\n',
    )
    spec = found.files[0]
    assert spec.zeroshot == {"k562": "val"}
    assert spec.fewshot == {"rpe1": {"G1": "test", "G2": "test"}}  # listed twice: the later wins


@pytest.mark.parametrize(
    "toml,message",
    [
        ('[datasets]\nx = "../etc/k562.h5ad"\n', "outside the server's data root"),
        ('[datasets]\nx = "a/none.h5ad"\n', "file not found: 'a/none.h5ad'"),
        ('[datasets]\nx = "b/*.h5ad5"\n', "matches no .h5ad file"),
        ('[datasets]\n', r"\[datasets\] is missing or empty"),
        ('[datasets]\nx = "a/k562.h5ad"\n[training]\ny = "train"\n', "names dataset 'y'"),
        ('[datasets]\nx = "a/k562.h5ad"\n[training]\nx = "everything"\n', "is not a split name"),
        ('[datasets]\nx = "a/k562.h5ad"\n[zeroshot]\nk562 = "val"\n', 'must be "dataset.celltype"'),
        ('[datasets]\nx = "a/k562.h5ad"\n[fewshot."x.k562"]\nval = "G1"\n', "must be a list of target names"),
    ],
)
def test_config_errors_name_the_key(root, toml, message):
    with pytest.raises(CellfeedError, match=message):
        files(root, toml)


def test_exactly_one_of_files_or_toml():
    with pytest.raises(CellfeedError, match="exactly one of `files` or a TOML config"):
        PerturbationConfig.parse({})


def test_a_training_table_selects_cell_loads_schema(root):
    assert files(root, '[datasets]\nx = "a/k562.h5ad"\n[training]\nx = "train"\n').schema == "cell-load"
    assert files(root, '[datasets]\nx = "a/k562.h5ad"\n').schema == "protoplast"
    forced = resolve_files(
        PerturbationConfig.parse({"toml": '[datasets]\nx = "a/k562.h5ad"\n[training]\nx = "val"\n', "toml_schema": "protoplast"}), root
    )
    assert forced.schema == "protoplast" and forced.files[0].split == "train"  # protoplast ignores [training]
    assert any("[training] is ignored" in w for w in forced.warnings)


def test_cell_load_fewshot_lists_may_overlap(root):
    found = files(
        root,
        '[datasets]\nx = "a/{k562,rpe1}.h5ad"\n[training]\nx = "train"\n'
        '[fewshot."x.rpe1"]\nval = ["G1", "G3"]\ntest = ["G2", "G1"]\n',
    )
    assert found.files[0].fewshot == {"rpe1": {"G1": ("val", "test"), "G2": ("test",), "G3": ("val",)}}


def test_cell_load_training_other_than_train_drops_unnamed_cell_types(root):
    found = files(root, '[datasets]\nx = "a/k562.h5ad"\ny = "b"\n[training]\nx = "val"\ny = "train"\n')
    split = {f.dataset: f.split for f in found.files}
    assert split == {"x": None, "y": "train"}
    assert any("[training] x = 'val'" in w for w in found.warnings)


def test_cell_load_loads_datasets_named_only_by_rules(root):
    found = files(root, '[datasets]\nx = "a/k562.h5ad"\ny = "b"\n[training]\ny = "train"\n[zeroshot]\n"x.k562" = "test"\n')
    split = {f.dataset: f.split for f in found.files}
    assert split == {"x": None, "y": "train"}  # x is loaded for its rule; its other cell types are not
