"""The table stream's contract: the training split named by `train_split`, declared padding,
nulls kept null with stable dtypes, and several datasets (a batch-mode output) streamed as one."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cellfeed.client import TableDataModule
from cellfeed.client.errors import RequestError
from cellfeed.server.preprocess.cli import main
from tests.fixtures.preprocess_h5ad import make_cellxgene_like, write


def run_all(root: Path, source: Path, *extra: str) -> None:
    args = ["run-all", str(source), "--chunk-size", "250", "--test-size", "0.2", "--no-progress",
            "--interim-dir", str(root / "interim"), "--output-dir", str(root / "out"), "--log-dir", str(root / "logs"), *extra]
    assert main(args) == 0


@pytest.fixture(scope="module")
def contract_root(tmp_path_factory) -> Path:
    """Two datasets made in one batch-mode run: `a` with a nullable int column and a categorical
    with missing values (nulls in some row groups only), `b` without those columns."""
    root = tmp_path_factory.mktemp("contract") / "root"
    a = make_cellxgene_like(n_cells=1200, n_genes=150, n_donors=15, seed=51)
    n = a.n_obs
    counts = pd.array(np.arange(n) % 50, dtype="Int64")
    counts[np.arange(n) % 400 < 20] = pd.NA  # nulls in a few runs of rows: most batches have none
    a.obs["umi_bins"] = counts
    a.obs["plain_int"] = np.arange(n, dtype=np.int64)
    note = pd.Categorical(np.where(np.arange(n) % 300 < 15, None, "ok"), categories=["ok"])
    a.obs["note"] = note
    write(root / "in/a.h5ad", a)
    write(root / "in/b.h5ad", make_cellxgene_like(n_cells=700, n_genes=150, n_donors=10, seed=52))
    run_all(root, root / "in", "--batch-mode")
    return root


@pytest.fixture(scope="module")
def contract_server(contract_root):
    from tests.conftest import ServerProcess

    server = ServerProcess(contract_root)
    server.start()
    yield server
    server.stop()


def table(root: Path, dataset: str, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted((root / "out" / dataset / split / "chunks").glob("*.parquet"))])


def module(server, dataset="out/a", **kw) -> TableDataModule:
    dm = TableDataModule(server.flight_uri, dataset, **kw)
    dm.setup("fit")
    return dm


def test_train_split_names_the_training_split_and_split_is_a_deprecated_alias(contract_server, contract_root):
    test_names = table(contract_root, "a", "test").column("obs_names").to_pylist()
    train_names = table(contract_root, "a", "train").column("obs_names").to_pylist()
    dm = module(contract_server, columns=["obs_names"], batch_size=50, train_split="test")
    assert dm.train_split == "test" and dm.hparams.train_split == "test"
    streamed = [n for b in dm.train_dataloader() for n in b["obs_names"].tolist()]
    assert sorted(streamed) == sorted(test_names)
    assert [n for b in dm.val_dataloader() for n in b["obs_names"].tolist()] == train_names  # the other split, in order

    with pytest.warns(FutureWarning, match="train_split"):
        old = TableDataModule(contract_server.flight_uri, "out/a", split="test", columns=["obs_names"], batch_size=50)
    old.setup("fit")
    assert old.train_split == "test" and sorted(n for b in old.train_dataloader() for n in b["obs_names"].tolist()) == sorted(test_names)
    with pytest.raises(ValueError, match="disagree"), pytest.warns(FutureWarning):
        TableDataModule(contract_server.flight_uri, "out/a", split="test", train_split="train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name does not warn
        module(contract_server, columns=["obs_names"], train_split="train")


def test_padding_is_declared_by_a_mask(contract_server, contract_root):
    train = table(contract_root, "a", "train").column("obs_names").to_pylist()
    batch = 64
    ranks = [module(contract_server, columns=["obs_names"], batch_size=batch, seed=2, rank=r, world_size=3) for r in range(3)]
    real: list[str] = []
    padded: list[str] = []
    for dm in ranks:
        for b in dm.train_dataloader():
            mask = b["padding"]
            assert mask.dtype == torch.bool and mask.shape == (len(b["obs_names"]),) == (batch,)
            names = b["obs_names"].tolist()
            real += [n for n, p in zip(names, mask.tolist()) if not p]
            padded += [n for n, p in zip(names, mask.tolist()) if p]
    assert sorted(real) == sorted(train)  # the unmasked rows are the split, each once
    assert len(padded) == len(ranks[0].train_dataloader()) * 3 * batch - len(train) > 0
    assert set(padded) <= set(train)
    info = ranks[0].info
    assert info["padding"] == "padding" and info["types"]["padding"] == "bool" and not info["nullable"]["padding"]
    alone = module(contract_server, columns=["obs_names"], batch_size=batch)
    assert not any(b["padding"].any() for b in alone.train_dataloader())


def test_nulls_stay_null_and_dtypes_are_the_same_in_every_batch(contract_server, contract_root):
    stored = table(contract_root, "a", "test")
    dm = module(contract_server, columns=["obs_names", "umi_bins", "plain_int", "note", "donor_id", "age"], batch_size=32, train_split="train")
    assert dm.info["nullable"]["umi_bins"] and dm.info["nullable"]["note"]
    assert not dm.info["nullable"]["plain_int"] and not dm.info["nullable"]["obs_names"]
    batches = list(dm.test_dataloader())
    assert any(not np.isnan(b["umi_bins"].numpy()).any() for b in batches)  # batches without a null...
    assert any(np.isnan(b["umi_bins"].numpy()).any() for b in batches)  # ...and with
    assert {b["umi_bins"].dtype for b in batches} == {torch.float64}
    assert {b["plain_int"].dtype for b in batches} == {torch.int64}
    assert {b["note"].dtype for b in batches} == {np.dtype(object)}
    assert {b["obs_names"].dtype.kind for b in batches} == {"U"}
    umi = np.concatenate([b["umi_bins"].numpy() for b in batches])
    expected = stored.column("umi_bins").to_pylist()
    assert [None if np.isnan(v) else int(v) for v in umi] == expected
    notes = [v for b in batches for v in b["note"].tolist()]
    assert notes == stored.column("note").to_pylist() and None in notes and "None" not in notes
    assert np.concatenate([b["plain_int"].numpy() for b in batches]).tolist() == stored.column("plain_int").to_pylist()


def test_a_batch_mode_output_folder_streams_as_one_dataset(contract_server, contract_root):
    trains = {d: table(contract_root, d, "train") for d in ("a", "b")}
    dm = module(contract_server, "out", columns=["obs_names", "dataset_name", "umi_bins", "cell_type", "genes"], batch_size=100, seed=4)
    assert dm.info["datasets"] == ["a", "b"] and dm.train_split == "train"
    assert dm.info["splits"]["train"]["rows"] == sum(t.num_rows for t in trains.values())
    rows = {}
    for b in dm.train_dataloader():
        for i, name in enumerate(b["obs_names"].tolist()):
            rows[name] = (b["dataset_name"][i], b["umi_bins"][i].item(), b["cell_type"][i], b["genes"][i])
    for d, t in trains.items():
        for r in t.select(["obs_names", "cell_type", "genes"] + (["umi_bins"] if d == "a" else [])).to_pylist():
            got = rows.pop(r["obs_names"])
            assert got[0] == d and got[2] == r["cell_type"] and got[3] == r["genes"]
            if d == "a":
                assert (np.isnan(got[1]) and r["umi_bins"] is None) or got[1] == r["umi_bins"]
            else:
                assert np.isnan(got[1])  # b has no such column: null
    assert not rows  # every train row of both, once
    test_rows = [(b["dataset_name"][i], n) for b in dm.test_dataloader() for i, n in enumerate(b["obs_names"].tolist())]
    assert test_rows == [(d, n) for d in ("a", "b") for n in table(contract_root, d, "test").column("obs_names").to_pylist()]

    listed = module(contract_server, ["out/b", "out/a"], columns=["obs_names", "dataset_name"], batch_size=100, shuffle=False)
    assert listed.info["datasets"] == ["b", "a"]
    names = [(b["dataset_name"][i], n) for b in listed.train_dataloader() for i, n in enumerate(b["obs_names"].tolist())]
    assert names == [(d, n) for d in ("b", "a") for n in trains[d].column("obs_names").to_pylist()]


def test_datasets_that_cannot_stream_as_one_are_refused_naming_them(contract_server, contract_root):
    with pytest.raises(RequestError, match="no column 'nope'"):
        module(contract_server, "out", columns=["obs_names", "nope"])
    with pytest.raises(RequestError, match="no parquet files, and no dataset folders"):
        module(contract_server, "logs")
    with pytest.raises(RequestError, match="both named 'a'"):
        module(contract_server, ["out/a", "out/a"])
    with pytest.raises(RequestError, match="has splits"):
        module(contract_server, ["out/a", "interim/parquet_chunks/a"] if (contract_root / "interim/parquet_chunks/a").exists() else ["out/a", "out/b/train/chunks"])
    assert len(module(contract_server, "out", columns=["obs_names"]).train_dataloader()) > 0  # the server still serves
