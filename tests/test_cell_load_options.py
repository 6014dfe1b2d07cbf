"""cell-load 0.10.4's options that need the server, against cell-load itself on the same files.

Real h5ad files written by anndata with a screen's obs columns (`gene`, `cell_type`, `gem_group`,
"non-targeting" controls), obsm matrices as STATE's screens have them (`X_hvg` dense, `X_state` as
CSR), a guide column and a numeric obs column; one real server on loopback; cell-load's own
PerturbationDataModule on the same files and TOML. Covered: `embed_key` with each
`output_space` (keys, dtypes, shapes, dims, and the served rows against the files),
`should_yield_control_cells=True` (each split's cells, controls included, equal cell-load's),
`store_raw_basal`, `additional_obs`, several datasets in one TOML, `drop_last`,
`downsample_cells`, `val_subsample_fraction`, `downsample`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellfeed.client.cell_load.data_modules import PerturbationDataModule
from tests.conftest import ServerProcess

cell_load_dm = pytest.importorskip("cell_load.data_modules")

CONTROL = "non-targeting"
TARGETS = [f"G{i:03d}" for i in range(6)]
N_GENES, N_HVG, N_STATE = 24, 10, 7
S, B = 4, 3
FILES = {"k562": ["k562"], "rpe1": ["rpe1", "hepg2"]}
TOML = """
[datasets]
replogle = "{root}/{{k562,rpe1}}.h5ad"
[training]
replogle = "train"
[zeroshot]
"replogle.hepg2" = "test"
[fewshot."replogle.rpe1"]
val = ["G000"]
test = ["G001", "G002"]
"""
COMMON = dict(pert_col="gene", batch_col="gem_group", cell_type_key="cell_type", control_pert=CONTROL,
              batch_size=B, cell_sentence_len=S)


def write_screen(path: Path, cell_types: list[str], seed: int) -> None:
    """Sorted by gene then gem_group, controls contiguous; X counts (log1p), obsm X_hvg (dense)
    and X_state (CSR), obs guide_id (strings) and n_umi (integers)."""
    rng = np.random.default_rng(seed)
    rows = []
    for target in TARGETS + [CONTROL]:
        for ct in cell_types:
            n = int(rng.integers(5, 14)) if target != CONTROL else 30
            rows += [(target, ct, f"gem{int(b)}") for b in rng.integers(1, 3, n)]
    obs = pd.DataFrame(rows, columns=["gene", "cell_type", "gem_group"])
    obs = obs.sort_values(["gene", "gem_group"], kind="stable").reset_index(drop=True)
    for col in obs:
        obs[col] = pd.Categorical(obs[col])
    obs["guide_id"] = [f"{g}_g{int(i)}" for g, i in zip(obs.gene.astype(str), rng.integers(1, 3, len(obs)))]
    obs["n_umi"] = rng.integers(1000, 5000, len(obs)).astype(np.int64)
    obs.index = [f"{path.stem}_{i:05d}" for i in range(len(obs))]
    X = sp.random(len(obs), N_GENES, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    X.data = np.log1p(np.round(X.data * 20)).astype(np.float32)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"gene{j}" for j in range(N_GENES)]))
    adata.obsm["X_hvg"] = rng.random((len(obs), N_HVG), dtype=np.float32)
    adata.obsm["X_state"] = sp.random(len(obs), N_STATE, density=0.5, format="csr", dtype=np.float32, random_state=rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    root = tmp_path_factory.mktemp("cell_load_options") / "data"
    for seed, (stem, cts) in enumerate(FILES.items()):
        write_screen(root / f"{stem}.h5ad", cts, seed)
    toml = root.parent / "replogle.toml"
    toml.write_text(TOML.format(root=root))
    files = {stem: ad.read_h5ad(root / f"{stem}.h5ad") for stem in FILES}
    server = ServerProcess(root)
    server.start()
    yield root, toml, server, files
    server.stop()


def rows_of(files: dict[str, ad.AnnData], barcodes: list[str], what: str) -> np.ndarray:
    """The files' rows of `what` ("X" or an obsm key) for these obs_names, dense float32."""
    out = []
    for name in barcodes:
        adata = files[name.rsplit("_", 1)[0]]
        i = adata.obs_names.get_loc(name)
        m = adata.X if what == "X" else adata.obsm[what]
        row = m[i]
        out.append(np.asarray(row.todense() if sp.issparse(row) else row, dtype=np.float32).reshape(-1))
    return np.stack(out)


def both(screen, toml=None, **kwargs):
    root, default_toml, server, _ = screen
    toml = toml or default_toml
    kwargs = {**COMMON, **kwargs}
    theirs = cell_load_dm.PerturbationDataModule(toml_config_path=str(toml), num_workers=0, **kwargs)
    theirs.setup()
    ours = PerturbationDataModule(toml_config_path=str(toml), num_workers=2, server=server.flight_uri, **kwargs)
    ours.setup("fit")
    return theirs, ours


def describe(batch: dict) -> dict:
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = (value.dtype, tuple(value.shape))
        else:
            assert isinstance(value, list), key
            kinds = {"str" if isinstance(v, str) else type(v).__name__ for v in value}  # numpy's str_ is a str
            out[key] = ("list", len(value), sorted(kinds))
    return out


EMBED_CASES = [
    ("X_hvg", "gene"), ("X_hvg", "all"), ("X_hvg", "embedding"),
    ("X_state", "gene"), ("X_state", "all"), ("X_state", "embedding"),
]


@pytest.mark.parametrize("embed_key,output_space", EMBED_CASES)
def test_embed_key_batches_and_dims_equal_cell_loads(screen, embed_key, output_space):
    files = screen[3]
    theirs, ours = both(screen, embed_key=embed_key, output_space=output_space, barcode=True)
    assert ours.get_var_dims() == theirs.get_var_dims()
    for name in ("train_dataloader", "val_dataloader"):
        expected = next(iter(getattr(theirs, name)()))
        got = next(iter(getattr(ours, name)()))
        assert describe(got) == describe(expected), name
        # the served rows are the files' rows of the cells named
        np.testing.assert_array_equal(got["pert_cell_emb"].numpy(), rows_of(files, got["pert_cell_barcode"], embed_key))
        np.testing.assert_array_equal(got["ctrl_cell_emb"].numpy(), rows_of(files, got["ctrl_cell_barcode"], embed_key))
        if "pert_cell_counts" in got:
            counts = "X_hvg" if output_space == "gene" else "X"
            np.testing.assert_array_equal(got["pert_cell_counts"].numpy(), rows_of(files, got["pert_cell_barcode"], counts))
    expected, got = next(iter(theirs.test_dataloader())), next(iter(ours.test_dataloader()))
    assert set(got) == set(expected)
    assert got["pert_cell_emb"].shape[1:] == expected["pert_cell_emb"].shape[1:]


@pytest.mark.parametrize("output_space", ["gene", "all"])
def test_store_raw_basal_gives_the_controls_counts(screen, output_space):
    files = screen[3]
    theirs, ours = both(screen, embed_key="X_state", output_space=output_space, store_raw_basal=True, barcode=True)
    expected = next(iter(theirs.train_dataloader()))
    got = next(iter(ours.train_dataloader()))
    assert describe(got) == describe(expected)
    counts = "X_hvg" if output_space == "gene" else "X"
    np.testing.assert_array_equal(got["ctrl_cell_counts"].numpy(), rows_of(files, got["ctrl_cell_barcode"], counts))


def test_exp_counts_turns_logged_counts_into_integers_as_cell_load(screen):
    files = screen[3]
    theirs, ours = both(screen, embed_key="X_hvg", output_space="all", exp_counts=True, barcode=True)
    expected = next(iter(theirs.train_dataloader()))
    got = next(iter(ours.train_dataloader()))
    assert got["pert_cell_counts"].dtype == expected["pert_cell_counts"].dtype == torch.int32
    raw = rows_of(files, got["pert_cell_barcode"], "X")
    np.testing.assert_array_equal(got["pert_cell_counts"].numpy(), np.round(np.expm1(raw)).astype(np.int32))


def cell_load_cells(dm) -> dict[str, Counter]:
    """Cells (obs_names) of each split's items in cell-load, controls included."""
    out = {}
    for split, subsets in (("train", dm.train_datasets), ("val", dm.val_datasets), ("test", dm.test_datasets)):
        cells: Counter = Counter()
        for subset in subsets:
            names = np.asarray(ad.read_h5ad(subset.dataset.h5_path, backed="r").obs_names)
            cells.update(names[np.asarray(subset.indices)].tolist())
        out[split] = cells
    return out


def served(loader) -> Counter:
    return Counter(c for b in loader for c in b["pert_cell_barcode"])


def test_control_cells_are_items_in_cell_loads_splits(screen):
    """should_yield_control_cells=True (the default): each split's cells, controls included, are
    cell-load's; a zeroshot cell type's controls are in train and test, a fewshot one's in every
    split where it has perturbed cells; each test cell comes once; control sentences are all
    control, and their mapped controls are controls of the same cell type."""
    _, _, _, files = screen
    theirs, ours = both(screen, barcode=True)  # cell-load's default should_yield_control_cells=True
    assert ours.should_yield_control_cells
    expected = cell_load_cells(theirs)
    test = served(ours.test_dataloader())
    assert set(test.values()) == {1}
    assert test == expected["test"]
    assert set(served(ours.train_dataloader(test=True))) == set(expected["train"])
    val = served(ours.val_dataloader())
    assert set(val) == set(expected["val"])
    obs = pd.concat([f.obs for f in files.values()])
    hepg2_controls = set(obs.index[(obs.cell_type == "hepg2") & (obs.gene == CONTROL)])
    assert hepg2_controls <= set(test) and hepg2_controls <= set(expected["train"])
    assert ours.train_dataloader(test=True).batch_sampler.tot_num == theirs.train_dataloader(test=True).batch_sampler.tot_num
    for batch in ours.train_dataloader():
        for b in range(B):
            names = batch["pert_name"][b * S : (b + 1) * S]
            assert len(set(names)) == 1
            if names[0] == CONTROL:
                cells = obs.loc[batch["pert_cell_barcode"][b * S : (b + 1) * S]]
                ctrls = obs.loc[batch["ctrl_cell_barcode"][b * S : (b + 1) * S]]
                assert (cells.gene == CONTROL).all() and (ctrls.gene == CONTROL).all()
                assert list(ctrls.cell_type) == list(cells.cell_type)
    assert ours.get_shared_perturbations() == theirs.get_shared_perturbations()


def test_control_items_with_batch_mapping_keep_one_batch(screen):
    theirs, ours = both(screen, basal_mapping_strategy="batch", barcode=True)
    assert served(ours.test_dataloader()) == cell_load_cells(theirs)["test"]
    for batch in ours.train_dataloader():
        for b in range(B):
            assert len(set(batch["batch_name"][b * S : (b + 1) * S])) == 1


def test_additional_obs_as_cell_load_gives_them(screen):
    files = screen[3]
    theirs, ours = both(screen, additional_obs=["guide_id", "n_umi"], barcode=True)
    expected = next(iter(theirs.train_dataloader()))
    got = next(iter(ours.train_dataloader()))
    assert describe(got) == describe(expected)
    obs = pd.concat([f.obs for f in files.values()]).loc[got["pert_cell_barcode"]]
    assert got["guide_id"] == list(obs.guide_id)
    assert torch.equal(got["n_umi"], torch.from_numpy(obs.n_umi.to_numpy()))
    assert got["n_umi"].dtype == expected["n_umi"].dtype


def test_two_datasets_name_each_cells_dataset(screen, tmp_path):
    root = screen[0]
    toml = tmp_path / "two.toml"
    toml.write_text(f'[datasets]\na = "{root}/k562.h5ad"\nb = "{root}/rpe1.h5ad"\n[training]\na = "train"\nb = "train"\n')
    theirs, ours = both(screen, toml=toml, barcode=True)
    seen = set()
    for batch in ours.train_dataloader():
        for name, dataset in zip(batch["pert_cell_barcode"], batch["dataset_name"]):
            assert dataset == ("a" if name.startswith("k562_") else "b")
            seen.add(dataset)
    assert seen == {"a", "b"}
    assert set(next(iter(theirs.train_dataloader()))["dataset_name"]) <= {"a", "b"}


def test_drop_last_drops_partial_sentences_and_the_last_partial_batch(screen):
    theirs, ours = both(screen, drop_last=True, barcode=True)
    for dl in (theirs.train_dataloader(), ours.train_dataloader()):
        for batch in dl:
            assert len(batch["pert_name"]) == B * S
    # no sentence padded: every train cell served at most once a pass
    assert set(served(ours.train_dataloader()).values()) == {1}
    test = list(ours.test_dataloader())
    expected = list(theirs.test_dataloader())
    assert all(len(b["pert_name"]) == S for b in test + expected)  # no partial sentence in either
    # differs on purpose (docs/cell-load.md): cell-load's test batches are one sentence each, so its
    # drop_last also drops the last of them, a full one; cellfeed serves every full sentence
    assert len(test) == len(expected) + 1


def test_downsample_cells_caps_each_group(screen):
    theirs, ours = both(screen, downsample_cells=6, should_yield_control_cells=False, barcode=True)
    cells = served(ours.test_dataloader())
    per_group = Counter()
    obs = pd.concat([f.obs for f in screen[3].values()])
    for name in cells:
        per_group[(obs.loc[name, "cell_type"], obs.loc[name, "gene"])] += 1
    assert max(per_group.values()) == 6
    assert sum(len(b["pert_name"]) for b in theirs.test_dataloader()) == sum(cells.values())


def test_val_subsample_fraction_keeps_cell_loads_val_subsets(screen, tmp_path):
    root = screen[0]
    toml = tmp_path / "val.toml"
    toml.write_text(f'[datasets]\nreplogle = "{root}/{{k562,rpe1}}.h5ad"\n[training]\nreplogle = "train"\n'
                    '[zeroshot]\n"replogle.k562" = "val"\n"replogle.hepg2" = "val"\n"replogle.rpe1" = "val"\n')
    for fraction in (0.5, 0.34):
        theirs, ours = both(screen, toml=toml, val_subsample_fraction=fraction, barcode=True)
        assert served(ours.val_dataloader()).keys() == cell_load_cells(theirs)["val"].keys()


@pytest.mark.parametrize("target", [0.5, 40.0])
def test_downsample_thins_counts_as_cell_load(screen, target):
    """output_space="all": X rows are thinned binomially (a fraction, or a depth), log1p kept."""
    files = screen[3]
    _, ours = both(screen, output_space="all", downsample=target, should_yield_control_cells=False, barcode=True)
    batch = next(iter(ours.train_dataloader()))
    raw = np.round(np.expm1(rows_of(files, batch["pert_cell_barcode"], "X")))
    thinned = np.expm1(batch["pert_cell_emb"].numpy())
    np.testing.assert_allclose(thinned, np.round(thinned), atol=1e-3)  # whole counts again
    assert (thinned <= raw + 1e-3).all() and thinned.sum() < raw.sum()
    if target < 1:
        assert 0.35 < thinned.sum() / raw.sum() < 0.65
    else:
        assert (thinned.sum(axis=1) <= target * 1.6 + 5).all()
    again = next(iter(ours.train_dataloader()))  # seeded: the same batch thins the same way
    assert torch.equal(again["pert_cell_emb"], batch["pert_cell_emb"])
