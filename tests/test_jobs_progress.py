"""Jobs that add up: job-level progress in cells with an ETA, ISO times, counters that stay right
across resume and sort, sort's output folder, and files finished during a SIGTERM shutdown."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path

import anndata as ad

from tests.fixtures.preprocess_h5ad import write_cellxgene_like
from tests.test_jobs_api import OPTIONS, client, finished, many_files, no_staging, wait_for
from tests.test_preprocess_sort import layout_of, shuffled


def utc(text: str) -> datetime:
    """An API time: ISO 8601 with a UTC offset (refused otherwise)."""
    when = datetime.fromisoformat(text)
    assert when.utcoffset() == timedelta(0), text
    assert text.endswith("+00:00"), text
    return when


def check_times(job: dict) -> None:
    utc(job["created_at"])
    for key in ("started_at", "finished_at"):
        if job[key] is not None:
            utc(job[key])
    for f in job["files"]:
        for key in ("started_at", "finished_at"):
            if f[key] is not None:
                utc(f[key])
        if f["started_at"] and f["finished_at"]:
            assert utc(f["finished_at"]) >= utc(f["started_at"])


def test_job_progress_counts_cells_with_an_eta_and_iso_times(serve, tmp_path):
    root = tmp_path / "root"
    sizes = [1500, 900, 1200, 700, 1600, 1000]
    for i, n in enumerate(sizes):
        write_cellxgene_like(root / f"in/f{i}.h5ad", n_cells=n, n_genes=400, seed=60 + i)
    server = serve(root)
    with client(server) as http:
        job_id = http.post("/v1/jobs", json={"kind": "preprocess", "inputs": ["in"], "options": OPTIONS}).json()["id"]
        first = http.get(f"/v1/jobs/{job_id}").json()
        # every file knows its cells from the moment the job is submitted, pending or not
        assert [f["total"] for f in first["files"]] == sizes
        assert first["progress"]["total"] == sum(sizes) and first["progress"]["unit"] == "cells"
        assert first["progress"]["files_total"] == len(sizes)
        seen = []

        def poll():
            job = http.get(f"/v1/jobs/{job_id}").json()
            seen.append(job)
            return job

        job = wait_for(poll, lambda j: j["state"] not in ("queued", "running"), "the job to finish")
        assert job["state"] == "succeeded", job
        dones = [j["progress"]["done"] for j in seen]
        assert dones == sorted(dones) and all(d <= sum(sizes) for d in dones)  # never goes back, never past the total
        for j in seen:
            assert j["progress"]["done"] == sum(f["done"] for f in j["files"])
            assert all(f["done"] <= f["total"] for f in j["files"])
        running = [j for j in seen if j["state"] == "running" and j["progress"]["eta_seconds"] is not None]
        assert running, "no ETA while the job ran"
        for j in running:
            p = j["progress"]
            assert p["cells_per_second"] > 0 and p["eta_seconds"] >= 0
            assert abs(p["eta_seconds"] - (p["total"] - p["done"]) / p["cells_per_second"]) < 0.01
            assert utc(p["eta_at"]) >= utc(j["started_at"])
        p = job["progress"]
        assert p["done"] == p["total"] == sum(sizes) and p["fraction"] == 1.0 and p["eta_seconds"] == 0
        assert p["files_done"] == len(sizes) and all(f["done"] == f["total"] for f in job["files"])
        check_times(job)
        for entry in http.get(f"/v1/jobs/{job_id}/logs").json()["entries"]:
            utc(entry["time"])
    for line in (root / "logs/f0/pipeline.json").read_text().splitlines():
        utc(json.loads(line)["time"])


def test_sort_counts_cells_and_writes_to_a_sorted_folder_never_beside_its_input(serve, tmp_path):
    root = tmp_path / "root"
    (root / "screens").mkdir(parents=True)
    adata = shuffled(root / "screens/a.h5ad", seed=5)
    shuffled(root / "screens/b.h5ad", seed=6)
    server = serve(root)
    with client(server) as http:
        job = finished(http, http.post("/v1/jobs", json={"kind": "sort", "inputs": ["screens"]}).json()["id"])
        assert job["state"] == "succeeded", job
        for f in job["files"]:
            assert f["total"] == ad.read_h5ad(root / "screens" / f"{f['dataset']}.h5ad", backed="r").n_obs
            assert f["done"] == f["total"] and f["output"] == str(root / "screens/sorted" / f"{f['dataset']}.sorted.h5ad")
        assert job["files"][0]["total"] == adata.n_obs
        p = job["progress"]
        assert p["done"] == p["total"] == sum(f["total"] for f in job["files"]) and p["files_done"] == 2
        check_times(job)
        layout_of(root / "screens/sorted/a.sorted.h5ad")
        assert sorted(p.name for p in (root / "screens").iterdir()) == ["a.h5ad", "b.h5ad", "sorted"]
        # the same folder again: the inputs only, not their sorted copies
        again = finished(http, http.post("/v1/jobs", json={"kind": "sort", "inputs": ["screens"]}).json()["id"])
        assert [f["dataset"] for f in again["files"]] == ["a", "b"] and again["state"] == "succeeded"
        assert no_staging(root)


def test_counters_stay_right_across_a_crash_and_resume(serve, tmp_path):
    root = tmp_path / "root"
    inputs = many_files(root, 5)
    server = serve(root)
    with client(server) as http:
        job_id = http.post("/v1/jobs", json={"kind": "preprocess", "inputs": inputs, "options": OPTIONS}).json()["id"]
        wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json(), lambda j: j["files"][1]["state"] == "succeeded", "two files")
    server.kill()
    server.start()
    with client(server) as http:
        job = http.get(f"/v1/jobs/{job_id}").json()
        left = [f for f in job["files"] if f["state"] != "succeeded"]
        assert job["state"] == "interrupted" and left
        assert job["progress"]["done"] == sum(f["total"] for f in job["files"] if f["state"] == "succeeded")
        assert job["progress"]["total"] == 5 * 1500 and all(f["total"] == 1500 for f in job["files"])
        offset = http.get(f"/v1/jobs/{job_id}/logs").json()["next_offset"]
        http.post(f"/v1/jobs/{job_id}/resume")
        job = finished(http, job_id)
        assert job["state"] == "succeeded"
        entries = http.get(f"/v1/jobs/{job_id}/logs", params={"offset": offset}).json()["entries"]
        started = [e for e in entries if e["event"] == "job.started"]
        assert len(started) == 1 and started[0]["files"] == len(left) and started[0]["of"] == 5
        assert started[0]["cells"] == sum(f["total"] for f in left)
        resumed = [e for e in entries if e["event"] == "job.resumed"]
        assert resumed[0]["files_left"] == len(left)
        assert {e["dataset"] for e in entries if e["event"] == "file.started"} == {f["dataset"] for f in left}
        p = job["progress"]
        assert p["done"] == p["total"] == 5 * 1500 and p["files_done"] == p["files_total"] == 5


def successes(log: Path) -> dict[str, int]:
    """dataset -> how many times its pipeline logged file.finished with SUCCESS."""
    out: dict[str, int] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry["event"] == "file.finished" and entry.get("status") == "SUCCESS":
            out[entry["dataset"]] = out.get(entry["dataset"], 0) + 1
    return out


def test_a_file_finished_when_sigterm_arrives_stays_finished(serve, tmp_path):
    """SIGTERM the server as files finish, several times; after each restart every file its log
    says finished is recorded finished, and no file is ever run twice."""
    root = tmp_path / "root"
    inputs = many_files(root, 10, cells=400)
    server = serve(root)
    with client(server) as http:
        job_id = http.post("/v1/jobs", json={"kind": "preprocess", "inputs": inputs, "options": OPTIONS}).json()["id"]
    log = root / ".cellfeed/jobs" / f"{job_id}.jsonl"
    made: dict[str, int] = {}
    for cycle in range(4):
        before = sum(successes(log).values()) if log.exists() else 0
        deadline = time.monotonic() + 120
        while (sum(successes(log).values()) if log.exists() else 0) <= before:  # the moment a file finishes
            assert time.monotonic() < deadline, "no file finished"
            time.sleep(0.002)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0  # a clean exit, not a kill
        server.start()
        with client(server) as http:
            job = http.get(f"/v1/jobs/{job_id}").json()
            done = successes(log)
            records = {f["dataset"]: f for f in job["files"]}
            assert all(n == 1 for n in done.values()), done  # nothing ran twice
            for name in done:
                assert records[name]["state"] == "succeeded", (name, records[name])
                assert records[name]["done"] == records[name]["total"] == 400
                made.setdefault(name, (root / "out" / name / "manifest.json").stat().st_mtime_ns)
            for name, record in records.items():
                assert (root / "out" / name).exists() == (record["state"] == "succeeded")
            assert no_staging(root / "out")
            if job["state"] == "succeeded":
                break
            assert job["state"] == "interrupted" and job["resumable"], job
            assert http.post(f"/v1/jobs/{job_id}/resume").status_code == 202
    with client(server) as http:
        job = finished(http, job_id)
        assert job["state"] == "succeeded" and all(f["state"] == "succeeded" for f in job["files"])
    assert all(n == 1 for n in successes(log).values()) and len(successes(log)) == 10
    for name, mtime in made.items():
        assert (root / "out" / name / "manifest.json").stat().st_mtime_ns == mtime  # not done again


def test_sigterm_mid_file_stops_it_cleanly_and_records_the_job_interrupted(serve, tmp_path):
    """The records are right the moment the server has exited, not only after the next start."""
    import sqlite3

    root = tmp_path / "root"
    inputs = many_files(root, 2, cells=400) + ["in/big.h5ad"]
    write_cellxgene_like(root / "in/big.h5ad", n_cells=60_000, n_genes=400, seed=77)
    server = serve(root)
    with client(server) as http:
        job_id = http.post("/v1/jobs", json={"kind": "preprocess", "inputs": inputs, "options": OPTIONS | {"chunk_size": 5000}}).json()["id"]
        wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json(), lambda j: j["files"][2]["state"] == "running" and j["files"][2]["done"] > 0, "the big file to run")
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    db = sqlite3.connect(root / ".cellfeed/jobs/jobs.sqlite")
    assert db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] == "interrupted"
    states = [r[0] for r in db.execute("SELECT state FROM files WHERE job_id = ? ORDER BY idx", (job_id,))]
    db.close()
    assert states == ["succeeded", "succeeded", "pending"]
    assert not (root / "out/big").exists() and no_staging(root / "out")
    events = [json.loads(line) for line in (root / ".cellfeed/jobs" / f"{job_id}.jsonl").read_text().splitlines()]
    assert any(e["event"] == "file.cancelled" and e["dataset"] == "big" for e in events)
    server.start()
    with client(server) as http:
        assert http.post(f"/v1/jobs/{job_id}/resume").status_code == 202
        job = finished(http, job_id)
        assert job["state"] == "succeeded" and job["progress"]["done"] == job["progress"]["total"] == 60_800


def test_a_file_whose_outcome_was_logged_but_not_recorded_stays_finished(serve, tmp_path):
    """The state a server leaves when it stops between a file's end and its record (the file's
    record still says running): at the next start the file is finished, from the job log or from
    its complete output, and resuming does not run it again."""
    import sqlite3

    root = tmp_path / "root"
    inputs = many_files(root, 3, cells=400)
    server = serve(root)
    with client(server) as http:
        job_id = http.post("/v1/jobs", json={"kind": "preprocess", "inputs": inputs, "options": OPTIONS}).json()["id"]
        assert finished(http, job_id)["state"] == "succeeded"
    server.stop()
    log = root / ".cellfeed/jobs" / f"{job_id}.jsonl"
    lines = log.read_text().splitlines()
    # f1: its outcome is in the log; f2: not even that (only its output shows it finished)
    log.write_text("".join(line + "\n" for line in lines if not ('"file.outcome"' in line and '"f2"' in line) and '"job.finished"' not in line))
    db = sqlite3.connect(root / ".cellfeed/jobs/jobs.sqlite")
    db.execute("UPDATE jobs SET state = 'running', finished = NULL WHERE id = ?", (job_id,))
    db.execute("UPDATE files SET state = 'running', done = 7, output = NULL, finished = NULL WHERE job_id = ? AND idx IN (1, 2)", (job_id,))
    db.commit()
    db.close()
    made = {n: (root / "out" / n / "manifest.json").stat().st_mtime_ns for n in ("f0", "f1", "f2")}
    server.start()
    with client(server) as http:
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "interrupted"
        assert [f["state"] for f in job["files"]] == ["succeeded"] * 3, job["files"]
        assert job["files"][1]["output"] == str(root / "out/f1") and job["files"][1]["done"] == 400
        assert job["progress"]["done"] == job["progress"]["total"] == 1200
        assert not job["resumable"]
        recovered = [e for e in http.get(f"/v1/jobs/{job_id}/logs").json()["entries"] if e["event"] == "file.recovered"]
        assert sorted(e["dataset"] for e in recovered) == ["f1", "f2"]
    assert {n: (root / "out" / n / "manifest.json").stat().st_mtime_ns for n in made} == made
