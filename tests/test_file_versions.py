"""Files rewritten under a running server: old sessions keep their version, new ones see the new.

A job (sort, preprocess) replaces its output with a rename. A session reads one version of its
files from open to close; opening the same config after the rewrite gives a new session over the
new version, and a client cannot silently continue an old session over changed files.
"""

from __future__ import annotations

import os

import httpx
import numpy as np
import pytest

from cellfeed.client import PerturbationDataModule, RequestError
from cellfeed.server.kinds.perturbation.synthetic import write_perturbation_h5ad
from tests.helpers import epoch


def _dm(server, **kwargs) -> PerturbationDataModule:
    dm = PerturbationDataModule(files=["cells.h5ad"], group_size_S=4, batch_size=8, barcodes=True, num_workers=1,
                                server=server.flight_uri, **kwargs)
    dm.setup("fit")
    return dm


def _values(batches: list[dict]) -> dict[str, np.ndarray]:
    """Expression row of every perturbed barcode delivered."""
    out = {}
    for batch in batches:
        dense = batch["pert_cell_emb"].to_dense().numpy()
        for (b, s), bc in np.ndenumerate(batch["pert_cell_barcode"]):
            out[bc] = dense[b, s]
    return out


def _rewrite(root, seed: int) -> None:
    tmp = root / ".cells.h5ad.tmp"
    write_perturbation_h5ad(tmp, cell_type="k562", seed=1, n_genes=50)
    import anndata as ad

    adata = ad.read_h5ad(tmp)
    adata.X = adata.X * 0 + adata.X.multiply(seed)  # same cells and layout, other values
    adata.write_h5ad(tmp)
    os.replace(tmp, root / "cells.h5ad")


def test_a_rewritten_file_opens_a_new_session_and_old_streams_keep_their_version(serve, tmp_path):
    root = tmp_path / "data"
    write_perturbation_h5ad(root / "cells.h5ad", cell_type="k562", seed=1, n_genes=50)
    server = serve(root)
    old = _dm(server, seed=5)
    old_loader = old.train_dataloader()
    it = iter(old_loader)
    first = [next(it)]

    _rewrite(root, seed=3)
    new = _dm(server, seed=5)
    assert new.session.session_id != old.session.session_id

    # the old loader finishes its epoch on the old version, the new one reads the new version
    old_values = _values(first + list(it))
    new_values = _values(epoch(new.train_dataloader(), 0))
    assert old_values.keys() == new_values.keys()
    for bc, row in old_values.items():
        np.testing.assert_array_equal(new_values[bc], row * 3)

    sessions = {s["session_id"]: s for s in httpx.get(server.http_url + "/v1/sessions").json()}
    assert sessions[old.session.session_id]["superseded_by"] == new.session.session_id
    assert sessions[new.session.session_id]["superseded_by"] is None

    # an unchanged file keeps its session: equal configs share it
    assert _dm(server, seed=5).session.session_id == new.session.session_id


def test_a_client_does_not_continue_over_files_changed_while_the_server_was_down(serve, tmp_path):
    root = tmp_path / "data"
    write_perturbation_h5ad(root / "cells.h5ad", cell_type="k562", seed=1, n_genes=50)
    server = serve(root)
    dm = _dm(server)
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    server.kill()
    _rewrite(root, seed=2)
    server.start()
    with pytest.raises(RequestError, match="files it reads changed"):
        list(it)  # the rest of the epoch, unless it was already in socket buffers:
        loader.set_epoch(1)
        list(loader)  # then the next epoch must reopen the session


def test_a_rerun_pipeline_output_is_streamed_in_a_new_session(serve, tmp_path):
    """The preprocessing job replaces output/<name> by a rename; TableDataModule sessions opened
    afterwards stream the new rows, the one opened before keeps the old ones."""
    from cellfeed.client import TableDataModule
    from cellfeed.server.preprocess.cli import main
    from tests.fixtures.preprocess_h5ad import write_cellxgene_like

    root = tmp_path / "root"

    def run(seed: int) -> None:
        write_cellxgene_like(root / "in/cells.h5ad", n_cells=400, n_genes=120, n_donors=8, seed=seed)
        args = ["run-all", str(root / "in/cells.h5ad"), "--chunk-size", "200", "--no-progress",
                "--interim-dir", str(root / "interim"), "--output-dir", str(root / "out"), "--log-dir", str(root / "logs")]
        assert main(args) == 0

    def sentences(dm: TableDataModule) -> list[str]:
        return sorted(s for batch in dm.train_dataloader() for s in batch["cell_sentence"].tolist())

    run(seed=1)
    server = serve(root)
    old = TableDataModule(server.flight_uri, "out/cells", columns=["cell_sentence"], batch_size=50)
    old.setup("fit")
    before = sentences(old)
    run(seed=2)  # the job's output replaces the old one
    new = TableDataModule(server.flight_uri, "out/cells", columns=["cell_sentence"], batch_size=50)
    new.setup("fit")
    assert new.session.session_id != old.session.session_id
    after = sentences(new)
    assert after != before
    assert sentences(old) == before  # the old session still streams the version it opened
