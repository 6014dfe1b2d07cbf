"""The sort job: a shuffled perturbation file comes back in the order the sampler requires."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cellfeed.server.errors import CellfeedError
from cellfeed.server.kinds.perturbation.config import FileSpec
from cellfeed.server.kinds.perturbation.layout import read_layout
from cellfeed.server.kinds.perturbation.synthetic import PerturbationSpec, make_perturbation_adata
from cellfeed.server.preprocess.cli import main
from cellfeed.server.preprocess.sort import sort_file
from cellfeed.server.reading.h5ad import H5ad


def shuffled(path: Path, seed: int = 0) -> ad.AnnData:
    """A perturbation file with rows in random order and every obs-indexed element filled."""
    adata = make_perturbation_adata(PerturbationSpec(n_targets=7, n_genes=60, seed=seed))
    rng = np.random.default_rng(seed)
    adata = adata[rng.permutation(adata.n_obs)].copy()
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["X_pca"] = rng.normal(size=(adata.n_obs, 4)).astype(np.float32)
    adata.obsp["distances"] = sp.random(adata.n_obs, adata.n_obs, density=0.02, format="csr", random_state=seed)
    adata.raw = adata.copy()
    adata.uns["note"] = "kept"
    adata.write_h5ad(path)
    return adata


def layout_of(path: Path):
    spec = FileSpec(dataset="d", path=path, label=path.name)
    return read_layout(spec, H5ad(path, path.name), cell_type_label="cell_type", target_label="target_gene",
                       control_label="non-targeting", batch_label="batch_var", file_index=0)


@pytest.mark.parametrize("memory_bytes", [256 << 20, 2048])  # in memory, and spilled to many buckets
def test_sorted_copy_matches_a_pandas_sort_and_passes_the_sampler_check(tmp_path, memory_bytes):
    src = tmp_path / "screen.h5ad"
    adata = shuffled(src)
    with pytest.raises(CellfeedError, match="cellfeed preprocess sort"):
        layout_of(src)

    result = sort_file(src, tmp_path / "screen.sorted.h5ad", memory_bytes=memory_bytes)
    order = np.lexsort((np.arange(adata.n_obs), adata.obs["batch_var"].cat.codes.to_numpy(), adata.obs["target_gene"].cat.codes.to_numpy()))
    want = adata[order]
    got = ad.read_h5ad(result.output)
    assert list(got.obs_names) == list(want.obs_names)
    assert got.obs.equals(want.obs)
    assert (got.X != want.X).nnz == 0 and (got.layers["counts"] != want.layers["counts"]).nnz == 0
    assert np.array_equal(got.obsm["X_pca"], want.obsm["X_pca"])
    assert abs(got.obsp["distances"] - adata.obsp["distances"][order][:, order]).sum() == 0
    assert (got.raw.X != want.raw.X).nnz == 0 and list(got.raw.var_names) == list(adata.raw.var_names)
    assert got.uns["note"] == "kept" and list(got.var_names) == list(adata.var_names)
    assert result.moved == int((order != np.arange(adata.n_obs)).sum())
    layout = layout_of(result.output)  # the perturbation sampler accepts it
    assert {g.target for g in layout.groups} == set(adata.obs["target_gene"]) - {"non-targeting"}
    assert not list(tmp_path.glob(".*"))  # no staging or spill left behind


def test_cli_sort_and_already_sorted_files(tmp_path, capsys):
    src = tmp_path / "a.h5ad"
    shuffled(src, seed=3)
    assert main(["sort", str(src), "--no-progress"]) == 0
    assert (tmp_path / "sorted/a.sorted.h5ad").exists()  # in a folder of its own, never beside its input
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad", "sorted"]
    assert main(["sort", str(tmp_path / "sorted/a.sorted.h5ad"), "--no-progress"]) == 0
    assert "already sorted" in capsys.readouterr().out
    assert not (tmp_path / "sorted/sorted").exists()
    assert main(["sort", str(src), "--output-dir", str(tmp_path / "elsewhere"), "--no-progress"]) == 0
    assert (tmp_path / "elsewhere/a.sorted.h5ad").exists()
    assert main(["sort", str(src), str(tmp_path / "sorted/a.sorted.h5ad"), "--output", str(tmp_path / "x.h5ad")]) == 2
    assert "--output names one file" in capsys.readouterr().err


def test_sort_refuses_a_missing_column_without_writing(tmp_path, capsys):
    src = tmp_path / "b.h5ad"
    shuffled(src, seed=4)
    assert main(["sort", str(src), "--target-label", "gene", "--no-progress"]) == 1
    assert "obs has no column 'gene'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.h5ad"]


def test_the_cli_and_the_job_api_share_one_sort_options_model(tmp_path):
    from cellfeed.server.jobs.models import SortJob
    from cellfeed.server.preprocess.sort import SortOptions

    assert SortJob.model_fields["options"].annotation is SortOptions
    with pytest.raises(ValueError, match="Extra inputs"):
        SortOptions.model_validate({"target_label": "t", "memory_bytes": 1})
    (tmp_path / "in").mkdir()
    shuffled(tmp_path / "in/screen.h5ad", seed=2)
    assert main(["sort", str(tmp_path / "in/screen.h5ad"), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    layout_of(tmp_path / "out/screen.sorted.h5ad")
    assert not (tmp_path / "in/sorted").exists()
