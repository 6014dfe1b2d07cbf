"""The client under faults: it never crashes or hangs, and it fails by kind.

A server in a subprocess is SIGKILLed, SIGSTOPped and restarted under clients that reset their
connection while streaming; a hung server gives a clear ServerUnavailable in bounded time; after
a restart the client goes back to shared-memory slots; bad input and bad certificates fail at
once; hostile batches raise instead of corrupting memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from cellfeed.client import PerturbationDataModule, RequestError, ServerUnavailable
from cellfeed.client.connection import Connection
from cellfeed.client.loader import RemoteLoader
from cellfeed.client.perturbation import PerturbationBatchDecoder
from cellfeed.client.table import decode_table_batch
from cellfeed.server.kinds.perturbation.synthetic import write_perturbation_h5ad
from cellfeed.wire import cellfeed_pb2 as pb
from cellfeed.wire import csr, shm
from cellfeed.wire.errors import ErrorKind, kind_of, message_of, server_error
from tests.conftest import ServerProcess

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(files=["k562.h5ad"], group_size_S=4, batch_size=4, barcodes=True)


@pytest.fixture(scope="module")
def fault_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "data"
    write_perturbation_h5ad(root / "k562.h5ad", cell_type="k562", n_targets=12, seed=3)  # 28 batches of 4 groups
    shutil.copy(root / "k562.h5ad", root / "corrupt.h5ad")
    with h5py.File(root / "corrupt.h5ad", "r+") as f:
        indptr = f["X/indptr"][:]
        indptr[len(indptr) // 2] = indptr[-1] * 3
        f["X/indptr"][:] = indptr
    return root


@pytest.fixture(scope="module")
def fault_server(fault_root):
    server = ServerProcess(fault_root).start()
    yield server
    server.stop()


DIGEST = """
def digest(batch):
    \"\"\"Everything a batch carries that the faults could get wrong: cells, genes and values.\"\"\"
    h = hashlib.sha1()
    for key in ("pert_cell_barcode", "ctrl_cell_barcode"):
        h.update("|".join(batch[key].ravel()).encode())
    for key in ("pert_cell_emb", "ctrl_cell_emb"):
        h.update(batch[key]._indices().numpy().tobytes())
        h.update(batch[key]._values().numpy().tobytes())
    return h.hexdigest()
"""
exec(DIGEST)  # the client subprocess runs the same text

TICKET = """
def ticket(ld, epoch, stream_index, first_batch):
    \"\"\"Stream `stream_index`'s ticket from `first_batch`, as GetFlightInfo gives it (the client
    builds no ticket itself).\"\"\"
    from cellfeed.wire import cellfeed_pb2 as pb

    request = pb.StreamRequest(
        session_id=ld.session.session_id, split=ld.split, epoch=epoch, rank=ld.rank, world_size=ld.world_size,
        stream_count=ld.num_streams, first_batch=first_batch, continue_epochs=ld.continues,
    )
    return ld.connection.flight_info(request, session=ld.session, retry=False).endpoints[stream_index].ticket.ticket
"""
exec(TICKET)


# -- (a) 8 threads resetting and streaming while the server is killed, stopped, restarted -------
CHILD = r'''
import hashlib, json, random, sys, threading, time
from pathlib import Path
import cellfeed.client  # noqa: F401 - first, as the README advises
import pyarrow.flight as flight
from cellfeed.client import PerturbationDataModule
from cellfeed.client.loader import RemoteLoader

args = json.loads(sys.argv[1])
ready, stop = Path(args["ready"]), Path(args["stop"])
dm = PerturbationDataModule(server=args["server"], num_workers=2, **args["small"])
dm.setup("fit")  # with the default deadlines: a cold open may take seconds on a busy machine
conn, session = dm._connection, dm.session
conn.call_timeout, conn.read_timeout, conn.retry_seconds = 2.0, 2.0, 40.0  # the SIGSTOP outlasts them
''' + DIGEST + TICKET + r'''


def loader(**kw):
    return RemoteLoader(conn, session, "train", dm.decoder, num_streams=2, prefetch=1, slots=dm._slots, **kw)


reference = {e: [digest(b) for b in loader(epoch=e, fixed_epoch=True)] for e in (0, 1)}
failures, passes = [], [0] * 8


def worker(t):
    rng = random.Random(t)
    try:
        # even threads: a fixed epoch (validation-like streams); odd ones: a training loop over
        # epochs 0, 1, 0, 1 (streams go on into the next epoch, or are closed and reopened)
        ld = loader(epoch=0, fixed_epoch=True) if t % 2 == 0 else loader()
        n = 0
        while not stop.exists():
            e = n % 2 if t % 2 else 0
            ld.set_epoch(e)
            got = []
            for batch in ld:
                got.append(digest(batch))
                if rng.random() < 0.5:
                    conn.reset()  # what a stream does when its server goes away
            if got != reference[e]:
                bad = sum(a != b for a, b in zip(got, reference[e]))
                failures.append(f"thread {t} pass {n} (epoch {e}): {len(got)} of {len(reference[e])} batches, {bad} differ")
            n += 1
            passes[t] = n
            # a burst of reset + open + read: the race that crashed the client in gRPC (a client
            # closed under another thread's do_get) within seconds
            burst_end = time.monotonic() + 0.5
            while time.monotonic() < burst_end:
                conn.reset()
                try:
                    stream = conn.open_stream(ticket(ld, 0, t % 2, t % 2))
                    try:
                        stream.read()
                    finally:
                        stream.close()
                except (flight.FlightError, ConnectionError):
                    break  # the server is down or hung just now: that is the loaders' part
        ld.close()
    except BaseException as exc:  # noqa: BLE001
        failures.append(f"thread {t}: {exc!r}")


threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(8)]
for thread in threads:
    thread.start()
ready.write_text("1")
deadline = time.monotonic() + 120
for thread in threads:
    thread.join(timeout=max(0.1, deadline - time.monotonic()))
hung = [t for t, thread in enumerate(threads) if thread.is_alive()]
print(json.dumps({"passes": passes, "failures": failures, "hung": hung, "slots": dm._slots is not None}), flush=True)
sys.exit(3 if hung else 1 if failures else 0)
'''


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_threads_resetting_and_streaming_survive_kill_stop_and_restart(fault_server, tmp_path):
    """The stress run that crashed the client in gRPC 2 times of 2 (a reset closed the client
    under another thread's do_get). The client runs in a subprocess, so a segfault fails the
    test; every pass of every thread must give exactly the batches of an uninterrupted run."""
    server = fault_server
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    args = {"server": server.flight_uri, "ready": str(ready), "stop": str(stop), "small": SMALL}
    log = tmp_path / "client.log"  # a file, not a pipe: a chatty client must not block on a full pipe
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert child.poll() is None, f"client exited with {child.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "client did not start streaming"
            time.sleep(0.1)
        time.sleep(1.5)
        server.kill()  # SIGKILL mid-stream
        time.sleep(0.5)
        server.start()
        time.sleep(1.5)
        os.kill(server.proc.pid, signal.SIGSTOP)  # hung: longer than the read timeout
        time.sleep(3.5)
        os.kill(server.proc.pid, signal.SIGCONT)
        time.sleep(1.5)
        server.restart()  # SIGTERM, then back
        time.sleep(2.0)
        stop.write_text("1")
        child.wait(timeout=150)
    finally:
        if server.proc and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        if child.poll() is None:
            child.kill()
            child.wait()
        if server.proc.poll() is not None:
            server.start()  # for the tests after this one
    out = log.read_text()
    assert child.returncode == 0, f"client exited with {child.returncode} (-11: segfault, 3: hung, 1: wrong batches):\n{out[-4000:]}"
    summary = json.loads(out.strip().splitlines()[-1])
    print(summary)
    assert min(summary["passes"]) >= 1, summary


def test_a_reset_closes_the_old_client_only_after_its_last_stream(fault_server):
    """Item 1 without the race: the stream keeps its client generation open across resets."""
    dm = PerturbationDataModule(server=fault_server.flight_uri, **SMALL)
    dm.setup("fit")
    conn, loader = dm._connection, dm.train_dataloader()
    stream = conn.open_stream(ticket(loader, 0, 0, 0))
    old = stream._gen
    assert stream.read() is not None
    conn.reset()
    conn.reset(old.number)  # a second reset of the same generation changes nothing
    assert old.retired and not old.closed and conn.generation == old.number + 1
    fresh = conn.open_stream(ticket(loader, 0, 0, 1))  # the next call reconnects
    assert fresh.generation == old.number + 1 and fresh.read() is not None
    assert stream.read() is not None  # the old stream reads on, its client open
    stream.close()
    assert old.closed and old.users == 0
    conn.reset(old.number)  # stale: the current generation stays
    assert not fresh._gen.retired
    fresh.close()


# -- (b) a hung server: a clear ServerUnavailable in bounded time --------------------------------
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_hung_server_fails_setup_len_and_iteration_in_bounded_time(fault_server, monkeypatch):
    server = fault_server
    try:
        dm = PerturbationDataModule(server=server.flight_uri, num_workers=2, prefetch_factor=1, **SMALL)
        dm.setup("fit")  # with the default deadlines: a cold open may take seconds on a busy machine
        conn = dm._connection
        conn.call_timeout, conn.read_timeout, conn.retry_seconds = 1.0, 1.0, 2.0
        for name, value in (("CALL_TIMEOUT", "1"), ("READ_TIMEOUT", "1"), ("RETRY_SECONDS", "2")):
            monkeypatch.setenv(f"CELLFEED_{name}", value)  # what the fresh module's connection takes
        loader = dm.train_dataloader()
        batches = iter(loader)
        next(batches)
        os.kill(server.proc.pid, signal.SIGSTOP)  # no SIGCONT until the end

        def rest_of_training():
            for _ in batches:  # what gRPC had buffered, then the stall
                pass
            for e in range(1, 6):
                loader.set_epoch(e)
                for _ in loader:
                    pass

        fresh = PerturbationDataModule(server=server.flight_uri, **SMALL)
        other_rank = RemoteLoader(dm._connection, dm.session, "train", dm.decoder, rank=1, world_size=2)
        cases = [
            ("setup", lambda: fresh.setup("fit"), r"unreachable for 2 s \(DoAction\(open_session\)"),
            ("len", lambda: len(other_rank), r"unreachable for 2 s \(GetFlightInfo\('train'\)"),
            ("iteration", rest_of_training, r"failed for 2 s while streaming batch \d+ of 'train'"),
        ]
        for what, call, message in cases:
            started = time.monotonic()
            with pytest.raises(ServerUnavailable, match=message):
                call()
            took = time.monotonic() - started
            assert took < 25, f"{what} took {took:.1f} s against a hung server (deadlines 1 s, retry budget 2 s)"
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_a_slow_training_step_is_no_stall(fault_server):
    """The read deadline counts only time spent waiting for the server: a loop that takes longer
    than it per batch reads on, with no reconnect and the batches of an undisturbed run."""
    dm = PerturbationDataModule(server=fault_server.flight_uri, prefetch_factor=1, **SMALL)
    dm.setup("fit")
    reference = [digest(b) for b in RemoteLoader(dm._connection, dm.session, "train", dm.decoder, num_streams=2, fixed_epoch=True)]
    conn = dm._connection
    got, generation, after_slow_steps = [], None, None
    for i, batch in enumerate(dm.train_dataloader()):
        got.append(digest(batch))
        if i == 0:  # the streams are open: from now on, a deadline shorter than a training step
            generation, conn.read_timeout = conn.generation, 0.5
        if i < 3:
            time.sleep(1.2)  # the streams' queues are full: they wait on us, not on the server
        elif i == 3:  # then a generous deadline again: a busy machine may be slow to serve
            after_slow_steps, conn.read_timeout = conn.generation, 60.0
    assert got == reference
    assert after_slow_steps == generation, "a slow consumer was taken for a hung server"
    dm.teardown("fit")


# -- (c) after a restart, back to shared memory ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shm.shm_dir() is None, reason="no shared-memory folder on this machine")
def test_after_a_restart_the_client_uses_shared_memory_again(fault_server):
    server = fault_server
    try:
        grpc = PerturbationDataModule(server=server.flight_uri, shared_memory=False, **SMALL)
        grpc.setup("fit")
        reference = [[digest(b) for b in RemoteLoader(grpc._connection, grpc.session, "train", grpc.decoder, epoch=e, fixed_epoch=True)] for e in (0, 1)]
        dm = PerturbationDataModule(server=server.flight_uri, shared_memory=None, prefetch_factor=1, **SMALL)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert loader.slots is not None
        first_pid = server.proc.pid
        got = []
        for i, batch in enumerate(loader):
            got.append(digest(batch))
            if i == 2:
                server.restart()  # SIGTERM: its streams end, its slot files go; then a new process
        assert got == reference[0]
        assert server.proc.pid != first_pid
        assert [digest(b) for b in loader] == reference[1]
        assert loader.slots is not None, "the client stayed on gRPC after the restart"
        assert list(shm.shm_dir().glob(f"cellfeed-{server.proc.pid}-*")), "the restarted server wrote no slot for the client"
        loader.close()
    finally:
        if server.proc.poll() is not None:
            server.start()


# -- (d) refusals fail at once, naming what is at fault ------------------------------------------
def _at_once(call, error, message, bound=10.0):
    started = time.monotonic()
    with pytest.raises(error, match=message) as info:
        call()
    assert time.monotonic() - started < bound, f"took {time.monotonic() - started:.1f} s: retried as if transient"
    return info.value


def test_bad_input_fails_at_once_naming_the_key(fault_server):
    """The retry budget is the default 60 s; refusals come back in well under it."""
    bad_seed = PerturbationDataModule(server=fault_server.flight_uri, seed=-1, **SMALL)
    _at_once(lambda: bad_seed.setup("fit"), RequestError, r"seed: Input should be greater than or equal to 0")
    corrupt = PerturbationDataModule(server=fault_server.flight_uri, **dict(SMALL, files=["corrupt.h5ad"]))
    _at_once(lambda: corrupt.setup("fit"), RequestError, r"corrupt.h5ad: .*indptr")

    conn = Connection(fault_server.flight_uri)
    session = conn.open_session("perturbation", {k: v for k, v in SMALL.items()})
    # GetFlightInfo checks rank and streams as DoGet does
    _at_once(lambda: conn.plan(session, "train", 0, 9, 2, 1, 0), RequestError, r"StreamRequest: rank 9 / world size 2")
    _at_once(lambda: conn.plan(session, "train", 0, 0, 1, 0, 0), RequestError, r"stream 0 / 0")
    total = conn.plan(session, "train", 0, 0, 1, 1, 0).num_batches
    _at_once(lambda: conn.plan(session, "train", 0, 0, 1, 1, total + 3), RequestError, rf"first_batch {total + 3} is past the end of split 'train' \({total} batches per rank\)")
    ticket = pb.Ticket(session_id=session.session_id, split="train", world_size=1, stream_count=1, first_batch=total)
    with pytest.raises(flight.FlightServerError, match=rf"ticket: first_batch {total} is past the end") as info:
        flight.connect(fault_server.flight_uri).do_get(flight.Ticket(ticket.SerializeToString())).read_all()
    assert kind_of(info.value) is ErrorKind.INVALID
    # an unknown split fails at once as well
    _at_once(lambda: len(RemoteLoader(conn, session, "holdout", lambda rb: rb)), RequestError, r"unknown split 'holdout'")


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_a_tls_handshake_failure_fails_at_once(fault_root, tmp_path):
    cert, key = _self_signed(tmp_path)
    server = ServerProcess(fault_root, {"tls_cert": str(cert), "tls_key": str(key)}).start()
    try:
        location = f"grpc+tls://127.0.0.1:{server.flight_port}"
        untrusted = Connection(location)  # the system's roots do not hold a self-signed certificate
        _at_once(lambda: untrusted.open_session("perturbation", SMALL), RequestError, r"the TLS handshake failed .*certificate verify failed.*tls_root_certs")
        trusted = Connection(location, tls_root_certs=cert.read_bytes())
        assert trusted.open_session("perturbation", SMALL).session_id
    finally:
        server.stop()


def test_error_kinds_round_trip_through_extra_info_only():
    for kind in ErrorKind:
        error = server_error("x.h5ad: bad", kind)
        assert error.extra_info == f"cellfeed:{kind.value}".encode() and kind_of(error) is kind
        assert str(error) == "x.h5ad: bad"  # the kind is not in the message
        # as received: gRPC appends its detail to the message; extra_info comes through as sent
        received = flight.FlightServerError("x.h5ad: bad. Detail: Python exception: Traceback ...", extra_info=error.extra_info)
        assert kind_of(received) is kind and message_of(received) == "x.h5ad: bad"
    assert kind_of(flight.FlightServerError("Stream removed")) is None  # the transport's: retried
    # the kind is structured: text that looks like one is not read as one
    assert kind_of(flight.FlightServerError("m [cellfeed:invalid]")) is None
    assert kind_of(flight.FlightServerError("m", extra_info=b"cellfeed:from_a_newer_server")) is ErrorKind.INTERNAL


# -- (e) hostile batches raise, they do not corrupt memory ---------------------------------------
G, S = 50, 4


def _decoder() -> PerturbationBatchDecoder:
    info = {"group_size_S": S, "n_vars": G, "targets": ["G000", "G001"], "cell_types": ["k562"], "batches": ["b0"]}
    return PerturbationBatchDecoder(info, None)


def _list(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """A list array from raw buffers: no validation, as a hostile server's IPC batch could be."""
    values = pa.array(values)
    return pa.ListArray.from_buffers(pa.list_(values.type), len(offsets) - 1, [None, pa.py_buffer(offsets.astype(np.int32).tobytes())], children=[values])


def _batch(indptr, indices, index_type=np.uint16, data=None) -> pa.RecordBatch:
    rows = len(indptr) - 1
    indptr = np.asarray(indptr)
    data = np.ones(len(indices), np.float32) if data is None else data
    codes = lambda n: pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array([f"v{i}" for i in range(n)]))  # noqa: E731
    good = np.arange(rows + 1, dtype=np.int32)
    return pa.RecordBatch.from_pydict({
        "target": codes(2), "cell_type": codes(1), "batch": codes(1),
        "pert_indices": _list(indptr, np.asarray(indices, dtype=index_type)),
        "pert_data": _list(indptr, data),
        "ctrl_indices": _list(good, np.zeros(rows, index_type)),
        "ctrl_data": _list(good, np.ones(rows, np.float32)),
        "cell_mask": pa.array(np.ones(rows, bool)),
    })


@pytest.mark.parametrize(
    "indptr,indices,index_type,message",
    [
        ([0, 2, 3, 3, 4, 4, 5, 6, 7], [1, 2, 3, 4, 5, G, 7], np.uint16, rf"column index {G} is outside \[0, {G}\)"),
        ([0, 2, 3, 3, 4, 4, 5, 6, 7], [1, 2, 3, 4, 5, 65_535, 7], np.uint16, rf"column index 65535 is outside \[0, {G}\)"),
        ([0, 2, 3, 3, 4, 4, 5, 6, 7], [1, 2, -7, 4, 5, 6, 7], np.int32, r"column index -7 is outside"),
        ([0, 2, 3, 1, 4, 4, 5, 5, 6], [1, 2, 3, 4, 5, 6], np.uint16, r"indptr decreases at row 2 \(3 -> 1\)"),
    ],
    ids=["index-at-n_vars", "narrow-index-65535", "negative-index", "indptr-decreases"],
)
def test_a_hostile_batch_raises_instead_of_corrupting_memory(indptr, indices, index_type, message):
    rb = _batch(indptr, indices, index_type)
    with pytest.raises(ValueError, match=message):
        _decoder()(rb)


def test_a_batch_with_fewer_values_than_indices_is_refused():
    """The decoder reads both columns by the indices' offsets: the values column must keep up."""
    rb = _batch([0, 2, 3, 3, 4, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7])
    short = _list(np.array([0, 1, 1, 1, 2, 2, 3, 3, 3]), np.ones(3, np.float32))
    rb = rb.set_column(rb.schema.get_field_index("pert_data"), "pert_data", short)
    with pytest.raises(ValueError, match="3 values for 7 column indices"):
        _decoder()(rb)
    with pytest.raises(ValueError, match="indptr runs from 0 to 60; it must run from 0 to nnz = 6"):
        csr.check(np.array([0, 3, 60]), np.zeros(6, np.uint16), np.zeros(6, np.float32), G)


def test_a_sound_batch_decodes_and_matches_its_csr():
    indptr = [0, 2, 3, 3, 4, 4, 5, 5, 6]
    out = _decoder()(_batch(indptr, [1, 2, 3, 4, 5, G - 1]))
    dense = out["pert_cell_emb"].to_dense()
    assert dense.shape == (2, S, G) and float(dense.sum()) == 6.0 and float(dense[1, 3, G - 1]) == 1.0


def test_hostile_control_rows_and_table_offsets_are_refused():
    m_indptr = np.array([0, 1, 2], np.int64)
    controls = (m_indptr, np.array([0, 1], np.int32), np.ones(2, np.float32))
    with pytest.raises(IndexError, match="row 5 is outside the 2 rows"):
        csr.gather([(controls, np.array([0, 5]))])
    corrupt = (np.array([0, 1, 900], np.int64), controls[1], controls[2])
    with pytest.raises(ValueError, match="outside the 2 values of their CSR"):
        csr.gather([(corrupt, np.array([1]))])
    bad = pa.RecordBatch.from_pydict({"values": _list(np.array([0, 3, 1, 4]), np.arange(4, dtype=np.float32))})  # decreasing
    with pytest.raises(ValueError, match="table batch column 'values'"):
        decode_table_batch(bad)
