"""Evaluation passes count every cell once: val, test and predict serve each cell of their split
exactly once, and `cell_mask` marks the rows that only fill the [B, S] shape (as cell-load's
test loader serves each cell once). Training keeps its declared padding, marked the same way."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tests.helpers import datamodule, epoch, obs_table

FILES = ["k562.h5ad", "rpe1.h5ad"]
FEWSHOT = '[datasets]\nsynth = "{k562,rpe1}.h5ad"\n[fewshot."synth.rpe1"]\nval = ["G000", "G001"]\ntest = ["G002", "G003"]\n'


@pytest.fixture(scope="module")
def obs(pert_root):
    return obs_table(pert_root, FILES)


@pytest.fixture(scope="module")
def toml(pert_root):
    path = pert_root.parent / "eval.toml"
    path.write_text(FEWSHOT)
    return path


def split_cells(obs, targets) -> set[str]:
    rpe1 = obs[obs.file == "rpe1"]
    return set(rpe1.index[rpe1.target_gene.astype(str).isin(targets)])


def real_and_padding(batches) -> tuple[np.ndarray, np.ndarray]:
    real = np.concatenate([b["pert_cell_barcode"][b["cell_mask"].numpy()] for b in batches])
    pad = np.concatenate([b["pert_cell_barcode"][~b["cell_mask"].numpy()] for b in batches])
    return real, pad


@pytest.mark.parametrize("S,B", [(3, 4), (4, 8), (32, 64)])
@pytest.mark.parametrize("stage", ["val", "test", "predict"])
def test_each_cell_is_served_once_per_pass(pert_server, toml, obs, S, B, stage):
    dm = datamodule(pert_server, files=None, config_path=str(toml), group_size_S=S, batch_size=B)
    loader = {"val": dm.val_dataloader, "test": dm.test_dataloader, "predict": dm.predict_dataloader}[stage]()
    expected = split_cells(obs, ["G000", "G001"] if stage == "val" else ["G002", "G003"])
    for _ in range(2):  # every pass, not only the first
        batches = list(loader)
        assert len(batches) == len(loader)
        real, pad = real_and_padding(batches)
        assert len(real) == len(set(real)) == len(expected)
        assert set(real) == expected
        # padding only fills a target's last item, with cells of that item's target
        for b in batches:
            mask = b["cell_mask"].numpy()
            assert mask.dtype == np.bool_ and mask.shape == b["pert_cell_barcode"].shape
            assert mask[:, 0].all()  # no item is all padding on one rank
            for item, m, target in zip(b["pert_cell_barcode"], mask, b["pert_name"]):
                assert (obs.loc[item, "target_gene"].astype(str) == target).all()
                assert (np.diff(m.astype(int)) <= 0).all()  # the real cells come first
        assert len(pad) < S * obs.loc[list(expected), "target_gene"].nunique()


def test_the_last_batch_is_short_not_wrapped(pert_server, toml, obs):
    dm = datamodule(pert_server, files=None, config_path=str(toml), group_size_S=4, batch_size=8)
    batches = list(dm.test_dataloader())
    items = dm.info["splits"]["test"]["items"]
    sizes = [b["pert_cell_emb"].shape[0] for b in batches]
    assert sizes[:-1] == [8] * (len(sizes) - 1) and sum(sizes) == items
    assert sizes[-1] == items - 8 * (len(sizes) - 1)
    assert tuple(batches[-1]["cell_mask"].shape) == (sizes[-1], 4)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_serve_each_cell_once(pert_server, toml, obs, world):
    expected = split_cells(obs, ["G002", "G003"])
    real_all = []
    lengths = []
    for rank in range(world):
        dm = datamodule(pert_server, files=None, config_path=str(toml), group_size_S=4, batch_size=5, rank=rank, world_size=world)
        loader = dm.test_dataloader()
        batches = list(loader)
        lengths.append(len(batches))
        assert len(batches) == len(loader)
        real_all.append(real_and_padding(batches)[0])
    assert len(set(lengths)) == 1  # every rank the same number of batches
    real = np.concatenate(real_all)
    counts = Counter(real.tolist())
    assert set(counts) == expected and set(counts.values()) == {1}


def test_val_falls_back_to_test_without_a_val_split(pert_server, pert_root, obs):
    path = pert_root.parent / "test_only.toml"
    path.write_text('[datasets]\nsynth = "{k562,rpe1}.h5ad"\n[fewshot."synth.rpe1"]\ntest = ["G004"]\n')
    dm = datamodule(pert_server, files=None, config_path=str(path))
    assert dm.info["splits"]["val"]["items"] == 0
    val = dm.val_dataloader()
    assert val is dm.test_dataloader() and len(val) > 0
    real, _ = real_and_padding(list(val))
    assert set(real) == split_cells(obs, ["G004"])
    # no val and no test: nothing to validate on
    assert datamodule(pert_server).val_dataloader() == []


def test_training_marks_its_declared_padding(pert_server, obs):
    """Every train cell once among the real rows of an epoch; the rest are repeats, marked."""
    dm = datamodule(pert_server, group_size_S=4, batch_size=8)
    batches = epoch(dm.train_dataloader(), 0)
    real, pad = real_and_padding(batches)
    assert len(real) == len(set(real)) == len(obs[obs.target_gene != "non-targeting"])
    assert len(pad) == len(batches) * 8 * 4 - len(real)
    assert set(pad) <= set(real)
    sizes = {tuple(b["cell_mask"].shape) for b in batches}
    assert sizes == {(8, 4)}  # training batches keep their full shape
    assert all(b["cell_mask"].dtype == torch.bool for b in batches)
