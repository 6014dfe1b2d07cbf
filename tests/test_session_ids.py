"""Session ids digest the config as its kind's model reads it: configs of one meaning share a session."""

from __future__ import annotations

import httpx

from cellfeed.client.connection import Connection
from cellfeed.server.kinds.perturbation.config import PerturbationConfig


def _sessions(server) -> list[str]:
    return [s["session_id"] for s in httpx.get(f"{server.http_url}/v1/sessions", timeout=10).json()]


def test_a_default_valued_key_gives_the_same_session(serve, pert_root):
    server = serve(pert_root)
    default = PerturbationConfig.model_fields["batch_size"].default
    conn = Connection(server.flight_uri, retry_seconds=5)
    bare = conn.open_session("perturbation", {"files": ["k562.h5ad"]})
    spelled = conn.open_session("perturbation", {"batch_size": default, "files": ["k562.h5ad"], "seed": 0})
    assert spelled.session_id == bare.session_id
    assert _sessions(server) == [bare.session_id]  # one Session: the second source was closed, not kept
    assert "session reused: " + bare.session_id in server.log.read_text()
    # the raw config that found it once finds it again; a different value is a different session
    assert conn.open_session("perturbation", {"files": ["k562.h5ad"], "batch_size": default}).session_id == bare.session_id
    other = conn.open_session("perturbation", {"files": ["k562.h5ad"], "batch_size": default // 2})
    assert other.session_id != bare.session_id
    assert sorted(_sessions(server)) == sorted([bare.session_id, other.session_id])
    # the reused session plans for either config, with the default batch size
    assert conn.plan(spelled, "train", 0, 0, 1, 1, 0) == conn.plan(bare, "train", 0, 0, 1, 1, 0)
    assert conn.plan(spelled, "train", 0, 0, 1, 1, 0).batch_size == default
