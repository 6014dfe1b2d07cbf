"""Sessions close when idle or over the budgets, release their files, and reopen on demand."""

from __future__ import annotations

import time

import httpx
import numpy as np

from tests.helpers import barcodes, datamodule, epoch


def _sessions(server) -> list[dict]:
    return httpx.get(f"{server.http_url}/v1/sessions", timeout=10).json()


def test_an_idle_session_is_closed_and_its_client_reopens_it(serve, pert_root):
    server = serve(pert_root, session_idle_seconds=1)
    dm = datamodule(server, files=["k562.h5ad"])
    first = epoch(dm.train_dataloader(), 0)
    dm.teardown("fit")
    sid = dm.session.session_id
    assert [s["session_id"] for s in _sessions(server)] == [sid]
    assert httpx.get(f"{server.http_url}/healthz").json()["open_files"] == 1

    time.sleep(1.5)
    other = datamodule(server, files=["rpe1.h5ad"])  # opening a session sweeps the idle ones
    listed = [s["session_id"] for s in _sessions(server)]
    assert sid not in listed and other.session.session_id in listed
    # k562's file was released (nothing reads it), rpe1's is open
    time.sleep(1.1)
    datamodule(server, files=["rpe1.h5ad"], seed=5)  # sweep again, past the handle idle time
    assert httpx.get(f"{server.http_url}/healthz").json()["open_files"] == 1

    # the first client goes on: its session reopens under the same id, with the same batches
    again = epoch(dm.train_dataloader(), 0)
    assert dm.session.session_id == sid
    np.testing.assert_array_equal(barcodes(again), barcodes(first))
    assert sid in [s["session_id"] for s in _sessions(server)]


def test_a_session_with_a_live_stream_is_never_closed(serve, pert_root):
    server = serve(pert_root, session_idle_seconds=1)
    dm = datamodule(server, files=["k562.h5ad"], prefetch_factor=1)
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # a stream is open and waiting on the client
    time.sleep(1.5)
    datamodule(server, files=["rpe1.h5ad"])
    assert dm.session.session_id in [s["session_id"] for s in _sessions(server)]
    rest = list(it)
    assert len(rest) == len(loader) - 1
    dm.teardown("fit")


def test_least_recently_used_idle_sessions_go_beyond_max_sessions(serve, pert_root):
    server = serve(pert_root, max_sessions=2)
    a = datamodule(server, files=["k562.h5ad"], seed=1)
    b = datamodule(server, files=["k562.h5ad"], seed=2)
    time.sleep(5.5)  # past the grace a just-used session gets even over the budget
    b.train_dataloader().__len__()  # b used again: a is now the least recently used
    c = datamodule(server, files=["k562.h5ad"], seed=3)
    listed = {s["session_id"] for s in _sessions(server)}
    assert listed == {b.session.session_id, c.session.session_id}
    assert a.session.session_id not in listed
    assert len(a.train_dataloader()) > 0  # a reopens when asked
    assert a.session.session_id in {s["session_id"] for s in _sessions(server)}
