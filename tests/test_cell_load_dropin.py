"""cellfeed's cell-load drop-in against cell-load 0.10.4 itself, on the same files and TOML.

Real h5ad files written by anndata with a screen's obs columns (`gene`, `cell_type`,
`gem_group`, "non-targeting" controls, categorical), one real server on loopback, and cell-load's
own PerturbationDataModule run locally on the same files. Compared: batch keys, dtypes and shapes
of train / val / test batches, var dims and names, shared perturbations, the control, one-hot
maps; the served values are checked against the files. Both run with
should_yield_control_cells=False here (tests/test_cell_load_options.py covers cell-load's default,
True, and the other options that need the server). The TOML has no [zeroshot] rule: cell-load
0.10.4 with should_yield_control_cells=False fails on one (the control-only train subset it adds
is empty, and its sampler takes the max of no codes).
"""

from __future__ import annotations

import pickle
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
N_GENES = 24
S = 4  # cell_sentence_len
B = 3  # batch_size
FILES = {"k562": ["k562"], "rpe1": ["rpe1", "hepg2"]}  # file stem -> cell types in it
TOML = """
[datasets]
replogle = "{root}/{{k562,rpe1}}.h5ad"
[training]
replogle = "train"
[zeroshot]
[fewshot."replogle.rpe1"]
val = ["G000"]
test = ["G001", "G002"]
"""


def write_screen(path: Path, cell_types: list[str], seed: int) -> None:
    """Sorted by gene then gem_group (cellfeed's requirement), controls contiguous, categoricals."""
    rng = np.random.default_rng(seed)
    rows = []
    for target in TARGETS + [CONTROL]:
        for ct in cell_types:
            n = int(rng.integers(5, 14)) if target != CONTROL else 40
            rows += [(target, ct, f"gem{int(b)}") for b in rng.integers(1, 3, n)]
    obs = pd.DataFrame(rows, columns=["gene", "cell_type", "gem_group"])
    obs = obs.sort_values(["gene", "gem_group"], kind="stable").reset_index(drop=True)
    for col in obs:
        obs[col] = pd.Categorical(obs[col])
    obs.index = [f"{path.stem}_{i:05d}" for i in range(len(obs))]
    X = sp.random(len(obs), N_GENES, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    X.data = np.round(X.data * 10, 2).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"gene{j}" for j in range(N_GENES)])).write_h5ad(path)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    root = tmp_path_factory.mktemp("cell_load_dropin") / "data"
    for seed, (stem, cts) in enumerate(FILES.items()):
        write_screen(root / f"{stem}.h5ad", cts, seed)
    features = {t: torch.arange(5, dtype=torch.float32) + i for i, t in enumerate(TARGETS[:-1] + [CONTROL])}
    torch.save(features, root / "features.pt")  # TARGETS[-1] missing: zeros in both
    toml = root.parent / "replogle.toml"
    toml.write_text(TOML.format(root=root))
    cells = pd.concat([ad.read_h5ad(root / f"{stem}.h5ad").to_df().join(ad.read_h5ad(root / f"{stem}.h5ad").obs) for stem in FILES])
    server = ServerProcess(root)
    server.start()
    yield root, toml, server, cells
    server.stop()


COMMON = dict(pert_col="gene", batch_col="gem_group", cell_type_key="cell_type", control_pert=CONTROL,
              batch_size=B, cell_sentence_len=S, should_yield_control_cells=False)


def both(screen, **kwargs):
    root, toml, server, _ = screen
    theirs = cell_load_dm.PerturbationDataModule(toml_config_path=str(toml), num_workers=0, **COMMON, **kwargs)
    theirs.setup()
    ours = PerturbationDataModule(toml_config_path=str(toml), num_workers=2, server=server.flight_uri, **COMMON, **kwargs)
    ours.setup("fit")
    return theirs, ours


def describe(batch: dict) -> dict:
    """key -> (dtype, shape) for tensors, ("list[str]", len) for lists of strings."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = (value.dtype, tuple(value.shape))
        else:
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), key
            out[key] = ("list[str]", len(value))
    return out


@pytest.mark.parametrize("extra", [{}, {"barcode": True}, {"output_space": "all", "barcode": True}])
def test_batches_have_cell_loads_keys_dtypes_and_shapes(screen, extra):
    theirs, ours = both(screen, **extra)
    for name in ("train_dataloader", "val_dataloader"):
        expected = describe(next(iter(getattr(theirs, name)())))
        got = describe(next(iter(getattr(ours, name)())))
        assert got == expected, name
        assert got["pert_cell_emb"] == (torch.float32, (B * S, N_GENES))
    expected = describe(next(iter(theirs.test_dataloader())))
    got = describe(next(iter(ours.test_dataloader())))
    assert got.keys() == expected.keys()
    for key in got:  # one unpadded sentence a batch: its length (at most S) is that sentence's
        assert got[key][0] == expected[key][0], key
        if got[key][0] != "list[str]":
            assert got[key][1][1:] == expected[key][1][1:], key
            assert 1 <= got[key][1][0] <= S


def test_facts_equal_cell_loads(screen):
    theirs, ours = both(screen)
    assert ours.get_var_dims() == theirs.get_var_dims()
    assert ours.get_var_names() == theirs.get_var_names()
    assert ours.get_control_pert() == theirs.get_control_pert() == CONTROL
    shared = theirs.get_shared_perturbations()
    assert shared == {"G001", "G002"}  # rpe1's test targets, trained on in k562 and hepg2
    assert ours.get_shared_perturbations() == shared
    for name in ("pert_onehot_map", "batch_onehot_map", "cell_type_onehot_map"):
        mine, cl = getattr(ours, name), getattr(theirs, name)
        assert list(mine) == list(cl), name
        assert all(torch.equal(mine[k], cl[k]) for k in cl), name


def test_perturbation_features_file_as_cell_load(screen):
    root = screen[0]
    theirs, ours = both(screen, perturbation_features_file=str(root / "features.pt"))
    assert ours.get_var_dims()["pert_dim"] == theirs.get_var_dims()["pert_dim"] == 5
    features = torch.load(root / "features.pt")
    seen = set()
    for batch in ours.train_dataloader():  # one epoch: every train target, the missing one included
        for name, row in zip(batch["pert_name"], batch["pert_emb"]):
            assert torch.equal(row, features.get(name, torch.zeros(5))), name
            seen.add(name)
    assert TARGETS[-1] in seen  # not in the file: zeros, as cell-load
    assert torch.equal(ours.pert_onehot_map[TARGETS[-1]], theirs.pert_onehot_map[TARGETS[-1]])


def test_served_cells_are_the_files_cells(screen):
    """Rows are the barcoded cells' X rows; controls share the perturbed cell's cell type; one-hots
    and names agree with obs; sentences are one (perturbation, cell type)."""
    cells = screen[3]
    _, ours = both(screen, barcode=True)
    genes = [f"gene{j}" for j in range(N_GENES)]
    for batch in [next(iter(ours.train_dataloader())), next(iter(ours.val_dataloader()))]:
        pert = cells.loc[batch["pert_cell_barcode"]]
        ctrl = cells.loc[batch["ctrl_cell_barcode"]]
        np.testing.assert_array_equal(batch["pert_cell_emb"].numpy(), pert[genes].to_numpy(np.float32))
        np.testing.assert_array_equal(batch["ctrl_cell_emb"].numpy(), ctrl[genes].to_numpy(np.float32))
        assert list(pert.gene.astype(str)) == batch["pert_name"]
        assert list(pert.cell_type.astype(str)) == batch["cell_type"]
        assert list(pert.gem_group.astype(str)) == batch["batch_name"]
        assert (ctrl.gene == CONTROL).all() and list(ctrl.cell_type.astype(str)) == batch["cell_type"]
        assert set(batch["dataset_name"]) == {"replogle"}
        batch_names = list(ours.batch_onehot_map)
        assert [batch_names[i] for i in batch["batch"].argmax(1).tolist()] == batch["batch_name"]
        for b in range(B):
            assert len(set(batch["pert_name"][b * S : (b + 1) * S])) == 1
            assert len(set(batch["cell_type"][b * S : (b + 1) * S])) == 1


def test_test_loader_gives_cell_loads_sentences(screen):
    """Batch size 1, unpadded: the same number of sentences, the same lengths, each test cell once."""
    theirs, ours = both(screen, barcode=True)
    expected = list(theirs.test_dataloader())
    got = list(ours.test_dataloader())
    assert len(ours.test_dataloader()) == len(got) == len(expected) == len(theirs.test_dataloader())
    assert sorted(len(b["pert_name"]) for b in got) == sorted(len(b["pert_name"]) for b in expected)
    mine = Counter(c for b in got for c in b["pert_cell_barcode"])
    assert set(mine.values()) == {1}
    assert set(mine) == {c for b in expected for c in b["pert_cell_barcode"]}
    for b in got:
        assert len(set(b["pert_name"])) == 1 and len(set(b["cell_type"])) == 1
    assert len(list(ours.predict_dataloader())) == len(list(theirs.predict_dataloader()))


def test_batch_mapping_keeps_sentences_in_one_batch(screen):
    """basal_mapping_strategy="batch": cell-load groups sentences by batch too, and STATE checks it."""
    cells = screen[3]
    theirs, ours = both(screen, basal_mapping_strategy="batch", barcode=True)
    for dm in (theirs, ours):
        batch = next(iter(dm.train_dataloader()))
        for b in range(B):
            assert len(set(batch["batch_name"][b * S : (b + 1) * S])) == 1
    batch = next(iter(ours.train_dataloader()))
    ctrl = cells.loc[batch["ctrl_cell_barcode"]]
    assert list(ctrl.gem_group.astype(str)) == batch["batch_name"]  # 40 controls a cell type: pools suffice


def test_loader_looks_like_a_dataloader_to_state(screen):
    _, ours = both(screen)
    dl = ours.train_dataloader()
    assert (dl.num_workers, dl.batch_size) == (2, B)
    assert len(dl) == len(list(dl))


def test_cell_load_defaults_are_served(screen):
    """cell-load's defaults (should_yield_control_cells=True among them) need no override."""
    root, toml, server, _ = screen
    dm = PerturbationDataModule(toml_config_path=str(toml), server=server.flight_uri, num_workers=1)
    dm.setup()
    assert dm.info["control_items"]
    assert CONTROL in {name for b in dm.test_dataloader() for name in b["pert_name"]}


def test_save_state_and_load_state(screen, tmp_path):
    theirs, ours = both(screen, barcode=True)
    ours.save_state(tmp_path / "ours.torch")
    saved = torch.load(tmp_path / "ours.torch", weights_only=False)
    theirs.save_state(tmp_path / "theirs.torch")
    assert set(saved) - set(torch.load(tmp_path / "theirs.torch", weights_only=False)) == {"server"}
    again = PerturbationDataModule.load_state(tmp_path / "ours.torch")
    again.setup()
    assert again.get_var_dims() == ours.get_var_dims() and again.barcode
    # a file cell-load wrote, pointed at a server
    from_cl = PerturbationDataModule.load_state(tmp_path / "theirs.torch", server=screen[2].flight_uri)
    from_cl.setup()
    assert from_cl.get_var_dims() == theirs.get_var_dims()


def test_pickles_after_setup(screen):
    _, ours = both(screen)
    copy = pickle.loads(pickle.dumps(ours))
    first = next(iter(copy.train_dataloader()))
    assert describe(first) == describe(next(iter(ours.train_dataloader())))


def test_zeroshot_is_served_where_cell_load_fails(screen, tmp_path):
    """Differs on purpose: cell-load 0.10.4 with should_yield_control_cells=False cannot build a
    train loader once a [zeroshot] rule exists (its control-only train subset is empty); cellfeed
    serves the zeroshot cell type's perturbed cells in test and keeps it out of train."""
    root, _, server, cells = screen
    toml = tmp_path / "zeroshot.toml"
    toml.write_text(f'[datasets]\nreplogle = "{root}/{{k562,rpe1}}.h5ad"\n[training]\nreplogle = "train"\n'
                    '[zeroshot]\n"replogle.hepg2" = "test"\n')
    theirs = cell_load_dm.PerturbationDataModule(toml_config_path=str(toml), num_workers=0, **COMMON)
    theirs.setup()
    with pytest.raises(ValueError, match="zero-size array"):
        theirs.train_dataloader()
    ours = PerturbationDataModule(toml_config_path=str(toml), server=server.flight_uri, barcode=True, **COMMON)
    ours.setup()
    test = {c for b in ours.test_dataloader() for c in b["pert_cell_barcode"]}
    hepg2 = cells[(cells.cell_type == "hepg2") & (cells.gene != CONTROL)]
    assert test == set(hepg2.index)
    train = {c for b in ours.train_dataloader() for c in b["pert_cell_barcode"]}
    assert train and not train & set(hepg2.index)
    assert ours.val_dataloader().inner.split == "test"  # no val split: val is the test split, as cell-load


def test_integer_batches_are_named_as_cell_load_names_them(tmp_path, serve):
    """An integer gem_group: batch names are the integers' strings, in both."""
    root = tmp_path / "data"
    write_screen(root / "k562.h5ad", ["k562"], 7)
    adata = ad.read_h5ad(root / "k562.h5ad")
    adata.obs["gem_group"] = pd.Categorical(adata.obs.gem_group.str.removeprefix("gem").astype(int))
    adata.write_h5ad(root / "k562.h5ad")
    toml = tmp_path / "int.toml"
    toml.write_text(f'[datasets]\nreplogle = "{root}/k562.h5ad"\n[training]\nreplogle = "train"\n')
    server = serve(root)
    theirs = cell_load_dm.PerturbationDataModule(toml_config_path=str(toml), num_workers=0, **COMMON)
    theirs.setup()
    ours = PerturbationDataModule(toml_config_path=str(toml), server=server.flight_uri, **COMMON)
    ours.setup()
    assert list(ours.batch_onehot_map) == list(theirs.batch_onehot_map) == ["1", "2"]
    for dm in (ours, theirs):
        names = next(iter(dm.train_dataloader()))["batch_name"]
        assert all(isinstance(v, str) for v in names) and set(names) <= {"1", "2"}


def test_train_loader_in_test_mode_gives_each_train_cell_once(screen):
    """cell-load's train_dataloader(test=True) (STATE's predict --eval-train-data): unpadded
    sentences, each train cell once; the training loader's epoch is left alone."""
    theirs, ours = both(screen, barcode=True)
    expected = list(theirs.train_dataloader(test=True))
    dl = ours.train_dataloader(test=True)
    got = list(dl)
    assert len(dl) == len(got) == len(expected)
    served = Counter(c for b in got for c in b["pert_cell_barcode"])
    assert set(served.values()) == {1}
    assert set(served) == {c for b in expected for c in b["pert_cell_barcode"]}
    assert dl.batch_sampler.tot_num == theirs.train_dataloader(test=True).batch_sampler.tot_num == len(served)
    assert ours.train_dataloader().sampler.epoch == 0


def test_unused_categories_are_left_out_of_the_vocabularies(tmp_path, serve):
    """Differs on purpose (docs/cell-load.md): vocabularies are the values the files hold; cell-load
    builds them from the categories, so a category with no cell widens its one-hots."""
    root = tmp_path / "data"
    write_screen(root / "k562.h5ad", ["k562"], 3)
    adata = ad.read_h5ad(root / "k562.h5ad")
    adata.obs["gene"] = adata.obs.gene.cat.add_categories(["G999"])
    adata.write_h5ad(root / "k562.h5ad")
    toml = tmp_path / "unused.toml"
    toml.write_text(f'[datasets]\nreplogle = "{root}/k562.h5ad"\n[training]\nreplogle = "train"\n')
    server = serve(root)
    theirs = cell_load_dm.PerturbationDataModule(toml_config_path=str(toml), num_workers=0, **COMMON)
    theirs.setup()
    ours = PerturbationDataModule(toml_config_path=str(toml), server=server.flight_uri, **COMMON)
    ours.setup()
    assert set(theirs.get_var_dims()["pert_names"]) - set(ours.get_var_dims()["pert_names"]) == {"G999"}
    assert ours.get_var_dims()["pert_dim"] == theirs.get_var_dims()["pert_dim"] - 1


def test_resume_mid_epoch_through_the_drop_in(screen):
    """STATE resumes from last.ckpt: Lightning hands dm.state_dict() back to load_state_dict; the
    resumed module yields exactly the batches the first had not yet yielded."""
    _, ours = both(screen, barcode=True)
    full = [b["pert_cell_barcode"] for b in ours.train_dataloader()]
    ours.train_dataloader().set_epoch(0)
    it = iter(ours.train_dataloader())
    assert [next(it)["pert_cell_barcode"] for _ in range(2)] == full[:2]
    state = ours.state_dict()
    resumed = PerturbationDataModule.load_state(_saved_state(ours))
    resumed.setup()
    resumed.load_state_dict(state)
    assert [b["pert_cell_barcode"] for b in resumed.train_dataloader()] == full[2:]


def _saved_state(dm) -> "io.BytesIO":
    import io

    buffer = io.BytesIO()
    dm.save_state(buffer)
    buffer.seek(0)
    return buffer
