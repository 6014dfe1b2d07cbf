"""Batch-matched controls (cell-load's `basal_mapping_strategy="batch"`), after the checks of
cell-load's tests/test_mapping_strategy.py, written for cellfeed: a real server on loopback and
real h5ad files in which some batches have fewer controls than an item's cells and one has none.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfeed.client import PerturbationDataModule
from tests.conftest import ServerProcess

CONTROL = "non-targeting"
S = 4
# (cell type, gem_group) -> control cells: gem1 has fewer than S, k562/gem3 none at all
CONTROLS = {("k562", "gem1"): 2, ("k562", "gem2"): 25, ("rpe1", "gem1"): 30, ("rpe1", "gem2"): 3, ("rpe1", "gem3"): 20}


def write_screen(path: Path, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for target in ("G000", "G001", "G002", "G003"):
        for ct in ("k562", "rpe1"):
            rows += [(target, ct, f"gem{int(b)}") for b in rng.integers(1, 4, int(rng.integers(15, 30)))]
    for (ct, gem), n in CONTROLS.items():
        rows += [(CONTROL, ct, gem)] * n
    obs = pd.DataFrame(rows, columns=["gene", "cell_type", "gem_group"])
    obs = obs.sort_values(["gene", "gem_group"], kind="stable").reset_index(drop=True)
    for col in obs:
        obs[col] = pd.Categorical(obs[col])
    obs.index = [f"cell{i:05d}" for i in range(len(obs))]
    X = sp.random(len(obs), 16, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(16)])).write_h5ad(path)
    return obs


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    root = tmp_path_factory.mktemp("mapping") / "data"
    obs = write_screen(root / "screen.h5ad")
    (root / "splits.toml").write_text(
        f'[datasets]\nscreen = "{root}/screen.h5ad"\n[training]\nscreen = "train"\n'
        '[fewshot."screen.rpe1"]\nval = ["G001"]\ntest = ["G002"]\n'
    )
    server = ServerProcess(root)
    server.start()
    yield root, obs, server
    server.stop()


def make(server: ServerProcess, root: Path, **kwargs) -> PerturbationDataModule:
    defaults = dict(
        config_path=str(root / "splits.toml"), target_label="gene", batch_label="gem_group", control_label=CONTROL,
        group_size_S=S, batch_size=5, barcodes=True, num_workers=2, server=server.flight_uri,
    )
    defaults.update(kwargs)
    dm = PerturbationDataModule(**defaults)
    dm.setup("fit")
    return dm


def pairs(dm: PerturbationDataModule, split: str, epoch: int = 0) -> list[dict]:
    loader = dm.loader(split)
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_controls_come_from_the_perturbed_cells_batch_and_cell_type(screen, split):
    """cell-load: test_get_control_indices_same_batch_and_cell_type, in every split."""
    root, obs, server = screen
    dm = make(server, root, basal_mapping_strategy="batch")
    batches = pairs(dm, split)
    assert batches
    for b in batches:
        pert = obs.loc[b["pert_cell_barcode"].ravel()]
        ctrl = obs.loc[b["ctrl_cell_barcode"].ravel()]
        assert (ctrl.gene == CONTROL).all()
        np.testing.assert_array_equal(ctrl.cell_type.astype(str), pert.cell_type.astype(str))
        same_batch = ctrl.gem_group.astype(str).to_numpy() == pert.gem_group.astype(str).to_numpy()
        # the only exception: k562/gem3, whose batch has no controls, falls back to the cell type
        fallback = ((pert.cell_type == "k562") & (pert.gem_group == "gem3")).to_numpy()
        assert same_batch[~fallback].all()


def test_groups_do_not_span_batches(screen):
    root, obs, server = screen
    dm = make(server, root, match_controls_by_batch=True)
    for split in ("train", "val", "test"):
        for b in pairs(dm, split):
            for item in b["pert_cell_barcode"]:
                assert obs.loc[item, "gem_group"].nunique() == 1


def test_small_batches_draw_with_replacement_not_from_the_cell_type(screen):
    """k562/gem1 has 2 controls for items of 4 cells: they repeat, and never come from gem2."""
    root, obs, server = screen
    dm = make(server, root, match_controls_by_batch=True)
    seen = set()
    for b in pairs(dm, "train"):
        for pert_item, ctrl_item in zip(b["pert_cell_barcode"], b["ctrl_cell_barcode"]):
            first = obs.loc[pert_item[0]]
            if (first.cell_type, first.gem_group) == ("k562", "gem1"):
                seen.update(ctrl_item)
                assert len(set(ctrl_item)) <= 2
    pool = obs.index[(obs.gene == CONTROL) & (obs.cell_type == "k562") & (obs.gem_group == "gem1")]
    assert seen and seen <= set(pool)


def test_fallback_to_the_cell_type_is_counted_in_the_session_info(screen):
    root, obs, server = screen
    dm = make(server, root, match_controls_by_batch=True)
    fallbacks = dm.info["control_fallbacks"]
    k562_gem3 = obs[(obs.gene != CONTROL) & (obs.cell_type == "k562") & (obs.gem_group == "gem3")]
    assert fallbacks["train"]["cells"] == len(k562_gem3) > 0
    assert fallbacks["train"]["groups"] == k562_gem3.gene.nunique()
    assert fallbacks["train"]["batches"] == ["k562/gem3"]
    assert fallbacks["val"]["cells"] == fallbacks["test"]["cells"] == 0  # rpe1 has controls in every batch
    assert make(server, root).info["control_fallbacks"] is None


def test_batch_strategy_is_reproducible_by_seed(screen):
    """cell-load: test_random_state_reproducibility_batch."""
    root, _, server = screen
    a = [b["ctrl_cell_barcode"] for b in pairs(make(server, root, match_controls_by_batch=True, seed=3), "train")]
    b = [b["ctrl_cell_barcode"] for b in pairs(make(server, root, match_controls_by_batch=True, seed=3), "train")]
    c = [b["ctrl_cell_barcode"] for b in pairs(make(server, root, match_controls_by_batch=True, seed=4), "train")]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_controls_are_drawn_afresh_each_epoch(screen):
    """cell-load's default (no cached pairs): a cell's controls differ between epochs."""
    root, _, server = screen
    dm = make(server, root, match_controls_by_batch=True)

    def mapping(epoch):
        out = {}
        for b in pairs(dm, "train", epoch):
            for p, c in zip(b["pert_cell_barcode"].ravel(), b["ctrl_cell_barcode"].ravel()):
                out.setdefault(p, c)
        return out

    first, second = mapping(0), mapping(1)
    assert sum(first[k] != second[k] for k in first) > len(first) // 2


def test_the_three_spellings_of_batch_matching_agree(screen):
    root, _, server = screen
    ref = pairs(make(server, root, match_controls_by_batch=True), "train")
    for kwargs in ({"use_batches": True}, {"basal_mapping_strategy": "batch"}):
        got = pairs(make(server, root, **kwargs), "train")
        assert len(got) == len(ref)
        for x, y in zip(got, ref):
            np.testing.assert_array_equal(x["ctrl_cell_barcode"], y["ctrl_cell_barcode"])
    with pytest.raises(ValueError, match="batch matching asked both ways"):
        PerturbationDataModule(match_controls_by_batch=True, basal_mapping_strategy="random")
