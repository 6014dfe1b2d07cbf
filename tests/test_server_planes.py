"""The server's two planes: HTTP control endpoints, the token guard on both, the data-root wall."""

from __future__ import annotations

import time

import httpx
import pyarrow.flight as flight
import pytest

from cellfeed.client import PerturbationDataModule, RequestError
from cellfeed.client.connection import Connection
from cellfeed.server.kinds.perturbation.synthetic import write_perturbation_h5ad


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "data"
    write_perturbation_h5ad(root / "screens" / "k562.h5ad", cell_type="k562")
    (root / "plates" / "exp.zarr").mkdir(parents=True)
    (root / "plates" / "exp.zarr" / "zarr.json").write_text("{}")
    return root


def test_health_datasets_and_live_sessions(serve, root):
    server = serve(root)
    health = httpx.get(f"{server.http_url}/healthz").json()
    assert health["status"] == "ok" and health["flight_uri"].endswith(str(server.flight_port))
    assert health["sessions"] == 0 and health["cache_bytes"] == health["cache_hits"] == health["cache_misses"] == 0
    datasets = {d["path"]: d for d in httpx.get(f"{server.http_url}/v1/datasets").json()}
    assert datasets["screens/k562.h5ad"]["format"] == "h5ad" and not datasets["screens/k562.h5ad"]["open"]
    assert datasets["plates/exp.zarr"]["format"] == "ome-zarr"

    dm = PerturbationDataModule(files=["screens/k562.h5ad"], group_size_S=4, batch_size=4, server=server.flight_uri, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    sessions = httpx.get(f"{server.http_url}/v1/sessions").json()
    assert len(sessions) == 1 and sessions[0]["kind"] == "perturbation"
    streams = sessions[0]["streams"]
    assert {s["stream_index"] for s in streams} == {0, 1}
    assert all(s["total_batches"] > 0 and s["split"] == "train" for s in streams)
    assert sum(s["total_batches"] for s in streams) == len(loader)  # each stream's share of an epoch
    for _ in it:
        pass
    # each training stream sent its share of epoch 0 and went on into the next (it shows that one)
    after = httpx.get(f"{server.http_url}/v1/sessions").json()[0]["streams"]
    assert len(after) == 2 and all(s["epoch"] >= 1 and s["state"] == "streaming" for s in after), after
    dm.teardown("fit")  # the end of training: those streams end too
    deadline = time.monotonic() + 10
    while any(s["state"] == "streaming" for s in httpx.get(f"{server.http_url}/v1/sessions").json()[0]["streams"]):
        assert time.monotonic() < deadline, "teardown left the streams that went on into epoch 1 running"
        time.sleep(0.05)
    health = httpx.get(f"{server.http_url}/healthz").json()
    assert health["sessions"] == 1 and health["cache_misses"] > 0 and health["cache_bytes"] > 0
    datasets = {d["path"]: d for d in httpx.get(f"{server.http_url}/v1/datasets").json()}
    assert datasets["screens/k562.h5ad"]["open"]


def test_token_guards_both_planes(serve, root):
    server = serve(root, token="s3cret")
    assert httpx.get(f"{server.http_url}/healthz").status_code == 200  # liveness probe stays open
    for path in ("/v1/datasets", "/v1/sessions"):
        assert httpx.get(server.http_url + path).status_code == 401
        assert httpx.get(server.http_url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(server.http_url + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200

    config = {"files": ["screens/k562.h5ad"], "group_size_S": 4, "batch_size": 4}
    with pytest.raises(RequestError, match="missing or wrong token"):
        Connection(server.flight_uri, retry_seconds=2).open_session("perturbation", config)
    with pytest.raises(RequestError, match="missing or wrong token"):
        Connection(server.flight_uri, token="nope", retry_seconds=2).open_session("perturbation", config)
    raw = flight.connect(server.flight_uri)
    with pytest.raises(flight.FlightUnauthenticatedError):
        list(raw.do_action(flight.Action("open_session", b"")))

    dm = PerturbationDataModule(files=["screens/k562.h5ad"], group_size_S=4, batch_size=4, server=server.flight_uri, token="s3cret")
    dm.setup("fit")
    assert len(list(dm.train_dataloader())) == len(dm.train_dataloader()) > 0


def test_symlink_out_of_the_data_root_is_refused(serve, root, tmp_path):
    outside = tmp_path / "secret.h5ad"
    write_perturbation_h5ad(outside, cell_type="k562")
    (root / "link.h5ad").symlink_to(outside)
    server = serve(root)
    with pytest.raises(RequestError, match="outside the server's data root"):
        Connection(server.flight_uri, retry_seconds=2).open_session("perturbation", {"files": ["link.h5ad"]})


def test_unknown_kind_and_action(serve, root):
    server = serve(root)
    with pytest.raises(RequestError, match="unknown stream kind 'video'; known kinds: dynaclr, perturbation, table"):
        Connection(server.flight_uri, retry_seconds=2).open_session("video", {})
    with pytest.raises(flight.FlightServerError, match="unknown action 'drop_tables'"):
        list(flight.connect(server.flight_uri).do_action(flight.Action("drop_tables", b"")))
