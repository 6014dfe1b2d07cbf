"""cell-load's TOML semantics: the same cells in train, val and test as cell-load 0.10.4 itself.

Real h5ad files with the obs columns cell-load's screens use (`gene`, `cell_type`, `gem_group`,
"non-targeting" controls, several cell types per file), one real server on loopback, and
cell-load's own PerturbationDataModule run on the same files and TOMLs. Compared: the perturbed
cells (by obs_name) of each split. cell-load also serves control cells as items
(`should_yield_control_cells`); cellfeed serves controls only as matched controls, on purpose
(docs/protocol/perturbation.md), so controls are left out of the comparison.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cell_load.data_modules as cell_load_dm  # a dev dependency (pyproject.toml), pinned to 0.10.4

from cellfeed.client import PerturbationDataModule
from tests.conftest import ServerProcess

CONTROL = "non-targeting"
TARGETS = [f"G{i:03d}" for i in range(6)]
# dataset -> file -> cell types in it (cell types interleave within each target's rows)
DATASETS = {
    "screen_a": {"plate1": ["k562", "rpe1"], "plate2": ["hepg2"]},
    "screen_b": {"pool": ["jurkat", "a549"]},
}


def write_screen(path: Path, cell_types: list[str], seed: int) -> None:
    """A file sorted by gene then gem_group, controls contiguous, categorical obs as in real screens."""
    rng = np.random.default_rng(seed)
    rows = []
    for target in TARGETS + [CONTROL]:
        for ct in cell_types:
            n = int(rng.integers(6, 15)) if target != CONTROL else 30
            rows += [(target, ct, f"gem{int(b)}") for b in rng.integers(1, 4, n)]
    obs = pd.DataFrame(rows, columns=["gene", "cell_type", "gem_group"])
    obs = obs.sort_values(["gene", "gem_group"], kind="stable").reset_index(drop=True)
    for col in obs:
        obs[col] = pd.Categorical(obs[col])
    obs.index = [f"{path.stem}_{i:05d}" for i in range(len(obs))]
    X = sp.random(len(obs), 20, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(20)])).write_h5ad(path)


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    root = tmp_path_factory.mktemp("cell_load_splits") / "data"
    seed = 0
    for dataset, files in DATASETS.items():
        for stem, cell_types in files.items():
            write_screen(root / dataset / f"{stem}.h5ad", cell_types, seed)
            seed += 1
    server = ServerProcess(root)
    server.start()
    yield root, server
    server.stop()


def _datasets(root: Path) -> str:
    # screen_a: a brace pattern of files; screen_b: a directory (both as cell-load reads them)
    return f'[datasets]\nscreen_a = "{root}/screen_a/{{plate1,plate2}}.h5ad"\nscreen_b = "{root}/screen_b"\n'


def cell_load_splits(toml: Path) -> dict[str, set[str]]:
    """The perturbed cells (obs_names) of each split, as cell-load 0.10.4's own code makes them."""
    dm = cell_load_dm.PerturbationDataModule(
        toml_config_path=str(toml), pert_col="gene", batch_col="gem_group", cell_type_key="cell_type",
        control_pert=CONTROL, num_workers=0, batch_size=2, cell_sentence_len=4,
    )
    dm.setup()
    names: dict[str, np.ndarray] = {}
    out: dict[str, set[str]] = {}
    for split, subsets in (("train", dm.train_datasets), ("val", dm.val_datasets), ("test", dm.test_datasets)):
        cells: set[str] = set()
        for subset in subsets:
            ds = subset.dataset
            path = str(ds.h5_path)
            if path not in names:
                names[path] = np.asarray(ad.read_h5ad(path, backed="r").obs_names)
            idx = np.asarray(subset.indices)
            cache = ds.metadata_cache
            perturbed = idx[cache.pert_codes[idx] != cache.control_pert_code]
            cells |= set(names[path][perturbed])
        out[split] = cells
    return out


def cellfeed_splits(server: ServerProcess, toml: Path, **kwargs) -> tuple[dict[str, set[str]], PerturbationDataModule]:
    """The real cells (cell_mask) of each split as cellfeed serves them; each must come once."""
    dm = PerturbationDataModule(
        config_path=str(toml), target_label="gene", batch_label="gem_group", cell_type_label="cell_type",
        control_label=CONTROL, group_size_S=4, batch_size=3, barcodes=True, num_workers=2, server=server.flight_uri,
        **kwargs,
    )
    dm.setup("fit")
    out: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        served = [b["pert_cell_barcode"][b["cell_mask"].numpy()] for b in dm.loader(split)] if len(dm.loader(split)) else []
        cells = np.concatenate(served) if served else np.zeros(0, str)
        repeats = [c for c, n in Counter(cells.tolist()).items() if n > 1]
        assert not repeats, f"{split}: cells served twice in one pass: {repeats[:5]}"
        out[split] = set(cells.tolist())
    return out, dm


TOMLS = {
    # a target listed under both val and test is in both
    "fewshot_val_and_test_overlap": (
        '[training]\nscreen_a = "train"\n[zeroshot]\n'
        '[fewshot."screen_a.rpe1"]\nval = ["G000", "G001"]\ntest = ["G001", "G002"]\n'
    ),
    # screen_a is named only in [zeroshot]: its other cell types are not loaded
    "dataset_only_in_rules": '[training]\nscreen_b = "train"\n[zeroshot]\n"screen_a.k562" = "test"\n',
    # [training] = "val" does not move a dataset to val: it is not loaded, except what rules name
    "training_val_is_not_a_split": (
        '[training]\nscreen_a = "val"\nscreen_b = "train"\n[fewshot."screen_a.hepg2"]\nval = ["G003"]\n'
    ),
    # zeroshot and fewshot in one file, zeroshot beating fewshot, a zeroshot split of "train"
    "mixed_rules": (
        '[training]\nscreen_a = "train"\nscreen_b = "train"\n'
        '[zeroshot]\n"screen_a.hepg2" = "val"\n"screen_b.a549" = "train"\n"screen_a.k562" = "test"\n'
        '[fewshot."screen_b.jurkat"]\nval = ["G004"]\ntest = ["G005", "G000"]\n'
        '[fewshot."screen_a.k562"]\nval = ["G001"]\n'
    ),
    # rules naming a cell type and targets the files lack: accepted, as cell-load does
    "unknown_names": (
        '[training]\nscreen_a = "train"\n[zeroshot]\n"screen_a.hela" = "test"\n'
        '[fewshot."screen_a.rpe1"]\nval = ["G999", "G002"]\ntest = ["G003"]\n'
    ),
}


@pytest.mark.parametrize("strategy", ["random", "batch"])
@pytest.mark.parametrize("name", sorted(TOMLS))
def test_splits_equal_cell_loads_on_the_same_files(screens, tmp_path, name, strategy):
    root, server = screens
    toml = tmp_path / f"{name}.toml"
    toml.write_text(_datasets(root) + TOMLS[name])
    expected = cell_load_splits(toml)
    got, dm = cellfeed_splits(server, toml, basal_mapping_strategy=strategy)
    assert dm.info["toml_schema"] == "cell-load"
    for split in ("train", "val", "test"):
        assert got[split] == expected[split], (
            f"{split}: {len(got[split])} cells here, {len(expected[split])} in cell-load; "
            f"only here: {sorted(got[split] - expected[split])[:5]}, only cell-load: {sorted(expected[split] - got[split])[:5]}"
        )
    assert any(expected.values())


def test_overlapping_fewshot_target_is_in_val_and_test(screens, tmp_path):
    root, server = screens
    toml = tmp_path / "overlap.toml"
    toml.write_text(_datasets(root) + TOMLS["fewshot_val_and_test_overlap"])
    got, dm = cellfeed_splits(server, toml)
    obs = ad.read_h5ad(root / "screen_a" / "plate1.h5ad", backed="r").obs
    both = got["val"] & got["test"]
    assert both == set(obs.index[(obs.gene == "G001") & (obs.cell_type == "rpe1")])
    assert not both & got["train"]


def test_unknown_rule_names_are_warned_about_and_listed(screens, tmp_path):
    root, server = screens
    toml = tmp_path / "unknown.toml"
    toml.write_text(_datasets(root) + TOMLS["unknown_names"])
    _, dm = cellfeed_splits(server, toml)
    listed = {(r["table"], r["kind"], r["name"]) for r in dm.info["unknown_rules"]}
    assert listed == {("zeroshot", "cell type", "hela"), ("fewshot", "target", "G999")}
    assert any("hela" in w for w in dm.info["warnings"]) and any("G999" in w for w in dm.info["warnings"])


def test_training_value_other_than_train_is_warned_about(screens, tmp_path):
    root, server = screens
    toml = tmp_path / "val.toml"
    toml.write_text(_datasets(root) + TOMLS["training_val_is_not_a_split"])
    _, dm = cellfeed_splits(server, toml)
    assert any("[training] screen_a = 'val'" in w for w in dm.info["warnings"])


def test_protoplast_schema_keeps_protoplasts_meaning(screens, tmp_path):
    """No [training] table: protoplast's schema. Every dataset is loaded and trained on, and a
    fewshot target listed twice goes to the later split."""
    root, server = screens
    toml = tmp_path / "protoplast.toml"
    toml.write_text(_datasets(root) + '[fewshot."screen_a.rpe1"]\nval = ["G000", "G001"]\ntest = ["G001"]\n')
    got, dm = cellfeed_splits(server, toml)
    assert dm.info["toml_schema"] == "protoplast"
    obs = pd.concat(
        [ad.read_h5ad(p, backed="r").obs for p in sorted(root.glob("*/*.h5ad"))]
    )
    perturbed = obs[obs.gene != CONTROL]
    rpe1 = perturbed[perturbed.cell_type == "rpe1"]
    assert got["val"] == set(rpe1.index[rpe1.gene == "G000"])
    assert got["test"] == set(rpe1.index[rpe1.gene == "G001"])
    assert got["train"] == set(perturbed.index) - got["val"] - got["test"]


def test_toml_schema_can_be_named(screens, tmp_path):
    """The same TOML read under each schema: cell-load's drops screen_b (not named by any rule)."""
    root, server = screens
    toml = tmp_path / "named.toml"
    toml.write_text(_datasets(root) + '[zeroshot]\n"screen_a.k562" = "test"\n')
    kwargs = dict(config_path=str(toml), target_label="gene", batch_label="gem_group", control_label=CONTROL,
                  group_size_S=4, batch_size=3, barcodes=True, num_workers=1, server=server.flight_uri)
    cl = PerturbationDataModule(toml_schema="cell-load", **kwargs)
    cl.setup()
    pp = PerturbationDataModule(**kwargs)
    pp.setup()
    assert cl.info["toml_schema"] == "cell-load" and pp.info["toml_schema"] == "protoplast"
    assert cl.info["splits"]["train"]["cells"] == 0 < pp.info["splits"]["train"]["cells"]
    assert cl.info["splits"]["test"]["cells"] == pp.info["splits"]["test"]["cells"] > 0
    assert {f.split("/")[0] for f in cl.info["files"]} == {"screen_a"}


def test_protoplast_schema_refuses_unknown_targets(screens, tmp_path):
    root, server = screens
    toml = tmp_path / "strict.toml"
    toml.write_text(_datasets(root) + '[fewshot."screen_a.rpe1"]\nval = ["G999"]\n')
    dm = PerturbationDataModule(config_path=str(toml), target_label="gene", batch_label="gem_group",
                                control_label=CONTROL, server=server.flight_uri)
    with pytest.raises(Exception, match=r"lists target 'G999', which no perturbed cell of 'screen_a.rpe1' has"):
        dm.setup()
