"""`cellfeed preprocess` reports the whole run in cells with an ETA (one line per finished file)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.fixtures.preprocess_h5ad import write_cellxgene_like, write_not_h5ad
from tests.test_preprocess_sort import shuffled

LINE = re.compile(r"^\[(\d+)/(\d+)\] (\S+): (\w+); ([\d,]+) of ([\d,]+) cells \((\d+)%\), ([\d.]+) s elapsed, ETA ([\d.]+ s|unknown)$")


def run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellfeed.server.preprocess.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def progress_lines(stderr: str) -> list[tuple]:
    return [m.groups() for m in (LINE.match(line) for line in stderr.splitlines()) if m]


def test_run_all_reports_done_and_total_cells_with_an_eta(tmp_path):
    sizes = {"a": 300, "b": 500, "c": 200}
    for name, n in sizes.items():
        write_cellxgene_like(tmp_path / f"data/input/{name}.h5ad", n_cells=n, n_genes=100, seed=len(name) + n)
    write_not_h5ad(tmp_path / "data/input/d.h5ad")  # its cells cannot be told: it counts 0 and fails
    done = run("run-all", "--batch-mode", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = progress_lines(done.stderr)
    assert [(l[0], l[1], l[2], l[3]) for l in lines] == [("1", "4", "a", "SUCCESS"), ("2", "4", "b", "SUCCESS"), ("3", "4", "c", "SUCCESS"), ("4", "4", "d", "FAILED")]
    total = sum(sizes.values())
    assert [int(l[4].replace(",", "")) for l in lines] == [300, 800, 1000, 1000]
    assert {int(l[5].replace(",", "")) for l in lines} == {total}
    assert [int(l[6]) for l in lines] == [30, 80, 100, 100]
    assert all(l[8].endswith(" s") for l in lines) and lines[-2][8] == "0.0 s"
    quiet = run("run-all", "--batch-mode", "--no-progress", "-o", "out2", cwd=tmp_path)
    assert not progress_lines(quiet.stderr)


def test_sort_reports_cells_too(tmp_path):
    a = shuffled(tmp_path / "a.h5ad", seed=1)
    b = shuffled(tmp_path / "b.h5ad", seed=2)
    done = run("sort", "a.h5ad", "b.h5ad", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = progress_lines(done.stderr)
    assert [l[2] for l in lines] == ["a.h5ad", "b.h5ad"]
    assert [int(l[4].replace(",", "")) for l in lines] == [a.n_obs, a.n_obs + b.n_obs]
    assert (tmp_path / "sorted/a.sorted.h5ad").exists() and (tmp_path / "sorted/b.sorted.h5ad").exists()
