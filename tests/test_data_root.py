"""The data root is a wall, and one writer per output: the DataRoot helper, the HTTP plane's
view of the root, a job whose output folder is swapped for a symlink while it runs, two writers
of one output in two processes, and what a killed sort leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest

from cellfeed.server.errors import CellfeedError
from cellfeed.server.jobs.work import FileTask, process, resolve_options
from cellfeed.server.paths import DataRoot
from cellfeed.server.kinds.perturbation.synthetic import write_perturbation_h5ad
from cellfeed.server.preprocess.atomic import OutputBusy, output_lock, remove_stale, staged_dir
from tests.fixtures.preprocess_h5ad import write_cellxgene_like
from tests.test_preprocess_sort import shuffled

# the helper --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text",
    [
        ("a\x00b.h5ad", "contains a NUL byte"),
        ("x" * 5000, "is too long (5000 characters; at most 4096)"),
        ("d/" + "y" * 300 + ".h5ad", "has a name of 305 characters (at most 255"),
        (None, "must be a string, got NoneType"),
        (b"k562.h5ad", "must be a string, got bytes"),
        (7, "must be a string, got int"),
        ("", "is empty"),
        ("../x.h5ad", "is outside the server's data root"),
        ("/etc/passwd", "is outside the server's data root"),
    ],
)
def test_names_that_the_os_would_refuse_without_naming_them(tmp_path, name, text):
    root = DataRoot(tmp_path)
    with pytest.raises(CellfeedError, match=f"^(path|file).*{_re(text)}") as info:
        root.resolve(name)
    assert str(tmp_path) not in str(info.value)  # the server's own location never shows


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_contain_follows_every_link_at_the_moment_of_asking(tmp_path):
    root_dir, outside = tmp_path / "root", tmp_path / "outside"
    (root_dir / "real").mkdir(parents=True)
    outside.mkdir()
    (root_dir / "real" / "a.h5ad").write_bytes(b"x")
    (outside / "b.h5ad").write_bytes(b"y")
    root = DataRoot(root_dir)
    (root_dir / "inner.h5ad").symlink_to(root_dir / "real" / "a.h5ad")
    (root_dir / "escape.h5ad").symlink_to(outside / "b.h5ad")
    assert root.contain(root_dir / "inner.h5ad") == (root_dir / "real" / "a.h5ad").resolve()
    with pytest.raises(CellfeedError, match=r"^escape.h5ad resolves outside the server's data root"):
        root.contain(root_dir / "escape.h5ad")
    # a folder of the path that becomes a link later is followed when asked again
    (root_dir / "real").rename(root_dir / "moved")
    (root_dir / "real").symlink_to(outside)
    with pytest.raises(CellfeedError, match="resolves outside"):
        root.contain(root_dir / "real" / "b.h5ad")
    (root_dir / "plain.h5ad").write_bytes(b"z")
    listed = root.listdir(root_dir, lambda p: p.suffix == ".h5ad", skip_outside=True)
    assert [p.name for p in listed] == ["plain.h5ad"]  # inner.h5ad now goes through real -> outside; escape too
    with pytest.raises(CellfeedError, match="escape.h5ad resolves outside"):
        root.listdir(root_dir, lambda p: p.suffix == ".h5ad")


def test_check_opened_catches_a_file_swapped_after_the_check(tmp_path):
    root = DataRoot(tmp_path / "root")
    (tmp_path / "root").mkdir()
    path = tmp_path / "root" / "a.bin"
    path.write_bytes(b"a")
    fd = os.open(path, os.O_RDONLY)
    try:
        root.check_opened(path, fd)  # the same file: fine
        path.unlink()
        path.write_bytes(b"b")  # another inode under the same name
        with pytest.raises(CellfeedError, match="a.bin: was replaced while being opened"):
            root.check_opened(path, fd)
    finally:
        os.close(fd)


# the HTTP plane ------------------------------------------------------------------------------


def test_healthz_shows_no_path_and_datasets_nothing_outside(serve, tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562")
    write_perturbation_h5ad(outside / "secret.h5ad", cell_type="k562")
    (outside / "big.zarr").mkdir()
    (outside / "big.zarr" / "zarr.json").write_bytes(b"{}" * 50_000)
    (root / "link.h5ad").symlink_to(outside / "secret.h5ad")
    (root / "plate.zarr").symlink_to(outside / "big.zarr", target_is_directory=True)
    (root / "inside.h5ad").symlink_to(root / "k562.h5ad")
    (root / "store.zarr").mkdir()
    (root / "store.zarr" / "zarr.json").write_text("{}")
    (root / "store.zarr" / "leak").symlink_to(outside / "secret.h5ad")  # its size must not count
    server = serve(root)
    health = httpx.get(f"{server.http_url}/healthz").text
    assert str(root) not in health and str(root.resolve()) not in health and "data_root" not in health
    listed = {d["path"]: d for d in httpx.get(f"{server.http_url}/v1/datasets").json()}
    assert set(listed) == {"k562.h5ad", "inside.h5ad", "store.zarr"}, listed
    assert listed["inside.h5ad"]["bytes"] == (root / "k562.h5ad").stat().st_size
    assert listed["store.zarr"]["bytes"] == 2


# jobs ----------------------------------------------------------------------------------------


def _task(root: Path, path: Path, options: dict, kind: str = "preprocess") -> FileTask:
    resolve_options(DataRoot(root), kind, options)  # as the service does when the job is submitted
    log = root / "job.jsonl"
    return FileTask("job", 0, kind, str(path), path.stem, options, str(log), str(root))


@pytest.mark.parametrize("kind", ["preprocess", "sort"])
def test_output_dir_swapped_for_a_symlink_while_the_job_runs_writes_nothing_outside(tmp_path, kind):
    root, outside = tmp_path / "data", tmp_path / "outside"
    outside.mkdir()
    if kind == "preprocess":
        write_cellxgene_like(root / "in" / "cells.h5ad", n_cells=300, n_genes=60, n_donors=6, seed=3)
        options = {"output_dir": "out", "interim_dir": "interim", "log_dir": "logs", "chunk_size": 100, "skip_train_test_split": True}
    else:
        (root / "in").mkdir(parents=True)
        shuffled(root / "in" / "cells.h5ad")
        options = {"output_dir": "out", "target_label": "target_gene", "batch_label": "batch_var"}
    (root / "out").mkdir()
    task = _task(root, root / "in" / "cells.h5ad", options, kind)
    (root / "out").rename(root / "out-was")  # the job runs on; its output folder becomes a link out
    (root / "out").symlink_to(outside, target_is_directory=True)
    outcome = process(task, lambda done, total: None, lambda: False)
    assert outcome["state"] == "failed" and "output_dir" in outcome["message"] and "outside the server's data root" in outcome["message"], outcome
    assert list(outside.iterdir()) == []


def test_a_second_writer_of_one_output_fails_clearly_and_leaves_the_first_ones_staging(tmp_path):
    root = tmp_path / "data"
    write_cellxgene_like(root / "cells.h5ad", n_cells=200, n_genes=50, n_donors=4, seed=5)
    out = root / "out"
    with staged_dir(out / "cells") as staging:  # another writer (server job) is building out/cells
        (staging / "chunks").mkdir()
        (staging / "chunks" / "part").write_bytes(b"mine")
        # the CLI beside it, in another process, on the same output
        cli = subprocess.run(
            [sys.executable, "-m", "cellfeed.server.cli", "preprocess", "run-all", str(root / "cells.h5ad"), "--no-progress",
             "--skip-train-test-split", "--output-dir", str(out), "--interim-dir", str(root / "interim"), "--log-dir", str(root / "logs")],
            capture_output=True, text=True, timeout=300,
        )
        assert cli.returncode != 0
        said = cli.stdout + cli.stderr
        assert "is being written by another job" in said and f"pid {os.getpid()}" in said, said
        assert (staging / "chunks" / "part").read_bytes() == b"mine"  # its staging was not deleted
        assert remove_stale(out / "cells") == []  # nor by a clean-up while it is held
        with pytest.raises(OutputBusy, match="out/cells' is being written by another job"):
            with output_lock(out / "cells"):
                pass
    assert (out / "cells" / "chunks" / "part").read_bytes() == b"mine"  # published whole
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no lock file, no staging left


KILLED_SORT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from cellfeed.server.preprocess.sort import sort_file

    def die(done, total):
        os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of writing

    sort_file(Path(sys.argv[1]), Path(sys.argv[2]), memory_bytes=4096, progress=die)
    """
)


def test_a_killed_sort_leaves_temp_file_and_spill_folder_that_the_next_sort_removes(tmp_path):
    src, out = tmp_path / "screen.h5ad", tmp_path / "out" / "screen.sorted.h5ad"
    adata = shuffled(src)
    killed = subprocess.run([sys.executable, "-c", KILLED_SORT, str(src), str(out)], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    left = sorted(p.name for p in out.parent.iterdir())
    assert any(".tmp-" in n for n in left) and any(".spill-" in n for n in left), left  # what a kill leaves
    from cellfeed.server.preprocess.sort import sort_file

    result = sort_file(src, out)
    assert result.output == out and sorted(p.name for p in out.parent.iterdir()) == ["screen.sorted.h5ad"]
    import anndata as ad

    assert ad.read_h5ad(out).n_obs == adata.n_obs
    assert np.isfinite(result.seconds)


def test_a_server_killed_during_a_sort_job_cleans_its_leftovers_when_it_starts_again(serve, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    shuffled(root / "screen.h5ad")
    with h5py.File(root / "screen.h5ad", "r+") as f:  # a big dense layer: the sort takes a while
        n = f["obs"][f["obs"].attrs["_index"]].shape[0]
        layer = f["layers"].create_dataset("big", shape=(n, 200_000), dtype="float32", fillvalue=1.0)
        layer.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    server = serve(root)
    reply = httpx.post(f"{server.http_url}/v1/jobs", json={"kind": "sort", "inputs": ["screen.h5ad"], "options": {"output_dir": "sorted"}})
    assert reply.status_code == 202, reply.text
    deadline = time.monotonic() + 60
    while not any(".tmp-" in p.name for p in (root / "sorted").glob(".*")):
        assert time.monotonic() < deadline, "the sort never started writing"
        time.sleep(0.01)
    server.kill()
    left = sorted(p.name for p in (root / "sorted").iterdir())
    assert any(".tmp-" in n for n in left) and any(".spill-" in n for n in left), left
    server.start()
    job = httpx.get(f"{server.http_url}/v1/jobs/{reply.json()['id']}").json()
    assert job["state"] == "interrupted"
    assert list((root / "sorted").iterdir()) == []  # temp file, spill folder and lock: gone
    logs = httpx.get(f"{server.http_url}/v1/jobs/{job['id']}/logs").json()["entries"]
    assert any(e["event"] == "job.cleaned" for e in logs), logs


def test_a_file_swapped_for_a_link_out_while_it_is_opened_is_closed_and_refused(tmp_path):
    """The race a check-then-open leaves: the opener (h5py) opens the file, and by the time it
    returns the name leads elsewhere. The handle cache checks again after opening."""
    from cellfeed.server.reading.h5ad import H5ad
    from cellfeed.server.reading.handles import HandleCache

    root_dir, outside = tmp_path / "data", tmp_path / "outside"
    write_perturbation_h5ad(root_dir / "k562.h5ad", cell_type="k562")
    write_perturbation_h5ad(outside / "k562.h5ad", cell_type="k562")
    cache = HandleCache(DataRoot(root_dir))
    opened: list[H5ad] = []

    def open_then_swap(path: Path) -> H5ad:
        opened.append(H5ad(path, "k562.h5ad"))
        (root_dir / "k562.h5ad").rename(root_dir / "old.h5ad")
        (root_dir / "k562.h5ad").symlink_to(outside / "k562.h5ad")
        return opened[-1]

    with pytest.raises(CellfeedError, match="k562.h5ad resolves outside the server's data root"):
        cache.get(root_dir / "k562.h5ad", open_then_swap, name="h5ad")
    assert not opened[0].file.id.valid  # the handle was closed, not kept
    assert cache.paths() == []

    (root_dir / "k562.h5ad").unlink()
    (root_dir / "old.h5ad").rename(root_dir / "k562.h5ad")

    def open_then_replace(path: Path) -> H5ad:  # same name, inside the root, another file
        handle = H5ad(path, "k562.h5ad")
        (root_dir / "k562.h5ad").rename(root_dir / "older.h5ad")
        (root_dir / "k562.h5ad").write_bytes((root_dir / "older.h5ad").read_bytes())
        return handle

    with pytest.raises(CellfeedError, match="k562.h5ad: was replaced while being opened"):
        cache.get(root_dir / "k562.h5ad", open_then_replace, name="h5ad")
    assert isinstance(cache.get(root_dir / "k562.h5ad", lambda p: H5ad(p, "k562.h5ad"), name="h5ad"), H5ad)
