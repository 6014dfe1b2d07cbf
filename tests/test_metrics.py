"""GET /metrics (Prometheus text), /livez and /readyz, against a real server that has streamed."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cellfeed.server.version import VERSION
from tests.helpers import datamodule, epoch


def _scrape(server, token: str | None = None) -> dict[str, dict]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{server.http_url}/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def _total(samples: dict, name: str, **labels) -> float:
    return sum(v for key, v in samples.get(name, {}).items() if set(labels.items()) <= set(key))


def test_metrics_count_what_was_served(serve, pert_root):
    server = serve(pert_root)
    dm = datamodule(server, shared_memory=False)
    loader = dm.train_dataloader()
    n = len(epoch(loader, 0))
    loader.close()
    m = _scrape(server)
    # every batch the client took was built and sent (streams may have gone on into epoch 1)
    served = _total(m, "cellfeed_batches_served_total", kind="perturbation", transport="grpc")
    assert served >= n
    assert _total(m, "cellfeed_batch_build_seconds_count", kind="perturbation") == served
    assert _total(m, "cellfeed_batch_build_seconds_sum", kind="perturbation") > 0
    assert _total(m, "cellfeed_served_bytes_total", kind="perturbation") > 1000 * n
    assert _total(m, "cellfeed_sessions", kind="perturbation") == 1
    assert _total(m, "cellfeed_block_cache_hits_total") + _total(m, "cellfeed_block_cache_misses_total") > 0
    assert _total(m, "cellfeed_block_cache_bytes") > 0
    assert _total(m, "cellfeed_open_files") == 2
    # no job has run: every state is there, at zero
    assert _total(m, "cellfeed_jobs", kind="preprocess", state="running") == 0
    assert ("cellfeed_jobs" in m) and all(v == 0 for v in m["cellfeed_jobs"].values())
    # labels stay low-cardinality: no session ids, peers or paths
    for name, series in m.items():
        for key in series:
            for label, _ in key:
                assert label in {"kind", "transport", "outcome", "state", "le"}, (name, label)


def test_shared_memory_batches_are_counted_apart(serve, pert_root):
    server = serve(pert_root)
    dm = datamodule(server, shared_memory=True)
    loader = dm.train_dataloader()
    n = len(epoch(loader, 0))
    loader.close()
    m = _scrape(server)
    assert _total(m, "cellfeed_batches_served_total", transport="shm") >= n
    assert _total(m, "cellfeed_shm_slots") > 0


def test_probes_and_version(serve, pert_root):
    server = serve(pert_root, token="s3cret")
    assert httpx.get(f"{server.http_url}/livez").json() == {"status": "ok"}
    ready = httpx.get(f"{server.http_url}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ok"}
    assert httpx.get(f"{server.http_url}/healthz").json()["version"] == VERSION
    # metrics need the token when one is set; probes do not
    assert httpx.get(f"{server.http_url}/metrics").status_code == 401
    assert "cellfeed_sessions" in httpx.get(f"{server.http_url}/metrics", headers={"authorization": "Bearer s3cret"}).text


def test_readyz_says_when_the_state_folder_cannot_be_written(serve, pert_root, tmp_path):
    state = tmp_path / "state"
    server = serve(pert_root, state_dir=state)
    assert httpx.get(f"{server.http_url}/readyz").status_code == 200
    state.rename(tmp_path / "moved")
    state.write_text("a file where the folder was")
    ready = httpx.get(f"{server.http_url}/readyz")
    assert ready.status_code == 503
    assert "state folder cannot be written" in ready.json()["status"]
    assert httpx.get(f"{server.http_url}/livez").status_code == 200
