"""The jobs REST API against a real server on loopback: runs, errors, cancel, restart, Dask."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.preprocess_h5ad import write_cellxgene_like, write_dense
from tests.test_preprocess_cli import check_dataset
from tests.test_preprocess_sort import layout_of, shuffled

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def client(server) -> httpx.Client:
    return httpx.Client(base_url=server.http_url, headers=AUTH if server.token else {}, timeout=30)


def wait_for(fetch, done, what: str, limit: float = 120):
    """Poll `fetch()` until `done(value)`; the limit only guards against a hang."""
    deadline = time.monotonic() + limit
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}: {value}")
        time.sleep(0.1)


def finished(http: httpx.Client, job_id: str) -> dict:
    return wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json(), lambda j: j["state"] not in ("queued", "running"), "the job to finish")


def no_staging(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if any(k in p.name for k in (".tmp-", ".old-", ".spill-", ".lock")) or p.name.startswith(".sort-")]


OPTIONS = {"output_dir": "out", "interim_dir": "interim", "log_dir": "logs", "chunk_size": 150}


def test_preprocess_job_runs_reports_and_logs(serve, tmp_path):
    root = tmp_path / "root"
    a = write_cellxgene_like(root / "in/a.h5ad", n_cells=500, seed=11)
    b = write_cellxgene_like(root / "in/b.h5ad", n_cells=300, seed=12, n_donors=6)
    write_dense(root / "in/c_dense.h5ad")
    server = serve(root, token=TOKEN)
    body = {"kind": "preprocess", "inputs": ["in"], "options": OPTIONS}
    assert httpx.post(f"{server.http_url}/v1/jobs", json=body).status_code == 401
    with client(server) as http:
        accepted = http.post("/v1/jobs", json=body)
        assert accepted.status_code == 202 and accepted.json()["state"] == "queued"
        job = finished(http, accepted.json()["id"])
        assert job["state"] == "failed" and job["error"] == "1 of 3 files failed"
        files = {f["dataset"]: f for f in job["files"]}
        for name, adata in (("a", a), ("b", b)):
            record = files[name]
            assert record["state"] == "succeeded" and record["done"] == record["total"] > 0
            assert record["seconds"] > 0 and record["finished_at"] >= record["started_at"]
            assert record["output"] == str(root / "out" / name)
            check_dataset(root / "out" / name, adata, chunk_size=150)
        assert files["c_dense"]["state"] == "failed" and "dense" in files["c_dense"]["message"]
        assert not (root / "out/c_dense").exists() and no_staging(root)
        assert job["options"]["output_dir"] == "out" and job["inputs"] == ["in"] and job["resumable"]

        logs = http.get(f"/v1/jobs/{job['id']}/logs").json()
        events = [e["event"] for e in logs["entries"]]
        assert events[0] == "job.submitted" and events[-1] == "job.finished"
        assert {e["dataset"] for e in logs["entries"] if e["event"] == "file.finished"} == {"a", "b", "c_dense"}
        newer = http.get(f"/v1/jobs/{job['id']}/logs", params={"offset": logs["next_offset"]}).json()
        assert newer["entries"] == [] and newer["next_offset"] == logs["next_offset"]
        assert [j["id"] for j in http.get("/v1/jobs").json()] == [job["id"]]
        assert (root / "logs/a/pipeline.json").exists() and (root / "logs/a/pipeline.log").exists()
        # job transitions are in the server's own log too, one line each, at INFO or above
        server_log = server.log.read_text()
        for event in ("job.submitted", "job.started", "job.finished"):
            assert f"cellfeed.jobs: {event} {job['id']}" in server_log, event


def test_bad_requests_get_4xx_with_a_message(serve, tmp_path):
    root = tmp_path / "root"
    write_cellxgene_like(root / "ok.h5ad", n_cells=60, seed=13)
    (tmp_path / "outside.h5ad").write_text("x")
    server = serve(root)
    with client(server) as http:
        cases = [
            ({"kind": "preprocess", "inputs": ["../outside.h5ad"]}, 403, "outside the server's data root"),
            ({"kind": "preprocess", "inputs": [str(tmp_path / "outside.h5ad")]}, 403, "outside the server's data root"),
            ({"kind": "preprocess", "inputs": ["missing.h5ad"]}, 404, "file not found"),
            ({"kind": "preprocess", "inputs": ["ok.h5ad"], "options": {"output_dir": "/etc/cellfeed"}}, 403, "outside"),
            ({"kind": "preprocess", "inputs": ["ok.h5ad"], "options": {"gene_table": "hgnc.txt"}}, 404, "file not found"),
            ({"kind": "preprocess", "inputs": ["ok.h5ad", "ok.h5ad"]}, 400, "both write dataset 'ok'"),
            ({"kind": "preprocess", "inputs": []}, 422, "at least 1 item"),
            ({"kind": "preprocess", "inputs": ["ok.h5ad"], "options": {"test_size": 1.5}}, 422, "less than 1"),
            ({"kind": "preprocess", "inputs": ["ok.h5ad"], "options": {"chunk_sizes": 5}}, 422, "Extra inputs"),
            ({"kind": "convert", "inputs": ["ok.h5ad"]}, 422, "does not match any of the expected tags"),
        ]
        for body, code, text in cases:
            response = http.post("/v1/jobs", json=body)
            assert response.status_code == code, (body, response.text)
            assert text in response.text
        assert http.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        for method, path in (("GET", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/logs"), ("DELETE", "/v1/jobs/nope"), ("POST", "/v1/jobs/nope/resume")):
            response = http.request(method, path)
            assert response.status_code == 404 and "no job 'nope'" in response.text
        job = finished(http, http.post("/v1/jobs", json={"kind": "preprocess", "inputs": ["ok.h5ad"]}).json()["id"])
        assert job["state"] == "succeeded"
        assert http.delete(f"/v1/jobs/{job['id']}").status_code == 409
        assert http.post(f"/v1/jobs/{job['id']}/resume").status_code == 409
        assert http.get("/v1/jobs/x/logs", params={"offset": -1}).status_code == 422
        spec = http.get("/openapi.json").json()
        assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/logs", "/v1/jobs/{job_id}/resume"} <= set(spec["paths"])
        assert {"PreprocessJob", "SortJob", "Job", "FileRecord", "PreprocessOptions"} <= set(spec["components"]["schemas"])


def test_sort_job(serve, tmp_path):
    root = tmp_path / "root"
    root.mkdir(parents=True)
    shuffled(root / "screen.h5ad", seed=5)
    server = serve(root)
    with client(server) as http:
        job = finished(http, http.post("/v1/jobs", json={"kind": "sort", "inputs": ["screen.h5ad"], "options": {"output_dir": "sorted"}}).json()["id"])
        assert job["state"] == "succeeded", job
        record = job["files"][0]
        assert record["output"] == str(root / "sorted/screen.sorted.h5ad") and record["counts"]["moved"] > 0
        layout_of(root / "sorted/screen.sorted.h5ad")


def many_files(root: Path, n: int, cells: int = 1500) -> list[str]:
    for i in range(n):
        write_cellxgene_like(root / f"in/f{i}.h5ad", n_cells=cells, n_genes=400, seed=20 + i)
    return [f"in/f{i}.h5ad" for i in range(n)]


def test_cancel_stops_a_running_job_and_leaves_nothing_half_written(serve, tmp_path):
    root = tmp_path / "root"
    inputs = many_files(root, 8)
    server = serve(root)
    with client(server) as http:
        job_id = http.post("/v1/jobs", json={"kind": "preprocess", "inputs": inputs, "options": OPTIONS}).json()["id"]
        wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json(), lambda j: j["files"][0]["state"] == "succeeded", "the first file")
        cancelled = http.delete(f"/v1/jobs/{job_id}")
        assert cancelled.status_code == 202
        job = finished(http, job_id)
        assert job["state"] == "cancelled" and job["resumable"]
        states = [f["state"] for f in job["files"]]
        assert states[0] == "succeeded" and "cancelled" in states and "running" not in states
        for f in job["files"]:
            assert (root / "out" / f["dataset"]).exists() == (f["state"] == "succeeded")
        assert no_staging(root)
        assert "job.cancelled" in [e["event"] for e in http.get(f"/v1/jobs/{job_id}/logs").json()["entries"]]


def test_a_job_survives_a_server_crash_and_resumes_skipping_finished_files(serve, tmp_path):
    root = tmp_path / "root"
    inputs = many_files(root, 6)
    server = serve(root)
    with client(server) as http:
        job_id = http.post("/v1/jobs", json={"kind": "preprocess", "inputs": inputs, "options": OPTIONS}).json()["id"]
        wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json(), lambda j: j["files"][0]["state"] == "succeeded", "the first file")
    first = root / "out/f0/manifest.json"
    made = first.stat().st_mtime_ns
    server.kill()
    server.start()
    with client(server) as http:
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "interrupted" and job["resumable"]
        assert job["files"][0]["state"] == "succeeded"
        assert all(f["state"] in ("succeeded", "pending") for f in job["files"])
        left = [f["dataset"] for f in job["files"] if f["state"] == "pending"]
        assert left and all(not (root / "out" / name).exists() for name in left)
        resumed = http.post(f"/v1/jobs/{job_id}/resume")
        assert resumed.status_code == 202 and resumed.json()["state"] == "queued"
        job = finished(http, job_id)
        assert job["state"] == "succeeded" and all(f["state"] == "succeeded" for f in job["files"])
        assert first.stat().st_mtime_ns == made  # the finished file was not done again
        assert no_staging(root)
        events = [e["event"] for e in http.get(f"/v1/jobs/{job_id}/logs").json()["entries"]]
        assert "job.interrupted" in events and "job.resumed" in events


def test_jobs_fan_out_to_a_dask_cluster(serve, tmp_path):
    distributed = pytest.importorskip("distributed")
    root = tmp_path / "root"
    a = write_cellxgene_like(root / "in/a.h5ad", n_cells=300, seed=31)
    b = write_cellxgene_like(root / "in/b.h5ad", n_cells=200, seed=32, n_donors=5)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        server = serve(root, dask_scheduler=cluster.scheduler_address)
        with client(server) as http:
            job = finished(http, http.post("/v1/jobs", json={"kind": "preprocess", "inputs": ["in"], "options": OPTIONS}).json()["id"])
            assert job["state"] == "succeeded", job
            assert all(f["done"] == f["total"] > 0 for f in job["files"])
            check_dataset(root / "out/a", a, chunk_size=150)
            check_dataset(root / "out/b", b, chunk_size=150)
            pids = {e["pid"] for e in http.get(f"/v1/jobs/{job['id']}/logs").json()["entries"] if e["event"] == "file.assigned"}
            assert server.proc.pid not in pids and len(pids) >= 1


def test_cancel_and_resume_on_a_dask_cluster(serve, tmp_path):
    """A cancel reaches files running on Dask workers; nothing half-written; resume finishes the rest."""
    distributed = pytest.importorskip("distributed")
    root = tmp_path / "root"
    inputs = many_files(root, 8)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        server = serve(root, dask_scheduler=cluster.scheduler_address)
        with client(server) as http:
            job_id = http.post("/v1/jobs", json={"kind": "preprocess", "inputs": inputs, "options": OPTIONS}).json()["id"]
            wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json(), lambda j: j["files"][0]["state"] == "succeeded", "the first file")
            assert http.delete(f"/v1/jobs/{job_id}").status_code == 202
            job = finished(http, job_id)
            assert job["state"] == "cancelled" and job["resumable"], job.get("error")
            states = [f["state"] for f in job["files"]]
            assert "running" not in states and "cancelled" in states
            for f in job["files"]:
                assert (root / "out" / f["dataset"]).exists() == (f["state"] == "succeeded")
            assert no_staging(root)

            assert http.post(f"/v1/jobs/{job_id}/resume").status_code == 202
            job = finished(http, job_id)
            assert job["state"] == "succeeded" and all(f["state"] == "succeeded" for f in job["files"]), job
            assert no_staging(root)


def test_a_job_whose_output_another_process_is_writing_fails_clearly_then_resumes(serve, tmp_path):
    """Another server (or the CLI) on the same data root holds out/a: this server's job must not
    delete its staging nor write beside it; once it is done, resume writes the output."""
    from cellfeed.server.preprocess.atomic import staged_dir

    root = tmp_path / "root"
    write_cellxgene_like(root / "in/a.h5ad", n_cells=300, seed=31)
    server = serve(root)
    with client(server) as http, staged_dir(root / "out" / "a") as theirs:
        (theirs / "theirs").write_text("being built elsewhere")
        job = finished(http, http.post("/v1/jobs", json={"kind": "preprocess", "inputs": ["in/a.h5ad"], "options": OPTIONS}).json()["id"])
        assert job["state"] == "failed"
        message = job["files"][0]["message"]
        assert "output 'out/a' is being written by another job" in message and "pid" in message, message
        assert (theirs / "theirs").read_text() == "being built elsewhere"  # their staging is intact
    assert (root / "out/a/theirs").exists()  # ...and was published by its owner
    with client(server) as http:
        assert http.post(f"/v1/jobs/{job['id']}/resume").status_code == 202
        job = finished(http, job["id"])
        assert job["state"] == "succeeded", job
    assert not (root / "out/a/theirs").exists() and (root / "out/a/train/chunks").is_dir() and no_staging(root)
