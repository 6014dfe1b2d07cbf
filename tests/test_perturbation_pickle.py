"""The PerturbationDataModule pickles at any point, and a copy goes on where the original stood;
protoplast's and cell-load's extra arguments are accepted, each with its stated effect."""

from __future__ import annotations

import copy
import os
import pickle
import time

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from cellfeed.client import PerturbationDataModule
from tests.helpers import barcodes, datamodule


def make(server, **kwargs) -> PerturbationDataModule:
    return PerturbationDataModule(
        files=["k562.h5ad", "rpe1.h5ad"], group_size_S=4, batch_size=8, barcodes=True, num_workers=2,
        server=server.flight_uri, **kwargs,
    )


def test_pickles_before_setup(pert_server):
    dm = make(pert_server, seed=3)
    copied = pickle.loads(pickle.dumps(dm))
    assert copied.session is None
    copied.setup("fit")
    dm.setup("fit")
    np.testing.assert_array_equal(barcodes(list(copied.train_dataloader())), barcodes(list(dm.train_dataloader())))


@pytest.mark.parametrize("clone", [lambda dm: pickle.loads(pickle.dumps(dm)), copy.deepcopy])
def test_pickles_after_setup_and_reconnects_lazily(pert_server, clone):
    dm = datamodule(pert_server, pert_embedding_file="emb.pt")
    copied = clone(dm)
    assert copied._connection is None and copied.session.session_id == dm.session.session_id
    assert copied.var_names == dm.var_names  # the session's facts travel without a connection
    a, b = list(dm.train_dataloader()), list(copied.train_dataloader())
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["pert_cell_barcode"], y["pert_cell_barcode"])
        assert torch.equal(x["pert_emb"], y["pert_emb"])
        assert torch.equal(x["pert_cell_emb"].to_dense(), y["pert_cell_emb"].to_dense())


def test_pickles_after_one_batch_and_the_copy_goes_on_from_there(pert_server):
    dm = datamodule(pert_server)
    it = iter(dm.train_dataloader())
    next(it)
    copied = pickle.loads(pickle.dumps(dm))
    rest = list(it)
    copied_rest = list(copied.train_dataloader())
    assert len(copied_rest) == len(rest) > 0
    np.testing.assert_array_equal(barcodes(copied_rest), barcodes(rest))
    # and after setup again (as a spawned process would call it)
    again = pickle.loads(pickle.dumps(copied))
    again.setup("fit")
    assert len(list(again.train_dataloader())) == len(dm.train_dataloader())


def test_unpickled_copy_reopens_its_session_on_a_restarted_server(serve, tmp_path):
    from cellfeed.server.kinds.perturbation.synthetic import write_perturbation_h5ad

    root = tmp_path / "data"
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562", seed=1)
    server = serve(root)
    dm = PerturbationDataModule(files=["k562.h5ad"], group_size_S=4, batch_size=8, barcodes=True, server=server.flight_uri)
    dm.setup("fit")
    blob = pickle.dumps(dm)
    expected = barcodes(list(dm.train_dataloader()))
    server.restart()
    copied = pickle.loads(blob)
    np.testing.assert_array_equal(barcodes(list(copied.train_dataloader())), expected)


def test_protoplast_arguments_are_accepted(pert_server):
    with pytest.warns(UserWarning, match="pin_memory, sparse_key have no effect"):
        dm = make(pert_server, sparse_key="X", pin_memory=True, use_batches=False)
    assert dm.ignored_kwargs == ["pin_memory", "sparse_key"]
    dm.setup("fit")
    assert dm.info["match_controls_by_batch"] is False
    assert make(pert_server, use_batches=True).session_config()["match_controls_by_batch"] is True
    # protoplast's positional order: files, pert_embedding_file, hvg_file, config_path, ...
    positional = PerturbationDataModule(["k562.h5ad"], "emb.pt", None, None, 1, server=pert_server.flight_uri)
    assert positional.hparams.pert_embedding_file == "emb.pt" and positional.hparams.num_workers == 1
    with pytest.raises(ValueError, match="basal_mapping_strategy='nearest'"):
        make(pert_server, basal_mapping_strategy="nearest")


def test_use_batches_in_dataset_opts_turns_on_batch_matching(pert_server, pert_root):
    path = pert_root.parent / "use_batches.toml"
    path.write_text('[datasets]\nsynth = "{k562,rpe1}.h5ad"\n[dataset_opts]\nuse_batches = true\n')
    dm = datamodule(pert_server, files=None, config_path=str(path))
    assert dm.info["match_controls_by_batch"] is True and dm.info["control_fallbacks"] is not None


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(50, 50)

    def training_step(self, batch, _):
        pert = batch["pert_cell_emb"].to_dense().mean(1)
        ctrl = batch["ctrl_cell_emb"].to_dense().mean(1)
        return torch.nn.functional.mse_loss(self.net(ctrl), pert)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


@pytest.mark.timeout(180)
@pytest.mark.skipif(os.cpu_count() is not None and os.cpu_count() < 2, reason="two gloo ranks need two cores")
def test_ddp_spawn_fits(pert_server, tmp_path):
    """Lightning's ddp_spawn pickles the DataModule into each rank's process."""
    started = time.monotonic()
    dm = PerturbationDataModule(files=["k562.h5ad", "rpe1.h5ad"], group_size_S=4, batch_size=8, num_workers=1, server=pert_server.flight_uri)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=3, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )
    model = _Tiny()
    before = model.net.weight.detach().clone()
    trainer.fit(model, dm)
    assert trainer.state.finished
    assert not torch.equal(model.net.weight.detach(), before)  # rank 0's trained weights came back
    assert time.monotonic() - started < 150


def test_hvg_file_restricts_the_gene_axis(pert_server, pert_root, tmp_path):
    import anndata as ad

    hvg = ["gene00007", "gene00003", "gene00042"]  # in the file's order, not var order
    path = tmp_path / "hvg.txt"
    path.write_text("# top genes\n" + "\n".join(hvg) + "\n\n")
    full = datamodule(pert_server, seed=1)
    dm = datamodule(pert_server, seed=1, hvg_file=str(path))
    assert dm.var_names == hvg and dm.get_var_dims()["gene_dim"] == 3
    cols = [full.var_names.index(g) for g in hvg]
    for a, b in zip(list(full.train_dataloader())[:3], list(dm.train_dataloader())[:3]):
        np.testing.assert_array_equal(a["pert_cell_barcode"], b["pert_cell_barcode"])
        for key in ("pert_cell_emb", "ctrl_cell_emb"):
            assert tuple(b[key].shape) == (8, 4, 3)
            np.testing.assert_array_equal(b[key].to_dense().numpy(), a[key].to_dense().numpy()[..., cols])
    X = ad.read_h5ad(pert_root / "k562.h5ad").X
    assert X[:, cols].nnz < X.nnz  # the other genes' values were there, and are gone
    bad = tmp_path / "bad.txt"
    bad.write_text("gene00001\nNOPE1\n")
    with pytest.raises(ValueError, match="1 of its 2 genes are not among the files' var_names \\(first: NOPE1\\)"):
        datamodule(pert_server, hvg_file=str(bad))
    bad.write_text("gene00001\ngene00001\n")
    with pytest.raises(ValueError, match="lists genes more than once: gene00001"):
        make(pert_server, hvg_file=str(bad))
    with pytest.raises(ValueError, match="cannot read it"):
        make(pert_server, hvg_file=str(tmp_path / "none.txt"))
