"""The rest of cell-load 0.10.4's contract, against cell-load itself on the same files.

- The constructor: every argument name, default, kind and order equal cell-load's, cellfeed's
  additions only (`server`, `token`, `connect_timeout`, `retry_seconds`, before `**kwargs`), and
  the `**kwargs` keys cell-load reads with their defaults.
- `cache_perturbation_control_pairs`: with True each cell keeps its control every epoch (drawn
  without replacement within its cell type and perturbation), with False controls change; the
  same holds for cell-load's own module.
- `get_var_names()` / `get_var_dims()["gene_names"]` equal cell-load's for every output_space on
  files with var/gene_name (plain or categorical), var/highly_variable, uns/hvg_names or none.
- `server=` as a list or comma-separated string of 2 replicas on loopback: the drop-in's extra
  loaders (train_dataloader(test=True), get_shared_perturbations) read from both.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import anndata as ad
import httpx
import numpy as np
import pandas as pd
import pytest

import cellfeed.client.cell_load.data_modules.perturbation_dataloader as dropin
from cellfeed.client.cell_load.data_modules import PerturbationDataModule
from tests.conftest import ServerProcess
from tests.test_cell_load_options import COMMON, FILES, TOML, write_screen

cell_load_dm = pytest.importorskip("cell_load.data_modules")

ADDITIONS = ["server", "token", "connect_timeout", "retry_seconds"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "cell-load.md"


# -- the constructor -----------------------------------------------------------------------------
def test_constructor_is_cell_loads_plus_documented_additions():
    theirs = inspect.signature(cell_load_dm.PerturbationDataModule.__init__).parameters
    ours = inspect.signature(PerturbationDataModule.__init__).parameters
    their_named = [p for p in theirs.values() if p.kind is not p.VAR_KEYWORD]
    our_named = [p for p in ours.values() if p.kind is not p.VAR_KEYWORD]
    # cell-load's arguments first, in its order, with its defaults and kinds
    assert [(p.name, p.default, p.kind) for p in our_named[: len(their_named)]] == [
        (p.name, p.default, p.kind) for p in their_named
    ]
    assert [p.name for p in our_named[len(their_named) :]] == ADDITIONS
    assert list(ours.values())[-1].kind is inspect.Parameter.VAR_KEYWORD
    docs = DOCS.read_text()
    for name in ADDITIONS:
        assert f"`{name}`" in docs, name


def test_kwargs_cell_load_reads_are_read_with_its_defaults():
    source = inspect.getsource(cell_load_dm.PerturbationDataModule.__init__)
    read = dict(re.findall(r'kwargs\.get\("(\w+)"(?:,\s*([^)]+))?\)', source))
    theirs = {name: (eval(default) if default else None) for name, default in read.items()}
    assert theirs == dropin._CELL_LOAD_KWARGS


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    root = tmp_path_factory.mktemp("cell_load_contract") / "data"
    for seed, (stem, cts) in enumerate(FILES.items()):
        write_screen(root / f"{stem}.h5ad", cts, seed)
    toml = root.parent / "replogle.toml"
    toml.write_text(TOML.format(root=root))
    server = ServerProcess(root)
    server.start()
    yield root, toml, server
    server.stop()


# -- cache_perturbation_control_pairs ------------------------------------------------------------
def pairs(loader) -> dict[str, set[str]]:
    """Each served cell -> the controls it was given in one pass (padding repeats included)."""
    out: dict[str, set[str]] = {}
    for batch in loader:
        for cell, ctrl in zip(batch["pert_cell_barcode"], batch["ctrl_cell_barcode"]):
            out.setdefault(cell, set()).add(ctrl)
    return out


def two_epochs(dl) -> tuple[dict, dict]:
    if hasattr(dl, "set_epoch"):
        dl.set_epoch(0)
    first = pairs(dl)
    if hasattr(dl, "set_epoch"):
        dl.set_epoch(1)
    return first, pairs(dl)


def obs_of(root: Path) -> pd.DataFrame:
    frames = []
    for stem in FILES:
        obs = ad.read_h5ad(root / f"{stem}.h5ad", backed="r").obs.copy()
        obs["file"] = stem
        frames.append(obs)
    return pd.concat(frames)


@pytest.mark.parametrize("impl", ["cellfeed", "cell-load"])
def test_cached_pairs_stay_and_uncached_ones_change(screen, impl):
    root, toml, server = screen
    obs = obs_of(root)
    epochs = {}
    for cache in (True, False):
        kwargs = dict(COMMON, toml_config_path=str(toml), barcode=True, cache_perturbation_control_pairs=cache)
        if impl == "cellfeed":
            dm = PerturbationDataModule(num_workers=2, server=server.flight_uri, **kwargs)
        else:
            dm = cell_load_dm.PerturbationDataModule(num_workers=0, **kwargs)
        dm.setup("fit")
        epochs[cache] = two_epochs(dm.train_dataloader())
        if cache:
            assert two_epochs(dm.test_dataloader())[0] == two_epochs(dm.test_dataloader())[1]
    first, second = epochs[True]
    if impl == "cellfeed":  # every train cell each epoch (cell-load's sampler may leave a few out)
        assert first.keys() == second.keys()
    common = first.keys() & second.keys()
    assert len(common) > 100
    assert all(len(c) == 1 for c in first.values())  # one control per cell, padding repeats included
    assert all(first[cell] == second[cell] for cell in common)  # and the same in the next epoch
    ctrl = {cell: next(iter(c)) for cell, c in first.items()}
    cells, controls = obs.loc[list(ctrl)], obs.loc[list(ctrl.values())]
    assert (controls.gene.astype(str).to_numpy() == "non-targeting").all()
    assert (controls.cell_type.to_numpy() == cells.cell_type.to_numpy()).all()
    assert (controls.file.to_numpy() == cells.file.to_numpy()).all()
    # without replacement within a (file, cell type, perturbation): pools of 30 exceed every group
    grouped = pd.DataFrame({"key": list(zip(cells.file, cells.cell_type, cells.gene)), "ctrl": list(ctrl.values())})
    assert grouped.groupby("key").ctrl.nunique().equals(grouped.groupby("key").ctrl.size())
    first, second = epochs[False]
    changed = [cell for cell in first.keys() & second.keys() if first[cell] != second[cell]]
    assert len(changed) > len(first) // 2


def test_cached_pairs_are_sent_with_the_random_strategy_only(screen):
    """cell-load's batch strategy ignores cache_perturbation_control_pairs (its random one reads it)."""
    _, toml, server = screen
    for strategy, fixed in (("random", True), ("batch", False)):
        dm = PerturbationDataModule(toml_config_path=str(toml), server=server.flight_uri, basal_mapping_strategy=strategy,
                                    cache_perturbation_control_pairs=True, **COMMON)
        assert dm._stream.session_config()["fixed_control_pairs"] is fixed


# -- get_var_names ------------------------------------------------------------------------------
N_GENES = 24
VAR_CASES = {
    "plain": {},  # var index only
    "gene_name": {"gene_name": "plain", "highly_variable": True},
    "categorical_uns": {"gene_name": "categorical", "hvg_names": True},
    "index_uns": {"hvg_names": True},  # cell-load reads uns/hvg_names only beside var/gene_name
    "index_hvg": {"highly_variable": True},
}


def rewrite_var(path: Path, case: dict) -> None:
    adata = ad.read_h5ad(path)
    rng = np.random.default_rng(7)
    symbols = [f"SYM{j}" for j in rng.permutation(N_GENES)]
    if case.get("gene_name") == "plain":
        adata.var["gene_name"] = symbols
    elif case.get("gene_name") == "categorical":
        adata.var["gene_name"] = pd.Categorical(symbols)
    if case.get("highly_variable"):
        adata.var["highly_variable"] = np.arange(N_GENES) % 3 == 0
    if case.get("hvg_names"):
        adata.uns["hvg_names"] = np.array(symbols[:5] if "gene_name" in case else list(adata.var_names[:5]))
    adata.write_h5ad(path)


@pytest.fixture(scope="module")
def var_screens(tmp_path_factory):
    root = tmp_path_factory.mktemp("cell_load_var") / "data"
    tomls = {}
    for name, case in VAR_CASES.items():
        path = root / name / "k562.h5ad"
        write_screen(path, ["k562"], 3)
        rewrite_var(path, case)
        tomls[name] = root.parent / f"{name}.toml"
        tomls[name].write_text(f'[datasets]\ns = "{path}"\n[training]\ns = "train"\n')
    server = ServerProcess(root)
    server.start()
    yield tomls, server
    server.stop()


@pytest.mark.parametrize("case", list(VAR_CASES))
@pytest.mark.parametrize("output_space", ["gene", "all", "embedding"])
def test_var_names_equal_cell_loads(var_screens, case, output_space):
    tomls, server = var_screens
    kwargs = dict(COMMON, toml_config_path=str(tomls[case]), output_space=output_space)
    theirs = cell_load_dm.PerturbationDataModule(num_workers=0, **kwargs)
    theirs.setup()
    ours = PerturbationDataModule(server=server.flight_uri, num_workers=1, **kwargs)
    ours.setup()
    expected = theirs.get_var_names()
    assert ours.get_var_names() == expected
    assert ours.get_var_dims()["gene_names"] == theirs.get_var_dims()["gene_names"] == expected
    # each case exercises what it names: gene_name's symbols, the highly variable filter, uns/hvg_names
    assert expected[0].startswith("SYM") == ("gene_name" in VAR_CASES[case])
    filtered = output_space == "gene" and (VAR_CASES[case].get("highly_variable") or case == "categorical_uns")
    assert (len(expected) < N_GENES) == bool(filtered)


# -- replicas ------------------------------------------------------------------------------------
def streamed_splits(server: ServerProcess) -> set[str]:
    sessions = httpx.get(f"{server.http_url}/v1/sessions", timeout=10).json()
    return {s["split"] for session in sessions for s in session["streams"]}


@pytest.mark.parametrize("form", ["list", "commas"])
def test_extra_loaders_use_every_replica(screen, form):
    root, toml, _ = screen
    servers = [ServerProcess(root).start(), ServerProcess(root).start()]
    try:
        uris = [s.flight_uri for s in servers]
        ours = PerturbationDataModule(toml_config_path=str(toml), server=uris if form == "list" else ",".join(uris),
                                      num_workers=2, barcode=True, **COMMON)
        ours.setup("fit")
        cells = [c for b in ours.train_dataloader(test=True) for c in b["pert_cell_barcode"]]
        assert len(cells) == len(set(cells)) == ours.info["splits"]["train"]["cells"]
        assert all(streamed_splits(s) == {"train"} for s in servers)  # stream i on replica i
        shared = ours.get_shared_perturbations()
        theirs = cell_load_dm.PerturbationDataModule(toml_config_path=str(toml), num_workers=0, **COMMON)
        theirs.setup()
        assert shared == theirs.get_shared_perturbations()
        assert all(streamed_splits(s) == {"train", "test"} for s in servers)
    finally:
        for s in servers:
            s.stop()
