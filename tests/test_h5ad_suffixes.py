"""One list of h5ad suffixes: a .h5 file is an input to jobs and the pipeline, as it is to sessions."""

from __future__ import annotations

from cellfeed.server.kinds.perturbation import config as perturbation_config
from cellfeed.server.preprocess.folders import dataset_name, find_inputs
from cellfeed.server.serving.http import DATASET_SUFFIXES
from cellfeed.server.suffixes import H5AD_SUFFIXES
from tests.fixtures.preprocess_h5ad import write_cellxgene_like
from tests.test_jobs_api import client, finished
from tests.test_preprocess_sort import layout_of, shuffled


def test_every_part_uses_the_one_list():
    assert ".h5" in H5AD_SUFFIXES and ".h5ad" in H5AD_SUFFIXES
    assert perturbation_config.H5AD_SUFFIXES is H5AD_SUFFIXES
    assert all(DATASET_SUFFIXES[s] == "h5ad" for s in H5AD_SUFFIXES)


def test_the_pipeline_finds_h5_files_and_names_their_datasets(tmp_path):
    write_cellxgene_like(tmp_path / "a.h5", n_cells=50, seed=1)
    write_cellxgene_like(tmp_path / "b one.h5ad", n_cells=50, seed=2)
    (tmp_path / "notes.txt").write_text("not an input")
    assert [p.name for p in find_inputs(None, tmp_path)] == ["a.h5", "b one.h5ad"]
    assert [dataset_name(p) for p in find_inputs(None, tmp_path)] == ["a", "b_one"]


def test_a_sort_job_over_a_folder_takes_its_h5_files(serve, tmp_path):
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    shuffled(root / "in/a.h5", seed=3)
    shuffled(root / "in/b.h5ad", seed=4)
    server = serve(root)
    with client(server) as http:
        job = finished(http, http.post("/v1/jobs", json={"kind": "sort", "inputs": ["in"], "options": {"output_dir": "sorted"}}).json()["id"])
    assert job["state"] == "succeeded", job
    assert sorted(f["output"] for f in job["files"]) == [str(root / "sorted/a.sorted.h5"), str(root / "sorted/b.sorted.h5ad")]
    layout_of(root / "sorted/a.sorted.h5")
