"""Mid-epoch resume from state_dict, and surviving a server crash mid-epoch."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import torch

from cellfeed.client import PerturbationDataModule, ServerUnavailable
from cellfeed.client.connection import Connection
from cellfeed.server.kinds.perturbation.synthetic import write_perturbation_h5ad
from tests.helpers import barcodes, datamodule, epoch


def test_resume_mid_epoch_from_state_dict(pert_server):
    full = epoch(datamodule(pert_server).train_dataloader(), 2)
    dm = datamodule(pert_server)
    loader = dm.train_dataloader()
    loader.set_epoch(2)
    seen = []
    for i, batch in enumerate(loader):
        seen.append(batch)
        if i == 4:
            state = dm.state_dict()
            break
    assert state["train"]["epoch"] == 2 and state["train"]["next_batch"] == 5

    fresh = datamodule(pert_server)
    fresh.load_state_dict(state)
    rest = list(fresh.train_dataloader())
    assert len(seen) + len(rest) == len(full)
    np.testing.assert_array_equal(barcodes(seen + rest), barcodes(full))
    np.testing.assert_array_equal(barcodes(seen + rest, "ctrl_cell_barcode"), barcodes(full, "ctrl_cell_barcode"))
    # the next pass is the next epoch, from its start
    assert fresh.train_dataloader().epoch == 3


def test_resume_refuses_another_world_size(pert_server):
    dm = datamodule(pert_server)
    dm.train_dataloader()
    state = dm.state_dict()
    other = datamodule(pert_server, rank=0, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(state)
        other.train_dataloader()


def test_reconnects_after_the_server_is_killed_mid_epoch(serve, tmp_path):
    root = tmp_path / "data"
    # ~15 MB per epoch: more than gRPC buffers, so the kill lands mid-stream
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562", n_targets=40, n_genes=4000, density=0.3, seed=3)
    server = serve(root)
    reference = epoch(datamodule(server, files=["k562.h5ad"], batch_size=4).train_dataloader(), 0)

    dm = datamodule(server, files=["k562.h5ad"], batch_size=4, prefetch_factor=1)
    restart = threading.Timer(1.5, server.start)  # back on the same ports, with no memory
    got = []
    for i, batch in enumerate(dm.train_dataloader()):
        got.append(batch)
        if i == 1:
            server.kill()
            restart.start()
    restart.join()
    assert len(got) == len(reference)
    np.testing.assert_array_equal(barcodes(got), barcodes(reference))
    np.testing.assert_array_equal(barcodes(got, "ctrl_cell_barcode"), barcodes(reference, "ctrl_cell_barcode"))
    # the restarted server saw the session reopened and streams resumed past the start
    sessions = httpx.get(f"{server.http_url}/v1/sessions").json()
    assert sessions and max(s["first_batch"] for s in sessions[0]["streams"]) > 0


def test_gives_up_with_a_clear_error_after_the_retry_budget(serve, tmp_path):
    root = tmp_path / "data"
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562", n_targets=12, seed=3)
    server = serve(root)
    dm = PerturbationDataModule(files=["k562.h5ad"], group_size_S=4, batch_size=4, server=server.flight_uri, prefetch_factor=1)
    dm.setup("fit")
    dm._connection.retry_seconds = 2.0
    loader = dm.train_dataloader()
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="failed for 2 s while streaming batch"):
        # Killed mid-epoch; when the rest of this small epoch was already on its way (in
        # socket buffers), the next epoch's streams meet the dead server instead.
        for epoch in range(2):
            loader.set_epoch(epoch)
            for i, _ in enumerate(loader):
                if epoch == 0 and i == 1:
                    server.kill()
    assert time.monotonic() - started < 30


def test_unreachable_server_fails_setup_clearly(tmp_path):
    conn = Connection("grpc://127.0.0.1:9", retry_seconds=1.0)
    with pytest.raises(ServerUnavailable, match="unreachable"):
        conn.open_session("perturbation", {"files": ["x.h5ad"]})


def _streams(server, session_id: str) -> list[dict]:
    return next(s for s in httpx.get(f"{server.http_url}/v1/sessions").json() if s["session_id"] == session_id)["streams"]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(barcodes(a), barcodes(b))
    np.testing.assert_array_equal(barcodes(a, "ctrl_cell_barcode"), barcodes(b, "ctrl_cell_barcode"))
    for x, y in zip(a, b):
        assert torch.equal(x["pert_cell_emb"].to_dense(), y["pert_cell_emb"].to_dense())


def test_training_streams_go_on_into_the_next_epoch(serve, tmp_path):
    """The next epoch's batches are on their way before the loop asks (no new streams), and they
    are exactly the batches a fresh loader gives for that epoch."""
    root = tmp_path / "data"
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562", n_targets=10, seed=4)
    server = serve(root)
    dm = datamodule(server, files=["k562.h5ad"], batch_size=4, seed=11)
    loader = dm.train_dataloader()
    first, second = list(loader), list(loader)  # epochs 0 and 1, as a training loop takes them
    assert loader.epoch == 2
    session = dm.session.session_id
    assert len(_streams(server, session)) == dm.num_streams  # epoch 1 opened no stream
    fresh = datamodule(server, files=["k562.h5ad"], batch_size=4, seed=11).train_dataloader()
    _same(first, epoch(fresh, 0))
    _same(second, epoch(fresh, 1))
    # a loop that goes elsewhere (another epoch, a resume point) gets what it asks for
    _same(epoch(loader, 5), epoch(fresh, 5))
    dm.teardown("fit")


def test_streams_nobody_takes_up_end(serve, tmp_path, monkeypatch):
    from cellfeed.client import loader as loader_module

    monkeypatch.setattr(loader_module, "UNCLAIMED_S", 0.5)
    root = tmp_path / "data"
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562", n_targets=10, seed=4)
    server = serve(root)
    dm = datamodule(server, files=["k562.h5ad"], batch_size=4, seed=11)
    loader = dm.train_dataloader()
    list(loader)
    deadline = time.monotonic() + 10
    while any(s["state"] == "streaming" for s in _streams(server, dm.session.session_id)):
        assert time.monotonic() < deadline, "streams gone on into an epoch nobody asked for kept running"
        time.sleep(0.05)
    fresh = datamodule(server, files=["k562.h5ad"], batch_size=4, seed=11).train_dataloader()
    _same(list(loader), epoch(fresh, 1))  # the next epoch, asked for late, comes all the same
