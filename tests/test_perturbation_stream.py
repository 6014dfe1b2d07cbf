"""The perturbation stream end to end: a real server on loopback, real h5ad files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from cellfeed.client import PerturbationDataModule
from cellfeed.client import perturbation as client_perturbation
from cellfeed.wire import shm
from tests.conftest import TARGETS
from tests.helpers import barcodes, datamodule, epoch, obs_table

FILES = ["k562.h5ad", "rpe1.h5ad"]


@pytest.fixture(scope="module")
def obs(pert_root):
    return obs_table(pert_root, FILES)


def test_batch_schema_matches_protoplast(pert_server):
    dm = datamodule(pert_server, pert_embedding_file="emb.pt")
    batch = next(iter(dm.train_dataloader()))
    B, S, G = 8, 4, 50
    for key in ("pert_cell_emb", "ctrl_cell_emb"):
        assert batch[key].layout == torch.sparse_coo and batch[key].dtype == torch.float32
        assert tuple(batch[key].shape) == (B, S, G)
    assert tuple(batch["pert_emb"].shape) == (B, 8)
    assert batch["pert_name"].shape == (B,) and batch["pert_name"].dtype.kind == "U"
    assert batch["cell_type"].shape == (B,) and set(batch["cell_type"]) <= {"k562", "rpe1"}
    assert tuple(batch["cell_type_onehot"].shape) == (B, S, 2)
    assert tuple(batch["batch_onehot"].shape) == (B, S, 2)
    assert tuple(batch["pert_idx"].shape) == (B, 1)
    assert batch["pert_cell_barcode"].shape == (B, S) and batch["ctrl_cell_barcode"].shape == (B, S)


# the decoder takes cell numbers mod S by mask or by remainder, in one chunk or in many
@pytest.mark.parametrize("S", [4, 3])
@pytest.mark.parametrize("chunk_values", [None, 16])
def test_expression_values_match_the_file(pert_server, pert_root, obs, S, chunk_values, monkeypatch):
    """Every perturbed and control row equals the file's X row of that barcode."""
    import anndata as ad

    if chunk_values is not None:
        monkeypatch.setattr(client_perturbation, "CHUNK_VALUES", chunk_values)
    dm = datamodule(pert_server, group_size_S=S)
    X = {f: ad.read_h5ad(pert_root / f).X.toarray() for f in FILES}
    for batch in list(dm.train_dataloader())[:3]:
        for key, bc_key in (("pert_cell_emb", "pert_cell_barcode"), ("ctrl_cell_emb", "ctrl_cell_barcode")):
            dense = batch[key].to_dense().numpy()
            for b in range(dense.shape[0]):
                for s in range(dense.shape[1]):
                    row = obs.loc[batch[bc_key][b, s]]
                    np.testing.assert_array_equal(dense[b, s], X[row["file"] + ".h5ad"][row["row"]])


def test_gene_indices_travel_as_uint16_or_int32_by_gene_count(pert_server, serve, tmp_path):
    """2-byte gene indices when the genes fit (almost always), 4-byte beyond 65,536 genes; the
    batches decode to the file's rows either way."""
    import anndata as ad

    from cellfeed.server.kinds.perturbation.synthetic import write_perturbation_h5ad

    def first_record_batch(dm):
        loader = dm.train_dataloader()
        decode, loader.decode = loader.decode, lambda rb: rb
        rb = next(iter(loader))
        loader.decode = decode
        return rb

    narrow = first_record_batch(datamodule(pert_server, control_table_max_bytes=0))
    assert narrow.schema.field("pert_indices").type == narrow.schema.field("ctrl_indices").type == pa.list_(pa.uint16())

    root = tmp_path / "wide"
    adata = write_perturbation_h5ad(root / "wide.h5ad", n_genes=70_000, density=0.002, n_targets=2, cells_per_target=(8, 8), n_controls=16)
    server = serve(root)
    dm = datamodule(server, files=["wide.h5ad"], control_table_max_bytes=0)
    wide = first_record_batch(dm)
    assert wide.schema.field("pert_indices").type == wide.schema.field("ctrl_indices").type == pa.list_(pa.int32())
    X = ad.read_h5ad(root / "wide.h5ad").X.toarray()
    names = list(adata.obs_names)
    for batch in dm.train_dataloader():
        for key, bc_key in (("pert_cell_emb", "pert_cell_barcode"), ("ctrl_cell_emb", "ctrl_cell_barcode")):
            dense = batch[key].to_dense().numpy()
            for b in range(dense.shape[0]):
                for s in range(dense.shape[1]):
                    np.testing.assert_array_equal(dense[b, s], X[names.index(batch[bc_key][b, s])])


def test_controls_sent_once_or_inline_give_identical_batches(pert_server):
    by_row = datamodule(pert_server, seed=3)
    inline = datamodule(pert_server, seed=3, control_table_max_bytes=0)
    assert by_row.info["controls"] == "table" and inline.info["controls"] == "inline"
    for a, b in zip(epoch(by_row.train_dataloader(), 1), epoch(inline.train_dataloader(), 1)):
        np.testing.assert_array_equal(a["ctrl_cell_barcode"], b["ctrl_cell_barcode"])
        assert torch.equal(a["ctrl_cell_emb"].to_dense(), b["ctrl_cell_emb"].to_dense())


@pytest.mark.skipif(shm.shm_dir() is None, reason="no shared-memory folder on this machine")
@pytest.mark.parametrize("inline", [False, True])
def test_csr_rows_come_in_slots_on_the_same_host_as_grpc_sends_them(pert_server, inline):
    """Same host: the server gathers each batch's CSR rows straight into a shared-memory slot
    (controls too, when they travel inline); the batches equal those streamed over gRPC."""
    opts = dict(seed=5, control_table_max_bytes=0 if inline else 256 << 20)
    via_slots, via_grpc = datamodule(pert_server, shared_memory=True, **opts), datamodule(pert_server, shared_memory=False, **opts)
    slots, grpc = via_slots.train_dataloader(), via_grpc.train_dataloader()
    assert slots.slots is not None and grpc.slots is None
    held = epoch(slots, 1)  # held batches stay intact while later ones are written
    assert slots.slots._maps, "the stream's batches named no slot"
    for a, b in zip(held, epoch(grpc, 1), strict=True):
        np.testing.assert_array_equal(a["pert_cell_barcode"], b["pert_cell_barcode"])
        for key in ("pert_cell_emb", "ctrl_cell_emb"):
            assert torch.equal(a[key].to_dense(), b[key].to_dense())
    via_slots.teardown("fit")
    via_grpc.teardown("fit")


def test_every_train_cell_is_drawn_each_epoch_and_only_last_groups_padded(pert_server, obs):
    dm = datamodule(pert_server)
    loader = dm.train_dataloader()
    perturbed = obs[obs.target_gene != "non-targeting"]
    for e in (0, 1):
        batches = epoch(loader, e)
        drawn = barcodes(batches)
        assert set(drawn) == set(perturbed.index)
        # items per (file, target) = ceil(n / S): only the last group of a target is padded
        items = {}
        for b in batches:
            for names in b["pert_cell_barcode"]:
                key = tuple(obs.loc[list(names), ["file", "target_gene"]].astype(str).drop_duplicates().itertuples(index=False))
                assert len(key) == 1, "a group mixes targets or files"
                items[key[0]] = items.get(key[0], 0) + 1
        expected = perturbed.groupby(["file", "target_gene"], observed=True).size().map(lambda n: -(-n // 4))
        total_items = int(expected.sum())
        n_batches = len(loader)
        assert n_batches == -(-total_items // 8)
        padding = n_batches * 8 - total_items  # declared padding: wrap-around items at the end
        assert sum(items.values()) == total_items + padding
        for (f, t), n in expected.items():
            assert items[(f, t)] >= n


def test_cells_are_shuffled_within_targets_and_epochs_differ(pert_server):
    dm = datamodule(pert_server)
    loader = dm.train_dataloader()
    first, second = epoch(loader, 0), epoch(loader, 1)
    groups0 = {frozenset(g) for b in first for g in b["pert_cell_barcode"]}
    groups1 = {frozenset(g) for b in second for g in b["pert_cell_barcode"]}
    assert groups0 != groups1, "the same cells share a group in every epoch"
    assert [list(b["pert_name"]) for b in first] != [list(b["pert_name"]) for b in second]


def test_same_seed_and_epoch_give_identical_batches(pert_server):
    a = epoch(datamodule(pert_server, seed=7, num_workers=1).train_dataloader(), 3)
    b = epoch(datamodule(pert_server, seed=7, num_workers=3).train_dataloader(), 3)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["pert_cell_barcode"], y["pert_cell_barcode"])
        np.testing.assert_array_equal(x["ctrl_cell_barcode"], y["ctrl_cell_barcode"])
        assert torch.equal(x["pert_cell_emb"].to_dense(), y["pert_cell_emb"].to_dense())
    c = epoch(datamodule(pert_server, seed=8).train_dataloader(), 3)
    assert any(not np.array_equal(x["pert_cell_barcode"], z["pert_cell_barcode"]) for x, z in zip(a, c))


def test_batches_mix_targets_and_cell_types(pert_server):
    batches = epoch(datamodule(pert_server, batch_size=16).train_dataloader(), 0)
    full = batches[:-1]
    assert np.mean([len(set(b["pert_name"])) for b in full]) > 3
    assert any(len(set(b["cell_type"])) == 2 for b in full)


def test_controls_come_from_the_same_file_and_cell_type(pert_server, obs):
    for b in epoch(datamodule(pert_server).train_dataloader(), 0):
        for p_names, c_names in zip(b["pert_cell_barcode"], b["ctrl_cell_barcode"]):
            ctrl = obs.loc[list(c_names)]
            assert (ctrl.target_gene == "non-targeting").all()
            assert set(ctrl.file) == set(obs.loc[list(p_names), "file"])
            assert set(ctrl.cell_type.astype(str)) == set(obs.loc[list(p_names), "cell_type"].astype(str))
            assert len(set(c_names)) == len(c_names), "controls drawn with replacement from a large pool"


def test_labels_and_one_hots_match_each_cells_obs(pert_server, obs):
    """pert_name, cell_type, pert_idx and both one-hots say what obs says of every perturbed cell."""
    dm = datamodule(pert_server, prefix_batches_with_file=True)
    batches = epoch(dm.train_dataloader(), 0)
    for b in batches:
        cells = obs.loc[b["pert_cell_barcode"].ravel()]
        S = b["pert_cell_barcode"].shape[1]
        np.testing.assert_array_equal(np.repeat(b["pert_name"], S), cells.target_gene.astype(str))
        np.testing.assert_array_equal(np.repeat(b["cell_type"], S), cells.cell_type.astype(str))
        np.testing.assert_array_equal(np.asarray(dm.target_vocab)[b["pert_idx"].numpy().ravel()], b["pert_name"])
        cell_types = np.asarray(dm.cell_type_vocab)[b["cell_type_onehot"].numpy().argmax(-1).ravel()]
        np.testing.assert_array_equal(cell_types, cells.cell_type.astype(str))
        batch_labels = np.asarray(dm.batch_vocab)[b["batch_onehot"].numpy().argmax(-1).ravel()]
        np.testing.assert_array_equal(batch_labels, cells.file + ":" + cells.batch_var.astype(str))
        assert (b["batch_onehot"].numpy().sum(-1) == 1).all() and (b["cell_type_onehot"].numpy().sum(-1) == 1).all()


def test_controls_are_drawn_afresh_per_item(pert_server):
    batches = epoch(datamodule(pert_server).train_dataloader(), 0)
    sets = [frozenset(c) for b in batches for c in b["ctrl_cell_barcode"]]
    assert len(set(sets)) > 0.9 * len(sets)


def test_match_controls_by_batch(pert_server, obs):
    for b in epoch(datamodule(pert_server, match_controls_by_batch=True).train_dataloader(), 0):
        pert_batches = obs.loc[b["pert_cell_barcode"].ravel(), "batch_var"].astype(str).to_numpy()
        ctrl_batches = obs.loc[b["ctrl_cell_barcode"].ravel(), "batch_var"].astype(str).to_numpy()
        np.testing.assert_array_equal(pert_batches, ctrl_batches)


def test_embeddings_and_missing_targets_get_zeros(pert_server, pert_root):
    table = torch.load(pert_root / "emb.pt")
    dm = datamodule(pert_server, pert_embedding_file="emb.pt")
    assert dm.embedding_dim == 8
    assert dm.info["missing_embeddings"] == [TARGETS[-1]]
    seen_missing = False
    for b in epoch(dm.train_dataloader(), 0):
        for name, emb in zip(b["pert_name"], b["pert_emb"]):
            if name in table:
                assert torch.equal(emb, table[name])
            else:
                seen_missing = True
                assert torch.count_nonzero(emb) == 0
    assert seen_missing


def test_without_embeddings_pert_emb_is_one_hot(pert_server):
    dm = datamodule(pert_server)
    b = next(iter(dm.train_dataloader()))
    vocab = dm.target_vocab
    assert tuple(b["pert_emb"].shape) == (8, len(vocab))
    for name, emb, idx in zip(b["pert_name"], b["pert_emb"], b["pert_idx"]):
        assert int(emb.argmax()) == vocab.index(name) == int(idx)


def test_vocabularies_are_shared_by_every_split(pert_server, pert_root):
    toml = pert_root.parent / "vocab.toml"
    toml.write_text(
        '[datasets]\nsynth = "{k562,rpe1}.h5ad"\n[training]\nsynth = "train"\n'
        '[fewshot."synth.rpe1"]\nval = ["G000"]\ntest = ["G001"]\n'
    )
    dm = datamodule(pert_server, files=None, config_path=str(toml))
    assert dm.cell_type_vocab == ["k562", "rpe1"]
    assert dm.batch_vocab == ["batch0", "batch1"]
    assert len(dm.var_names) == 50 and dm.var_names[0] == "gene00000"
    for split in ("train", "val", "test"):
        b = next(iter(dm.loader(split)))
        assert b["cell_type_onehot"].shape[-1] == 2 and b["batch_onehot"].shape[-1] == 2
        names = np.asarray(dm.cell_type_vocab)[b["cell_type_onehot"].argmax(-1)[:, 0].numpy()]
        np.testing.assert_array_equal(names, b["cell_type"])


def test_prefix_batches_with_file(pert_server):
    dm = datamodule(pert_server, prefix_batches_with_file=True)
    assert dm.batch_vocab == ["k562:batch0", "k562:batch1", "rpe1:batch0", "rpe1:batch1"]


def test_ddp_ranks_are_disjoint_equal_and_cover_the_split(pert_server):
    shares = []
    for rank in (0, 1):
        loader = datamodule(pert_server, rank=rank, world_size=2).train_dataloader()
        batches = epoch(loader, 0)
        assert len(batches) == len(loader)
        shares.append(batches)
    assert len(shares[0]) == len(shares[1])
    items = [[frozenset(g) for b in share for g in b["pert_cell_barcode"]] for share in shares]
    single = epoch(datamodule(pert_server).train_dataloader(), 0)
    assert set(barcodes(shares[0])) | set(barcodes(shares[1])) == set(barcodes(single))
    # no item is served to both ranks except the declared wrap-around padding at the end
    overlap = set(items[0]) & set(items[1])
    total_items = sum(len(i) for i in items)
    assert len(overlap) <= total_items - len(set(items[0]) | set(items[1]))


def test_len_is_exact_for_every_world_size(pert_server):
    for world in (1, 2, 3):
        for rank in range(world):
            loader = datamodule(pert_server, rank=rank, world_size=world, batch_size=5).train_dataloader()
            assert len(list(loader)) == len(loader)


def test_fewshot_and_zeroshot_splits_from_toml(pert_server, pert_root, obs):
    toml = pert_root.parent / "splits.toml"
    toml.write_text(
        '[datasets]\nsynth = "{k562,rpe1}.h5ad"\n[training]\nsynth = "train"\n'
        '[zeroshot]\n"synth.k562" = "test"\n'
        '[fewshot."synth.rpe1"]\nval = ["G000", "G001"]\ntest = ["G002"]\n'
    )
    dm = datamodule(pert_server, files=None, config_path=str(toml))
    seen = {}
    for split in ("train", "val", "test"):
        seen[split] = obs.loc[barcodes(epoch(dm.loader(split)))]
    assert set(seen["train"].file) == {"rpe1"}
    assert set(seen["train"].target_gene.astype(str)) == {"G003", "G004", "G005"}
    assert set(seen["val"].file) == {"rpe1"} and set(seen["val"].target_gene.astype(str)) == {"G000", "G001"}
    test = seen["test"]
    assert set(test[test.file == "k562"].target_gene.astype(str)) == set(TARGETS)
    assert set(test[test.file == "rpe1"].target_gene.astype(str)) == {"G002"}
    assert "non-targeting" not in set(seen["train"].target_gene.astype(str))


def test_single_target_split_is_not_dropped(pert_server, pert_root, obs):
    """protoplast drops a split made of one target region; here it is served."""
    toml = pert_root.parent / "one.toml"
    toml.write_text('[datasets]\nsynth = "{k562,rpe1}.h5ad"\n[fewshot."synth.rpe1"]\nval = ["G004"]\n')
    dm = datamodule(pert_server, files=None, config_path=str(toml))
    val = obs.loc[barcodes(epoch(dm.loader("val")))]
    expected = obs[(obs.file == "rpe1") & (obs.target_gene == "G004")]
    assert set(val.index) == set(expected.index)


def test_dataset_opts_and_loader_tables_apply(pert_server, pert_root):
    toml = pert_root.parent / "opts.toml"
    toml.write_text(
        '[datasets]\nsynth = "*.h5ad"\n[dataset_opts]\nn_basal_samples = 2\ntarget_label = "target_gene"\n'
        "[loader]\nnum_workers = 3\n"
    )
    dm = PerturbationDataModule(config_path=str(toml), batch_size=8, server=pert_server.flight_uri)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_streams == 3
    assert tuple(next(iter(loader))["pert_cell_emb"].shape) == (8, 2, 50)


def test_stages_have_their_loaders(pert_server, pert_root):
    toml = pert_root.parent / "stages.toml"
    toml.write_text('[datasets]\nsynth = "{k562,rpe1}.h5ad"\n[fewshot."synth.k562"]\nval = ["G000"]\ntest = ["G001"]\n')
    dm = PerturbationDataModule(config_path=str(toml), group_size_S=4, batch_size=4, server=pert_server.flight_uri)
    for stage in ("fit", "validate", "test", "predict"):
        dm.setup(stage)
    assert len(dm.train_dataloader()) > 0
    assert set(next(iter(dm.val_dataloader()))["pert_name"]) == {"G000"}
    assert set(next(iter(dm.test_dataloader()))["pert_name"]) == {"G001"}
    assert len(dm.predict_dataloader()) == len(dm.test_dataloader())
