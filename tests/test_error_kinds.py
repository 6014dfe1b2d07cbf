"""A server error's kind travels in `extra_info` alone, before a stream and during one.

Raw `pyarrow.flight` clients against real servers on loopback: a parquet row group whose pages
are overwritten fails batch 2 of a table stream (kind `internal`, over gRPC), and a slot folder
that vanishes after the first batch fails a perturbation stream over shared memory (kind
`shm_unavailable`). Each error comes after batches were delivered, carries
b"cellfeed:<kind>" in `extra_info`, and its message names what failed, with no kind in the text.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from cellfeed.server.context import ServerContext
from cellfeed.server.kinds.perturbation.synthetic import write_perturbation_h5ad
from cellfeed.server.serving.flight import FlightService
from cellfeed.server.serving.sessions import SessionRegistry
from cellfeed.server.serving.shm import SlotPools
from cellfeed.server.settings import Settings
from cellfeed.wire import cellfeed_pb2 as pb
from cellfeed.wire import shm
from cellfeed.wire.errors import ErrorKind, kind_of, message_of
from tests.conftest import ServerProcess

ROWS, GROUP = 32, 8  # four row groups of eight rows: batch i of an unshuffled stream is row group i


def _session(client: flight.FlightClient, kind: str, config: dict) -> str:
    body = pb.OpenSession(kind=kind, config_json=json.dumps(config)).SerializeToString()
    info = pb.SessionInfo()
    info.ParseFromString(list(client.do_action(flight.Action("open_session", body)))[0].body.to_pybytes())
    return info.session_id


def _ticket(client: flight.FlightClient, session_id: str, split: str) -> pb.Ticket:
    request = pb.StreamRequest(session_id=session_id, split=split, rank=0, world_size=1, stream_count=1)
    info = client.get_flight_info(flight.FlightDescriptor.for_command(request.SerializeToString()))
    ticket = pb.Ticket()
    ticket.ParseFromString(info.endpoints[0].ticket.ticket)
    return ticket


def _read_until_error(reader: flight.FlightStreamReader, on_batch=lambda batch: None) -> tuple[list[pa.RecordBatch], flight.FlightError]:
    """Every batch the stream delivers, then the error that ends it (the test fails if none does)."""
    batches = []
    while True:
        try:
            batch = reader.read_chunk().data
        except StopIteration:
            pytest.fail(f"the stream ended cleanly after {len(batches)} batches; an error was expected")
        except flight.FlightError as exc:
            return batches, exc
        batches.append(batch)
        on_batch(batch)


def _assert_structured(error: flight.FlightError, kind: ErrorKind) -> None:
    assert isinstance(error, flight.FlightServerError)
    assert error.extra_info == f"cellfeed:{kind.value}".encode()
    assert kind_of(error) is kind
    assert "[cellfeed:" not in str(error)  # the kind is not in the message text


@pytest.fixture(scope="module")
def broken_table_server(tmp_path_factory):
    """A server over one parquet file whose third row group's pages are overwritten: its footer
    (read at open) is intact, so the session opens and the first two batches are served."""
    root = tmp_path_factory.mktemp("kinds") / "data"
    (root / "broken").mkdir(parents=True)
    path = root / "broken" / "chunk_000.parquet"
    table = pa.table({"x": np.arange(ROWS, dtype=np.int64), "name": [f"cell{i:03d}" for i in range(ROWS)]})
    pq.write_table(table, path, row_group_size=GROUP, compression="none")
    chunk = pq.ParquetFile(path).metadata.row_group(2).column(0)
    raw = bytearray(path.read_bytes())
    raw[chunk.data_page_offset : chunk.data_page_offset + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(raw))
    server = ServerProcess(root).start()
    yield server
    server.stop()


def test_an_error_after_the_first_batch_keeps_its_kind_over_grpc(broken_table_server):
    client = flight.FlightClient(broken_table_server.flight_uri)
    session_id = _session(client, "table", {"dataset": "broken", "batch_size": GROUP, "shuffle": False})
    ticket = _ticket(client, session_id, "all")
    batches, error = _read_until_error(client.do_get(flight.Ticket(ticket.SerializeToString())))
    assert [b.column("x").to_pylist() for b in batches] == [list(range(0, 8)), list(range(8, 16))]
    _assert_structured(error, ErrorKind.INTERNAL)
    assert message_of(error).startswith("server error in building batch 2 of split 'all' (epoch 0, rank 0/1)")
    # the server goes on serving: a stream that stops before the broken row group ends cleanly
    resumed = pb.Ticket(session_id=session_id, split="all", world_size=1, stream_count=1, first_batch=3)
    assert client.do_get(flight.Ticket(resumed.SerializeToString())).read_all().column("x").to_pylist() == list(range(24, 32))


@pytest.fixture
def slot_server(tmp_path):
    """An in-process server on loopback whose shared-memory slots live in a folder of this test."""
    write_perturbation_h5ad(tmp_path / "data" / "k562.h5ad", cell_type="k562", seed=1)
    folder = tmp_path / "slots"
    folder.mkdir()
    sessions = SessionRegistry(ServerContext.from_settings(Settings(data_root=str(tmp_path / "data"))))
    service = FlightService("grpc+tcp://127.0.0.1:0", sessions, SlotPools(folder))
    thread = threading.Thread(target=service.serve, daemon=True)
    thread.start()
    yield service, folder
    service.shutdown()
    service.pools.close()
    thread.join(10)


def _mark_taken(folder: Path, batch: pa.RecordBatch) -> None:
    """What a client does once it decoded a batch: TAKEN = the generation, in each slot it used."""
    for field in batch.schema:
        if shm.ref_info(field) is None:
            continue
        refs = batch.column(field.name)
        slots = {str(s) for s in refs.field("slot").cast(pa.string()).to_pylist()}
        generation = refs.field("generation")[0].as_py()
        for name in slots:
            header = np.memmap(folder / name, dtype=np.uint32, mode="r+", shape=(3,))
            header[shm.TAKEN] = generation
            header.flush()


def test_an_error_after_the_first_batch_keeps_its_kind_over_shared_memory(slot_server):
    service, folder = slot_server
    client = flight.FlightClient(f"grpc://127.0.0.1:{service.port}")
    config = {"files": ["k562.h5ad"], "pert_counts": "X", "group_size_S": 4, "batch_size": 4}
    ticket = _ticket(client, _session(client, "perturbation", config), "train")
    ticket.shm_pool = "0123456789abcdef"
    gone = folder.with_name("slots-gone")

    def on_batch(batch: pa.RecordBatch) -> None:
        # after the first batch the slot folder vanishes (as when /dev/shm is unmounted): the
        # server, once the client took the batch, cannot make the next slot
        if not gone.exists():
            folder.rename(gone)
        _mark_taken(gone, batch)

    reader = client.do_get(flight.Ticket(ticket.SerializeToString()))
    assert any(shm.ref_info(f) is not None for f in reader.schema)  # the counts travel in slots
    batches, error = _read_until_error(reader, on_batch)
    assert batches, "the error came before the first batch"
    _assert_structured(error, ErrorKind.SHM_UNAVAILABLE)
    assert f"shared-memory slot in {folder}" in message_of(error)


@pytest.mark.parametrize("over", ["grpc", "shm"])
def test_a_cancelled_stream_still_runs_its_cleanup(slot_server, over):
    """The error relay wraps the batches in one more generator: a client that cancels must still
    end the stream on the server (state, metrics, and over shared memory the pool given back)."""
    service, _ = slot_server
    client = flight.FlightClient(f"grpc://127.0.0.1:{service.port}")
    config = {"files": ["k562.h5ad"], "pert_counts": "X", "group_size_S": 4, "batch_size": 4}
    session_id = _session(client, "perturbation", config)
    ticket = _ticket(client, session_id, "train")
    ticket.continue_epochs = True  # endless: only the cancel ends it
    if over == "shm":
        ticket.shm_pool = "fedcba9876543210"
    reader = client.do_get(flight.Ticket(ticket.SerializeToString()))
    reader.read_chunk()
    reader.cancel()

    def streams() -> list[dict]:
        return [s for d in service.sessions.describe() if d["session_id"] == session_id for s in d["streams"]]

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and [s["state"] for s in streams()] == ["streaming"]:
        time.sleep(0.05)
    assert [(s["state"], s["transport"]) for s in streams()] in ([("cancelled", over)], [("closed", over)])
    if over == "shm":
        pool = service.pools._pools[ticket.shm_pool]
        assert pool.active == 0 and not any(slot.in_flight() for slot in pool.slots)  # released, unread batches given up
