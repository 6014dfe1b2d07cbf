"""Preprocessed parquet datasets streamed over Flight to TableDataModule (a real server)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellfeed.client import TableDataModule
from cellfeed.client.errors import RequestError
from cellfeed.server.preprocess.cli import main
from tests.fixtures.preprocess_h5ad import write_cellxgene_like


@pytest.fixture(scope="module")
def table_root(tmp_path_factory) -> Path:
    """A data root holding one pipeline output (train/test, small chunks and row groups)."""
    root = tmp_path_factory.mktemp("table") / "root"
    write_cellxgene_like(root / "in/cells.h5ad", n_cells=1800, n_genes=200, n_donors=20, seed=41)
    args = ["run-all", str(root / "in/cells.h5ad"), "--chunk-size", "300", "--test-size", "0.2", "--no-progress",
            "--interim-dir", str(root / "interim"), "--output-dir", str(root / "out"), "--log-dir", str(root / "logs")]
    assert main(args) == 0
    return root


@pytest.fixture(scope="module")
def table_server(table_root):
    from tests.conftest import ServerProcess

    server = ServerProcess(table_root)
    server.start()
    yield server
    server.stop()


def split_table(root: Path, split: str) -> pa.Table:
    files = sorted((root / "out/cells" / split / "chunks").glob("chunk_*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def module(server, **kw) -> TableDataModule:
    dm = TableDataModule(server.flight_uri, "out/cells", **kw)
    dm.setup("fit")
    return dm


def names(loader) -> list[list[str]]:
    return [batch["obs_names"].tolist() for batch in loader]


def test_one_epoch_covers_the_train_split_once_with_the_values_stored(table_server, table_root):
    train = split_table(table_root, "train")
    dm = module(table_server, columns=["obs_names", "age", "genes", "values"], batch_size=64, seed=3)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == -(-train.num_rows // 64)
    assert [len(b["obs_names"]) for b in batches[:-1]] == [64] * (len(batches) - 1)
    seen = [n for b in batches for n in b["obs_names"].tolist()]
    assert sorted(seen) == sorted(train.column("obs_names").to_pylist())
    assert seen != train.column("obs_names").to_pylist()  # shuffled
    by_name = {r["obs_names"]: r for r in train.to_pylist()}
    for batch in batches[:3]:
        offsets = batch["values_offsets"].numpy()
        for i, name in enumerate(batch["obs_names"]):
            row = by_name[name]
            assert batch["age"][i].item() == pytest.approx(row["age"])
            assert batch["genes"][i] == row["genes"]
            assert batch["values"][offsets[i] : offsets[i + 1]].tolist() == pytest.approx(row["values"])
    assert dm.info["splits"]["train"]["rows"] == train.num_rows and dm.info["manifest"]["split"]["by"] == "donor"


def test_shuffle_is_seeded_and_changes_with_the_epoch(table_server):
    first = module(table_server, columns=["obs_names"], batch_size=100, seed=5).train_dataloader()
    epoch0, epoch1 = names(first), names(first)  # iterating again moves to the next epoch
    again = module(table_server, columns=["obs_names"], batch_size=100, seed=5).train_dataloader()
    other_seed = module(table_server, columns=["obs_names"], batch_size=100, seed=6).train_dataloader()
    assert names(again) == epoch0
    assert epoch1 != epoch0 and sorted(sum(epoch1, [])) == sorted(sum(epoch0, []))
    assert names(other_seed) != epoch0


def test_two_ranks_get_equal_disjoint_shares(table_root, table_server):
    train = split_table(table_root, "train").column("obs_names").to_pylist()
    shares = [module(table_server, columns=["obs_names"], batch_size=50, seed=1, rank=r, world_size=2).train_dataloader() for r in (0, 1)]
    got = [sum(names(loader), []) for loader in shares]
    assert len(shares[0]) == len(shares[1]) == math.ceil(math.ceil(len(train) / 50) / 2)
    assert len(got[0]) == len(got[1]) == len(shares[0]) * 50  # full batches; the wrap-around pads
    padding = len(got[0]) + len(got[1]) - len(train)
    assert set(got[0]) | set(got[1]) == set(train)
    assert len(set(got[0]) & set(got[1])) <= padding
    assert len(got[0] + got[1]) - len(set(got[0] + got[1])) == padding

    dropped = [module(table_server, columns=["obs_names"], batch_size=50, seed=1, rank=r, world_size=2, drop_last=True).train_dataloader() for r in (0, 1)]
    kept = [sum(names(loader), []) for loader in dropped]
    assert len(dropped[0]) == len(train) // 100 and not set(kept[0]) & set(kept[1])


def test_test_split_streams_in_file_order(table_root, table_server):
    test = split_table(table_root, "test")
    dm = module(table_server, columns=["obs_names", "donor_id"], batch_size=70)
    loader = dm.test_dataloader()
    assert sum(names(loader), []) == test.column("obs_names").to_pylist()
    assert sum(names(loader), []) == test.column("obs_names").to_pylist()  # and again next time


def test_resume_mid_epoch_from_state_dict(table_server):
    dm = module(table_server, columns=["obs_names"], batch_size=40, seed=9)
    loader = dm.train_dataloader()
    full = names(loader)
    loader.set_epoch(0)
    taken = []
    for i, batch in enumerate(loader):
        taken.append(batch["obs_names"].tolist())
        if i == 4:
            state = dm.state_dict()
            break
    again = module(table_server, columns=["obs_names"], batch_size=40, seed=9)
    again.load_state_dict(state)
    rest = names(again.train_dataloader())
    assert taken + rest == full


@pytest.mark.parametrize(
    "kw, text",
    [
        ({"columns": ["obs_names", "nope"]}, "no column 'nope'"),
        ({"train_split": "validation"}, "no split 'validation'"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_configs_are_refused_with_a_message(table_server, kw, text):
    with pytest.raises(RequestError, match=text):
        module(table_server, **kw)


def test_bad_datasets_are_refused_with_a_message(table_server):
    with pytest.raises(RequestError, match="outside the server's data root"):
        TableDataModule(table_server.flight_uri, "../elsewhere").setup("fit")
    with pytest.raises(RequestError, match="file not found"):
        TableDataModule(table_server.flight_uri, "out/missing").setup("fit")
    dm = module(table_server, columns=["obs_names"])  # the server still serves
    assert len(dm.train_dataloader()) > 0


def test_a_plain_folder_of_parquet_is_one_split(table_root, table_server):
    dm = TableDataModule(table_server.flight_uri, "out/cells/test/chunks", columns=["obs_names"], batch_size=32, shuffle=False)
    dm.setup("fit")
    assert dm.train_split == "all" and dm.test_dataloader() == []
    assert sum(names(dm.train_dataloader()), []) == split_table(table_root, "test").column("obs_names").to_pylist()
    assert np.all(np.diff([len(x) for x in names(dm.train_dataloader())][:-1]) == 0)
