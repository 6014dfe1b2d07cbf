"""Bad input fails only the request that sent it, with a message naming the culprit."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow.flight as flight
import pytest
import torch

from cellfeed.client import PerturbationDataModule, RequestError
from cellfeed.client.connection import Connection
from cellfeed.server.kinds.perturbation.synthetic import PerturbationSpec, make_perturbation_adata, write_perturbation_h5ad
from tests.helpers import barcodes, epoch


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "data"
    good = write_perturbation_h5ad(root / "good.h5ad", cell_type="k562", seed=1)
    (root / "notes.h5ad").write_text("this is not HDF5")

    labels = good.obs["target_gene"].astype(str).to_numpy()
    ctrl = np.flatnonzero(labels == "non-targeting")
    shuffled = np.random.default_rng(0).permutation(np.flatnonzero(labels != "non-targeting"))
    good[np.concatenate([shuffled, ctrl])].copy().write_h5ad(root / "unsorted.h5ad")

    order = np.concatenate([ctrl[:10], np.flatnonzero(labels != "non-targeting"), ctrl[10:]])
    good[order].copy().write_h5ad(root / "split_controls.h5ad")

    two = make_perturbation_adata(PerturbationSpec(cell_type="k562", seed=4))
    cell_types = np.where(np.arange(two.n_obs) % 2 == 0, "k562", "hepg2")
    cell_types[two.obs["target_gene"].to_numpy() == "non-targeting"] = "k562"
    two.obs["cell_type"] = cell_types
    two.obs["cell_type"] = two.obs["cell_type"].astype("category")
    two.write_h5ad(root / "no_hepg2_controls.h5ad")

    torch.save(["not", "a", "dict"], root / "list.pt")
    torch.save({"G000": torch.zeros(4), "G001": torch.zeros(5)}, root / "ragged.pt")
    (root / "garbage.pt").write_bytes(b"\x00\x01garbage")
    (root.parent / "outside.h5ad").write_text("outside")
    return root


@pytest.fixture(scope="module")
def bad_server(bad_root):
    from tests.conftest import ServerProcess

    server = ServerProcess(bad_root).start()
    yield server
    server.stop()


def open_with(server, **config):
    base = {"files": ["good.h5ad"], "group_size_S": 4, "batch_size": 4}
    base.update(config)
    return Connection(server.flight_uri, retry_seconds=5).open_session("perturbation", base)


CASES = [
    ({"files": ["missing.h5ad"]}, r"file not found: 'missing.h5ad'"),
    ({"files": ["notes.h5ad"]}, r"notes.h5ad: not an HDF5/h5ad file"),
    ({"files": ["../outside.h5ad"]}, r"outside the server's data root"),
    ({"files": ["/etc/passwd"]}, r"outside the server's data root"),
    ({"batch_label": "gem_group"}, r"good.h5ad: obs has no column 'gem_group'"),
    ({"target_label": "gene"}, r"good.h5ad: obs has no column 'gene'"),
    ({"control_label": "DMSO"}, r"good.h5ad: no control cells: obs column 'target_gene' has no value 'DMSO'"),
    ({"files": ["unsorted.h5ad"]}, r"unsorted.h5ad: rows are not sorted by target_gene: target '.*' starts again at row \d+ \(obs_name 'k562_\d+'\); rewrite it sorted with `cellfeed preprocess sort`"),
    ({"files": ["split_controls.h5ad"]}, r"split_controls.h5ad: controls \(target_gene == 'non-targeting'\) are not contiguous: they start again at row \d+"),
    ({"files": ["no_hepg2_controls.h5ad"]}, r"no_hepg2_controls.h5ad: no control cells .* for cell type 'hepg2'"),
    ({"pert_embedding_file": "list.pt"}, r"list.pt: the embedding file must hold a non-empty dict"),
    ({"pert_embedding_file": "ragged.pt"}, r"ragged.pt: embedding for 'G001' has 5 values, others have 4"),
    ({"pert_embedding_file": "garbage.pt"}, r"garbage.pt: cannot read the embedding file with torch.load"),
    ({"pert_embedding_file": "nope.pt"}, r"file not found: 'nope.pt'"),
    ({"group_size_S": 0}, r"group_size_S: Input should be greater than or equal to 1"),
    ({"bogus": 1}, r"perturbation config: unknown key 'bogus' \(known: files, toml, .*batch_size"),
    ({"files": None, "toml": '[datasets]\nsynth = "good.h5ad"\n[zeroshot]\n"synth.k562" = "holdout"\n'}, r"\[zeroshot\] 'synth.k562' = 'holdout' is not a split name"),
    ({"files": None, "toml": '[datasets]\nsynth = "good.h5ad"\n[fewshot."other.k562"]\nval = ["G000"]\n'}, r"names dataset 'other', which \[datasets\] does not define"),
    ({"files": None, "toml": '[datasets]\nsynth = "good.h5ad"\n[fewshot."synth.hela"]\nval = ["G000"]\n'}, r"\[fewshot\] key 'synth.hela' names no cell type or file of dataset 'synth'"),
    ({"files": None, "toml": '[datasets]\nsynth = "good.h5ad"\n[fewshot."synth.k562"]\ntrain = ["G000"]\n'}, r"unknown split 'train' \(use val or test\)"),
    ({"files": None, "toml": '[datasets]\nsynth = "*.zarr"\n'}, r"pattern '\*.zarr' matches no .h5ad file"),
    ({"files": None, "toml": "[datasets\n"}, r"TOML config: "),
    ({"files": None, "toml": '[datasets]\nsynth = "good.h5ad"\n[trainng]\nsynth = "train"\n'}, r"unknown table \[trainng\]"),
]


@pytest.mark.parametrize("config,message", CASES, ids=[m[:40] for _, m in CASES])
def test_bad_input_is_refused_with_a_clear_message(bad_server, config, message):
    with pytest.raises(RequestError, match=message):
        open_with(bad_server, **config)


def test_malformed_ticket_and_unknown_session(bad_server):
    client = flight.connect(bad_server.flight_uri)
    with pytest.raises(flight.FlightServerError, match="malformed ticket"):
        client.do_get(flight.Ticket(b"\xff\xff not a protobuf")).read_all()
    from cellfeed.wire import cellfeed_pb2 as pb

    ticket = pb.Ticket(session_id="nope", split="train", world_size=1, stream_count=1).SerializeToString()
    with pytest.raises(flight.FlightServerError, match="unknown session 'nope'"):
        client.do_get(flight.Ticket(ticket)).read_all()
    with pytest.raises(flight.FlightServerError, match="malformed ticket: rank 3 / world size 2"):
        bad = pb.Ticket(session_id="nope", split="train", rank=3, world_size=2, stream_count=1)
        client.do_get(flight.Ticket(bad.SerializeToString())).read_all()


def test_unknown_split_is_refused(bad_server):
    dm = PerturbationDataModule(files=["good.h5ad"], group_size_S=4, batch_size=4, server=bad_server.flight_uri)
    dm.setup("fit")
    with pytest.raises(RequestError, match="unknown split 'holdout'"):
        len(dm.loader("holdout"))


def test_server_keeps_serving_others_while_refusing_bad_requests(bad_server):
    dm = PerturbationDataModule(files=["good.h5ad"], group_size_S=4, batch_size=4, barcodes=True, server=bad_server.flight_uri, num_workers=2)
    dm.setup("fit")
    reference = epoch(dm.train_dataloader(), 0)
    errors: list[str] = []

    def hammer() -> None:
        for config, message in CASES * 2:
            try:
                open_with(bad_server, **config)
            except RequestError as exc:
                errors.append(str(exc))

    thread = threading.Thread(target=hammer)
    thread.start()
    got = []
    for _ in range(3):
        got.append(epoch(dm.train_dataloader(), 0))
    thread.join()
    assert len(errors) == 2 * len(CASES)
    for batches in got:
        np.testing.assert_array_equal(barcodes(batches), barcodes(reference))
