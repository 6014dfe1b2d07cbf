"""Several replicas for one job: streams spread over 3 real servers on one data root, fail-over
when one is SIGKILLed mid-epoch (the epoch equals an uninterrupted one), a replica whose files
differ refused naming it and the file, a killed replica used again once it is back."""

from __future__ import annotations

import shutil
import time

import httpx
import numpy as np
import pyarrow.flight as flight
import pytest

from cellfeed.client import MultiExperimentDataModule, PerturbationDataModule, RequestError, ServerUnavailable, TableDataModule
from cellfeed.client.replicas import resolve_locations
from cellfeed.server.kinds.perturbation.synthetic import write_perturbation_h5ad
from cellfeed.wire import cellfeed_pb2 as pb
from tests.fixtures.ecosystem_plates import make_ecosystem_data
from tests.helpers import barcodes


def streams_on(server) -> list[dict]:
    """The streams a server has served (GET /v1/sessions), every session together."""
    return [s for session in httpx.get(f"{server.http_url}/v1/sessions", timeout=10).json() for s in session["streams"]]


def run_killing(dm, victim, at: int = 1) -> list:
    """One epoch of dm's training loader; `victim` SIGKILLed once `at` + 1 batches came."""
    got = []
    for i, batch in enumerate(dm.train_dataloader()):
        got.append(batch)
        if i == at and victim is not None:
            victim.kill()
    return got


def assert_failed_over(survivors, stream_index: int) -> None:
    """The killed replica's stream went on on a survivor from a later batch than its first."""
    moved = [s for server in survivors for s in streams_on(server) if s["stream_index"] == stream_index]
    assert any(s["first_batch"] > 0 for s in moved), moved


@pytest.fixture
def pert_replicas(serve, tmp_path):
    root = tmp_path / "data"
    # ~15 MB per epoch: more than gRPC buffers, so the kill lands mid-stream
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562", n_targets=40, n_genes=4000, density=0.3, seed=3)
    return root, [serve(root) for _ in range(3)]


def pert_module(servers, **kw) -> PerturbationDataModule:
    args = dict(files=["k562.h5ad"], group_size_S=4, batch_size=4, barcodes=True, num_workers=3, prefetch_factor=1, shared_memory=False)
    args.update(kw)
    dm = PerturbationDataModule(server=",".join(s.flight_uri for s in servers), **args)
    dm.setup("fit")
    return dm


def test_addresses_a_list_commas_or_a_name():
    assert resolve_locations("127.0.0.1:1, grpc://127.0.0.1:2") == ["grpc://127.0.0.1:1", "grpc://127.0.0.1:2"]
    assert resolve_locations(["127.0.0.1:1", "127.0.0.1:1"]) == ["grpc://127.0.0.1:1"]
    assert resolve_locations("localhost:3") == ["grpc://localhost:3"]  # one address: the name stays
    with pytest.raises(ValueError, match="names no address"):
        resolve_locations(" , ")


@pytest.mark.slow
def test_perturbation_survives_a_replica_killed_mid_epoch(pert_replicas):
    root, servers = pert_replicas
    reference = list(pert_module(servers).train_dataloader())
    # the streams were spread: every replica served one, and GetFlightInfo's endpoints point at it
    assert all(streams_on(s) for s in servers)
    dm = pert_module(servers)
    info = flight.connect(servers[1].flight_uri).get_flight_info(
        flight.FlightDescriptor.for_command(pb.StreamRequest(session_id=dm.session.session_id, split="train", world_size=1, stream_count=3).SerializeToString())
    )
    assert [[loc.uri.decode() for loc in e.locations] for e in info.endpoints] == [[f"grpc+tcp://127.0.0.1:{servers[1].flight_port}"]] * 3
    got = run_killing(dm, servers[1])
    assert len(got) == len(reference)
    np.testing.assert_array_equal(barcodes(got), barcodes(reference))
    np.testing.assert_array_equal(barcodes(got, "ctrl_cell_barcode"), barcodes(reference, "ctrl_cell_barcode"))
    assert_failed_over([servers[0], servers[2]], 1)


@pytest.mark.slow
def test_dynaclr_survives_a_replica_killed_mid_epoch(serve, tmp_path):
    data = make_ecosystem_data(tmp_path / "data", ("iohub-0.4",))
    servers = [serve(data.root) for _ in range(3)]

    def module():
        dm = MultiExperimentDataModule(
            "experiments.yml", z_range=(1, 4), yx_patch_size=(48, 48), final_yx_patch_size=(48, 48), val_experiments=[],
            tau_range=(0.5, 1.5), batch_size=4, num_workers=3, prefetch_factor=1, condition_balanced=False,
            return_index=True, shared_memory=False, server=[s.flight_uri for s in servers],
        )
        dm.setup("fit")
        return dm

    def rows(batches):
        return [(r["fov_name"], r["track_id"], r["t"]) for b in batches for r in b["index"]]

    reference = list(module().train_dataloader())
    got = run_killing(module(), servers[1])
    assert rows(got) == rows(reference) and len(got) == len(reference)
    for mine, theirs in zip(got, reference):
        np.testing.assert_array_equal(mine["anchor"].numpy(), theirs["anchor"].numpy())
        np.testing.assert_array_equal(mine["positive"].numpy(), theirs["positive"].numpy())
    assert_failed_over([servers[0], servers[2]], 1)


@pytest.mark.slow
def test_table_survives_a_replica_killed_mid_epoch(serve, tmp_path):
    from cellfeed.server.preprocess.cli import main
    from tests.fixtures.preprocess_h5ad import write_cellxgene_like

    root = tmp_path / "root"
    write_cellxgene_like(root / "in/cells.h5ad", n_cells=3000, n_genes=400, n_donors=20, seed=41)
    args = ["run-all", str(root / "in/cells.h5ad"), "--chunk-size", "500", "--test-size", "0.2", "--no-progress",
            "--interim-dir", str(root / "interim"), "--output-dir", str(root / "out"), "--log-dir", str(root / "logs")]
    assert main(args) == 0
    servers = [serve(root) for _ in range(3)]

    def module():
        dm = TableDataModule(",".join(s.flight_uri for s in servers), "out/cells", columns=["obs_names", "genes", "values"],
                             batch_size=16, seed=3, num_workers=3, prefetch_factor=1)
        dm.setup("fit")
        return dm

    reference = [b["obs_names"].tolist() for b in module().train_dataloader()]
    got = [b["obs_names"].tolist() for b in run_killing(module(), servers[1])]
    assert got == reference
    assert_failed_over([servers[0], servers[2]], 1)


def test_a_replica_with_a_changed_file_is_refused_naming_it(serve, tmp_path):
    root = tmp_path / "data"
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562", n_targets=8, seed=3)
    other = tmp_path / "other"
    shutil.copytree(root, other)  # copy2: the same sizes and modification times
    write_perturbation_h5ad(other / "k562.h5ad", cell_type="k562", n_targets=8, seed=4)  # then one file changes
    good, bad = serve(root), serve(other)
    dm = pert_module([good, bad], num_workers=2)  # stream 1 reads from the second replica
    with pytest.raises(RequestError, match=rf"replica {bad.flight_uri} .*k562\.h5ad"):
        list(dm.train_dataloader())


def test_a_replica_with_a_missing_file_is_refused_naming_it(serve, tmp_path):
    root = tmp_path / "data"
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562", n_targets=8, seed=3)
    (tmp_path / "empty").mkdir()
    good, bad = serve(root), serve(tmp_path / "empty")
    dm = pert_module([good, bad], num_workers=2)
    with pytest.raises(RequestError, match=rf"replica {bad.flight_uri} cannot open session .*k562\.h5ad"):
        list(dm.train_dataloader())


@pytest.mark.slow
def test_a_killed_replica_restarted_is_used_again(pert_replicas):
    root, servers = pert_replicas
    reference = pert_module(servers).train_dataloader()
    expected = [barcodes(list(reference)) for _ in range(3)]  # epochs 0, 1, 2
    loader = pert_module(servers).train_dataloader()
    epochs = [barcodes(run_killing_loader(loader, servers[1]))]
    assert_failed_over([servers[0], servers[2]], 1)
    servers[1].start()  # back on the same ports, with no memory
    time.sleep(3)  # past its back-off
    epochs += [barcodes(list(loader)), barcodes(list(loader))]
    for got, want in zip(epochs, expected):
        np.testing.assert_array_equal(got, want)
    assert streams_on(servers[1]), "the restarted replica served no stream"  # a fresh process: only new streams
    loader.close()


def run_killing_loader(loader, victim, at: int = 1) -> list:
    got = []
    for i, batch in enumerate(loader):
        got.append(batch)
        if i == at:
            victim.kill()
    return got


def test_with_every_replica_gone_the_retry_budget_and_serverunavailable_apply(serve, tmp_path):
    root = tmp_path / "data"
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562", n_targets=8, seed=3)
    servers = [serve(root) for _ in range(3)]
    dm = pert_module(servers, retry_seconds=2)
    loader = dm.train_dataloader()
    assert len(loader) > 0  # planned while they were up
    for server in servers:
        server.kill()
    started = time.monotonic()
    where = ", ".join(s.flight_uri for s in servers)
    with pytest.raises(ServerUnavailable, match=rf"cellfeed server at replicas {where} failed for 2 s while streaming batch 0"):
        list(loader)
    assert time.monotonic() - started < 30
