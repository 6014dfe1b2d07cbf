"""Bad input of every kind against ONE real server while another client streams from it.

Each case writes its bad file (h5ad by anndata/h5py, parquet, CSV, OME-Zarr, TOML, embeddings)
or sends its bad request (session configs, tickets, job requests, paths that lead out of the
data root), then checks that the error names the culprit. A streaming client reads epochs of a
good file in a background thread throughout; the last test checks that the server process is
alive and that this client got every batch of every epoch with no error.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from cellfeed.client import MultiExperimentDataModule, PerturbationDataModule, RequestError
from cellfeed.client.connection import Connection
from cellfeed.server.kinds.perturbation.synthetic import write_embeddings, write_perturbation_h5ad
from cellfeed.wire import cellfeed_pb2 as pb
from tests.conftest import ServerProcess
from tests.fixtures.plates import make_dynaclr_data

GOOD = "good.h5ad"


@dataclass
class World:
    root: Path
    outside: Path
    server: ServerProcess
    streamer: "Streamer"
    n_vars: int = 0


@dataclass
class Streamer:
    """Reads epoch after epoch of good.h5ad until stopped; records batch counts and errors."""

    server: ServerProcess
    stop: threading.Event = field(default_factory=threading.Event)
    epochs: list[tuple[int, int]] = field(default_factory=list)  # (batches got, len(loader))
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def run(self) -> None:
        try:
            dm = PerturbationDataModule(files=[GOOD], group_size_S=4, batch_size=8, num_workers=1, server=self.server.flight_uri)
            dm.setup("fit")
            loader = dm.train_dataloader()
            epoch = 0
            while not self.stop.is_set():
                loader.set_epoch(epoch)
                got = 0
                for batch in loader:
                    assert batch["pert_cell_emb"].shape[0] == 8
                    got += 1
                self.epochs.append((got, len(loader)))
                epoch += 1
            dm.teardown("fit")
        except BaseException as exc:  # noqa: BLE001 - recorded, checked by the last test
            self.errors.append(exc)

    def start(self) -> "Streamer":
        self.thread = threading.Thread(target=self.run, name="streamer", daemon=True)
        self.thread.start()
        return self


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-inputs")
    root, outside = base / "data", base / "outside"
    adata = write_perturbation_h5ad(root / GOOD, cell_type="k562", seed=1)
    write_perturbation_h5ad(outside / "secret.h5ad", cell_type="k562", seed=2)
    write_embeddings(root / "emb.pt", [str(t) for t in adata.obs["target_gene"].unique()], dim=8)
    make_dynaclr_data(root)
    server = ServerProcess(root)
    server.start()
    streamer = Streamer(server).start()
    w = World(root, outside, server, streamer, n_vars=adata.n_vars)
    yield w
    streamer.stop.set()
    server.stop()


# ways to ask ---------------------------------------------------------------------------------


def refusal(fn) -> str:
    """The message of the RequestError (or Flight error) `fn` raises; '' if it raises none."""
    try:
        fn()
    except (RequestError, flight.FlightError) as exc:
        return str(exc)
    return ""


def stream_perturbation(w: World, **config) -> str:
    """Open a perturbation session and read its whole training split: errors at open or per block."""

    def go():
        options = dict(group_size_S=4, batch_size=8, num_workers=1)
        options.update(config)
        dm = PerturbationDataModule(server=w.server.flight_uri, **options)
        dm.setup("fit")
        try:
            for _ in dm.train_dataloader():
                pass
        finally:
            dm.teardown("fit")

    return refusal(go)


def open_session(w: World, kind: str, config: dict) -> str:
    return refusal(lambda: Connection(w.server.flight_uri, retry_seconds=2).open_session(kind, config))


def dynaclr(w: World, yaml_name: str) -> str:
    def go():
        dm = MultiExperimentDataModule(
            experiments_yaml=yaml_name, z_range=(0, 3), yx_patch_size=(32, 32), final_yx_patch_size=(24, 24),
            val_experiments=["tomm20"], batch_size=8, num_workers=1, server=w.server.flight_uri,
        )
        dm.setup("fit")

    return refusal(go)


def post_job(w: World, body: dict | None = None, content: bytes | None = None, expect: int = 400) -> str:
    if content is None:
        content = json.dumps(body).encode()
    reply = httpx.post(f"{w.server.http_url}/v1/jobs", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == expect, (reply.status_code, reply.text[:500])
    return reply.text


# bad files -----------------------------------------------------------------------------------


def h5ad_copy(w: World, name: str, edit) -> str:
    """good.h5ad copied to `name`, then edited in place with h5py (edit(file) -> details)."""
    path = w.root / name
    shutil.copy(w.root / GOOD, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return name


def _replace(f: h5py.File, key: str, values: np.ndarray) -> None:
    del f[key]
    f.create_dataset(key, data=values)


def csr_index_past_n_vars(w):
    holder = {}

    def edit(f):
        indptr = f["X/indptr"][...]
        pos = int(indptr[-1]) // 2
        holder["row"] = int(np.searchsorted(indptr, pos, side="right")) - 1
        idx = f["X/indices"][...]
        idx[pos] = w.n_vars + 7
        f["X/indices"][...] = idx

    name = h5ad_copy(w, "past_n_vars.h5ad", edit)
    return stream_perturbation(w, files=[name]), [name, f"row {holder['row']:,}", f"index {w.n_vars + 7}", "outside 0.."]


def csr_negative_index(w):
    def edit(f):
        idx = f["X/indices"][...]
        idx[3] = -2
        f["X/indices"][...] = idx

    name = h5ad_copy(w, "negative_index.h5ad", edit)
    return stream_perturbation(w, files=[name]), [name, "row 0", "index -2"]


def csr_float_indices(w):
    name = h5ad_copy(w, "float_indices.h5ad", lambda f: _replace(f, "X/indices", f["X/indices"][...].astype(np.float64) + 0.5))
    return stream_perturbation(w, files=[name]), [name, "X/indices holds floats", "must be integers"]


def csr_indptr_not_monotone(w):
    def edit(f):
        ip = f["X/indptr"][...]
        ip[10] = ip[11] + 5
        f["X/indptr"][...] = ip

    name = h5ad_copy(w, "indptr_falls.h5ad", edit)
    return stream_perturbation(w, files=[name]), [name, "X/indptr decreases at row 10"]


def csr_indptr_short_of_nnz(w):
    def edit(f):
        ip = f["X/indptr"][...]
        ip[-1] -= 3
        f["X/indptr"][...] = ip

    name = h5ad_copy(w, "indptr_short.h5ad", edit)
    return stream_perturbation(w, files=[name]), [name, "X/indptr ends at", "first bad row"]


def csr_indptr_wrong_length(w):
    name = h5ad_copy(w, "indptr_length.h5ad", lambda f: _replace(f, "X/indptr", f["X/indptr"][:-5]))
    return stream_perturbation(w, files=[name]), [name, "X/indptr has", "entries"]


def csr_data_strings(w):
    name = h5ad_copy(w, "data_strings.h5ad", lambda f: _replace(f, "X/data", f["X/data"][...].astype("S8")))
    return stream_perturbation(w, files=[name]), [name, "X/data holds strings"]


def csr_float_indptr(w):
    name = h5ad_copy(w, "float_indptr.h5ad", lambda f: _replace(f, "X/indptr", f["X/indptr"][...].astype(np.float32)))
    return stream_perturbation(w, files=[name]), [name, "X/indptr holds floats"]


def h5ad_not_hdf5(w):
    (w.root / "text.h5ad").write_text("cell,gene\n1,2\n")
    return stream_perturbation(w, files=["text.h5ad"]), ["text.h5ad", "not an HDF5/h5ad file"]


def h5ad_without_x(w):
    name = h5ad_copy(w, "no_x.h5ad", lambda f: f.__delitem__("X"))
    return stream_perturbation(w, files=[name]), [name, "no X element"]


# bad configs ---------------------------------------------------------------------------------


def config_nul_in_file_name(w):
    return open_session(w, "perturbation", {"files": ["go\x00od.h5ad"]}), ["'go\\x00od.h5ad'", "NUL byte"]


def config_very_long_path(w):
    message = open_session(w, "perturbation", {"files": ["d/" * 3000 + "x.h5ad"]})
    assert str(w.root) not in message  # nor does it show where the server's files are
    return message, ["is too long", "at most 4096"]


def config_very_long_name(w):
    return open_session(w, "perturbation", {"files": ["n" * 300 + ".h5ad"]}), ["has a name of 305 characters"]


def config_file_outside(w):
    return open_session(w, "perturbation", {"files": ["../outside/secret.h5ad"]}), ["'../outside/secret.h5ad'", "outside the server's data root"]


def config_missing_file(w):
    return open_session(w, "perturbation", {"files": ["nope.h5ad"]}), ["file not found: 'nope.h5ad'"]


def config_huge_batch(w):
    return open_session(w, "perturbation", {"files": [GOOD], "batch_size": 10**9}), ["batch_size=1,000,000,000", "at most 65,536"]


def config_huge_batch_of_groups(w):
    return open_session(w, "perturbation", {"files": [GOOD], "batch_size": 60_000, "group_size_S": 60_000}), ["batch_size x group_size_S", "cells per batch"]


def config_deep_json(w):
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    return open_session(w, "perturbation", {"files": [GOOD], "x": deep}), ["perturbation config", "nested 41 levels deep; at most 32"]


def config_file_not_a_string(w):
    return open_session(w, "perturbation", {"files": [None]}), ["files.0"]


def config_unknown_kind(w):
    return open_session(w, "video", {}), ["unknown stream kind 'video'"]


def config_symlink_out(w):
    (w.root / "link.h5ad").symlink_to(w.outside / "secret.h5ad")
    return open_session(w, "perturbation", {"files": ["link.h5ad"]}), ["'link.h5ad'", "outside the server's data root"]


# TOML ----------------------------------------------------------------------------------------


def toml_folder_with_link_out(w):
    folder = w.root / "screens"
    folder.mkdir()
    shutil.copy(w.root / GOOD, folder / "a.h5ad")
    (folder / "b.h5ad").symlink_to(w.outside / "secret.h5ad")
    return open_session(w, "perturbation", {"toml": '[datasets]\nx = "screens"\n'}), ["screens/b.h5ad", "resolves outside the server's data root"]


def toml_syntax(w):
    return open_session(w, "perturbation", {"toml": "[datasets\nx = 1\n"}), ["TOML"]


def toml_pattern_matches_nothing(w):
    return open_session(w, "perturbation", {"toml": '[datasets]\nx = "none/*.h5ad"\n'}), ["'none/*.h5ad'", "matches no .h5ad file"]


# embeddings ----------------------------------------------------------------------------------


def embeddings_missing(w):
    return open_session(w, "perturbation", {"files": [GOOD], "pert_embedding_file": "nope.pt"}), ["file not found: 'nope.pt'"]


def embeddings_not_torch(w):
    (w.root / "garbage.pt").write_bytes(b"\x00\x01 not a torch file")
    return open_session(w, "perturbation", {"files": [GOOD], "pert_embedding_file": "garbage.pt"}), ["garbage.pt"]


# tables --------------------------------------------------------------------------------------


def _parquet(path: Path, rows: int = 40, start: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"obs_names": [f"c{i}" for i in range(start, start + rows)], "x": np.arange(start, start + rows)}), path)


def table_chunk_link_out(w):
    _parquet(w.root / "tab_link" / "chunk_0000.parquet")
    _parquet(w.outside / "stolen.parquet", start=40)
    (w.root / "tab_link" / "chunk_0001.parquet").symlink_to(w.outside / "stolen.parquet")
    return open_session(w, "table", {"dataset": "tab_link"}), ["chunk_0001.parquet", "resolves outside the server's data root"]


def table_split_folder_link_out(w):
    _parquet(w.root / "tab_split" / "test" / "chunks" / "chunk_0000.parquet")
    _parquet(w.outside / "train_chunks" / "chunk_0000.parquet")
    (w.root / "tab_split" / "train").mkdir()
    (w.root / "tab_split" / "train" / "chunks").symlink_to(w.outside / "train_chunks", target_is_directory=True)
    return open_session(w, "table", {"dataset": "tab_split"}), ["tab_split/train/chunks", "resolves outside the server's data root"]


def table_garbage_chunk(w):
    _parquet(w.root / "tab_bad" / "chunk_0000.parquet")
    (w.root / "tab_bad" / "chunk_0001.parquet").write_bytes(b"PAR1 but not really")
    return open_session(w, "table", {"dataset": "tab_bad"}), ["chunk_0001.parquet", "not a readable parquet file"]


def table_unknown_column(w):
    _parquet(w.root / "tab_ok" / "chunk_0000.parquet")
    return open_session(w, "table", {"dataset": "tab_ok", "columns": ["nope"]}), ["no column 'nope'"]


def table_huge_batch(w):
    _parquet(w.root / "tab_ok2" / "chunk_0000.parquet")
    return open_session(w, "table", {"dataset": "tab_ok2", "batch_size": 10**9}), ["table config", "batch_size=1,000,000,000"]


# DynaCLR / OME-Zarr --------------------------------------------------------------------------


def _experiments(w: World, name: str, **change) -> str:
    """experiments.yml with sec61's entries changed; written as `name`."""
    import yaml

    doc = yaml.safe_load((w.root / "experiments.yml").read_text())
    doc["experiments"][0].update(change)
    (w.root / name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return name


def _tracks_copy(w: World, name: str) -> Path:
    shutil.copytree(w.root / "sec61_tracks", w.root / name)
    return w.root / name


def tracks_csv_link_out(w):
    tracks = _tracks_copy(w, "tracks_link")
    (w.outside / "tracks.csv").write_bytes((tracks / "A/1/0/tracks.csv").read_bytes())
    (tracks / "A/1/0/tracks.csv").unlink()
    (tracks / "A/1/0/tracks.csv").symlink_to(w.outside / "tracks.csv")
    yaml_name = _experiments(w, "exp_tracks_link.yml", tracks_path="tracks_link")
    return dynaclr(w, yaml_name), ["tracks.csv", "resolves outside the server's data root"]


def tracks_two_csvs(w):
    tracks = _tracks_copy(w, "tracks_two")
    shutil.copy(tracks / "A/1/0/tracks.csv", tracks / "A/1/0/extra.csv")
    yaml_name = _experiments(w, "exp_tracks_two.yml", tracks_path="tracks_two")
    return dynaclr(w, yaml_name), ["A/1/0", "2 tracking CSVs (extra.csv, tracks.csv)"]


def tracks_missing_column(w):
    tracks = _tracks_copy(w, "tracks_nocol")
    (tracks / "A/1/0/tracks.csv").write_text("track_id,t,y\n1,0,3.0\n")
    yaml_name = _experiments(w, "exp_tracks_nocol.yml", tracks_path="tracks_nocol")
    return dynaclr(w, yaml_name), ["tracks.csv", "missing column(s) x"]


def experiments_yaml_missing(w):
    return dynaclr(w, "none.yml"), ["'none.yml'"]


def plate_outside(w):
    yaml_name = _experiments(w, "exp_outside.yml", data_path="../outside/sec61.zarr")
    return dynaclr(w, yaml_name), ["data_path", "outside the server's data root"]


def plate_broken_metadata(w):
    shutil.copytree(w.root / "sec61.zarr", w.root / "broken.zarr")
    for meta in ("zarr.json", ".zattrs", ".zgroup"):
        if (w.root / "broken.zarr" / meta).exists():
            (w.root / "broken.zarr" / meta).write_text("{ not json")
    yaml_name = _experiments(w, "exp_broken.yml", data_path="broken.zarr")
    return dynaclr(w, yaml_name), ["broken.zarr"]


def plate_chunk_link_out(w):
    """A chunk file inside the plate swapped for a link out of the data root: tensorstore would read it."""
    shutil.copytree(w.root / "sec61.zarr", w.root / "linked.zarr")
    chunk = next(p for p in sorted((w.root / "linked.zarr").rglob("*")) if p.is_file() and not p.name.startswith(".") and p.name != "zarr.json")
    (w.outside / "chunk").write_bytes(chunk.read_bytes())
    chunk.unlink()
    chunk.symlink_to(w.outside / "chunk")
    yaml_name = _experiments(w, "exp_linked.yml", data_path="linked.zarr")
    return dynaclr(w, yaml_name), ["linked.zarr/", "resolves outside"]


# tickets -------------------------------------------------------------------------------------


def ticket_garbage(w):
    return refusal(lambda: flight.connect(w.server.flight_uri).do_get(flight.Ticket(b"\xff\xfe garbage")).read_all()), ["Ticket"]


def open_session_deep_json_text(w):
    """Nested past Python's recursion limit in the JSON text itself, before any config check."""
    body = pb.OpenSession(kind="perturbation", config_json='{"files": ' + "[" * 5000 + "]" * 5000 + "}").SerializeToString()
    call = lambda: list(flight.connect(w.server.flight_uri).do_action(flight.Action("open_session", body)))  # noqa: E731
    return refusal(call), ["OpenSession.config_json", "nested"]


def flight_info_path_descriptor(w):
    call = lambda: flight.connect(w.server.flight_uri).get_flight_info(flight.FlightDescriptor.for_path("good.h5ad"))  # noqa: E731
    return refusal(call), ["command descriptor", "StreamRequest"]


# job requests (HTTP) -------------------------------------------------------------------------


def job_nul_in_input(w):
    return post_job(w, {"kind": "sort", "inputs": ["go\x00od.h5ad"]}, expect=422), ["input", "NUL byte"]


def job_long_input(w):
    return post_job(w, {"kind": "sort", "inputs": ["i" * 5000]}, expect=422), ["input", "is too long"]


def job_nul_in_output_dir(w):
    return post_job(w, {"kind": "preprocess", "inputs": [GOOD], "options": {"output_dir": "out\x00put"}}, expect=422), ["output_dir", "NUL byte"]


def job_long_output_dir(w):
    return post_job(w, {"kind": "sort", "inputs": [GOOD], "options": {"output_dir": "o" * 400}}, expect=422), ["output_dir", "has a name of 400 characters"]


def job_input_outside(w):
    return post_job(w, {"kind": "sort", "inputs": ["../outside/secret.h5ad"]}, expect=403), ["'../outside/secret.h5ad'", "outside the server's data root"]


def job_folder_with_link_out(w):
    folder = w.root / "job_in"
    folder.mkdir()
    (folder / "x.h5ad").symlink_to(w.outside / "secret.h5ad")
    return post_job(w, {"kind": "sort", "inputs": ["job_in"]}, expect=403), ["job_in/x.h5ad", "resolves outside"]


def job_deep_json(w):
    return post_job(w, content=b'{"kind": "sort", "inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"), ["request body", "nested 5001 levels deep"]


def job_huge_body(w):
    return post_job(w, content=b'{"kind": "sort", "inputs": ["' + b"a" * (2 << 20) + b'"]}', expect=413), ["at most 1,048,576"]


def job_unknown_option(w):
    return post_job(w, {"kind": "sort", "inputs": [GOOD], "options": {"outptu_dir": "x"}}, expect=422), ["outptu_dir"]


CASES = [
    csr_index_past_n_vars, csr_negative_index, csr_float_indices, csr_indptr_not_monotone, csr_indptr_short_of_nnz,
    csr_indptr_wrong_length, csr_data_strings, csr_float_indptr, h5ad_not_hdf5, h5ad_without_x,
    config_nul_in_file_name, config_very_long_path, config_very_long_name, config_file_outside, config_missing_file,
    config_huge_batch, config_huge_batch_of_groups, config_deep_json, config_file_not_a_string, config_unknown_kind,
    config_symlink_out, toml_folder_with_link_out, toml_syntax, toml_pattern_matches_nothing, embeddings_missing,
    embeddings_not_torch, table_chunk_link_out, table_split_folder_link_out, table_garbage_chunk, table_unknown_column,
    table_huge_batch, tracks_csv_link_out, tracks_two_csvs, tracks_missing_column, experiments_yaml_missing,
    plate_outside, plate_broken_metadata, plate_chunk_link_out, ticket_garbage, open_session_deep_json_text, flight_info_path_descriptor, job_nul_in_input, job_long_input, job_nul_in_output_dir,
    job_long_output_dir, job_input_outside, job_folder_with_link_out, job_deep_json, job_huge_body, job_unknown_option,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_refused_naming_the_culprit(world, case):
    message, culprits = case(world)
    assert message, f"{case.__name__}: nothing was refused"
    missing = [c for c in culprits if c not in message]
    assert not missing, f"{case.__name__}: the message does not name {missing}: {message}"
    assert "Traceback" not in message and "server error in" not in message, message


def test_the_server_kept_serving_and_the_streaming_client_got_every_batch(world):
    deadline = time.monotonic() + 120
    while len(world.streamer.epochs) < 2 and not world.streamer.errors and time.monotonic() < deadline:
        time.sleep(0.1)
    world.streamer.stop.set()
    world.streamer.thread.join(120)
    assert world.server.proc.poll() is None, "the server process died"
    assert not world.streamer.errors, world.streamer.errors
    assert len(world.streamer.epochs) >= 2
    assert all(got == expected > 0 for got, expected in world.streamer.epochs), world.streamer.epochs
    assert httpx.get(f"{world.server.http_url}/healthz").json()["status"] == "ok"
