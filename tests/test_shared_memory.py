"""Shared-memory slots on one host: the same batches as over gRPC, reused slots, held batches
kept intact, a clean fallback when the folder is not shared, and no files left behind."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

from cellfeed.wire import shm
from tests.conftest import ServerProcess
from tests import test_dynaclr_stream as stream

SHM = shm.shm_dir()
data, server, _dm = stream.data, stream.server, stream._dm  # the same plates, server and DataModule
pytestmark = pytest.mark.skipif(SHM is None, reason="no shared-memory folder on this machine")


def _slot_files(server: ServerProcess) -> list[Path]:
    return sorted(SHM.glob(f"cellfeed-{server.proc.pid}-*"))


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x["anchor"], y["anchor"]) and torch.equal(x["positive"], y["positive"])
        torch.testing.assert_close(x["anchor_norm_meta"], y["anchor_norm_meta"], rtol=0, atol=0, equal_nan=True)
        assert repr(x["index"]) == repr(y["index"])  # repr: NaN parent ids compare equal


def test_slots_give_the_batches_grpc_gives_and_are_reused(server):
    via_slots, via_grpc = _dm(server, shared_memory=True), _dm(server, shared_memory=False)
    slots, grpc = via_slots.train_dataloader(), via_grpc.train_dataloader()
    assert slots.slots is not None and grpc.slots is None
    # held batches stay intact while later batches of the same stream are written
    _same(list(slots), list(grpc))
    assert _slot_files(server), "the stream used no slot"
    gc.collect()
    # epochs that drop each batch as they go reuse the slots they have
    count = len(_slot_files(server))
    for epoch in (1, 2):
        slots.set_epoch(epoch)
        grpc.set_epoch(epoch)
        for a, b in zip(slots, grpc):
            _same([a], [b])
    assert len(_slot_files(server)) == count
    assert len(slots) > 8  # more batches than a stream keeps slots for


def test_streams_broken_off_give_their_slots_back(server):
    """A loop left after one batch cancels its streams; slots written for batches the client never
    took must not stay taken, or the next epochs would wait and fall back to gRPC."""
    dm = _dm(server, shared_memory=True)
    loader = dm.train_dataloader()
    for epoch in range(6):
        loader.set_epoch(epoch)
        for _ in loader:
            break
    gc.collect()
    loader.set_epoch(6)
    assert len(list(loader)) == len(loader)
    assert loader.slots is not None  # no fallback: the pool was never stuck


def test_validation_and_predict_streams_use_slots_too(server):
    dm = _dm(server, shared_memory=True)
    reference = _dm(server, shared_memory=False)
    _same(list(dm.val_dataloader()), list(reference.val_dataloader()))
    dm.setup("predict")
    reference.setup("predict")
    predicted, expected = list(dm.predict_dataloader()), list(reference.predict_dataloader())
    assert all(torch.equal(a["anchor"], b["anchor"]) for a, b in zip(predicted, expected))


def test_a_client_that_does_not_share_the_folder_streams_over_grpc(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLFEED_SHM_DIR", str(tmp_path))  # this client's folder is not the server's
    dm = _dm(server)  # shared_memory=None: when available
    assert dm.train_dataloader().slots is None
    assert len(list(dm.train_dataloader())) > 0
    with pytest.raises(RuntimeError, match="does not see this host's shared-memory folder"):
        _dm(server, shared_memory=True)


def test_slots_the_client_cannot_open_fall_back_to_grpc(server, tmp_path):
    """The probe passed, but the slot files cannot be opened here (another user's files, say):
    the stream goes on over gRPC from the batch it owed, losing and repeating nothing."""
    dm, reference = _dm(server, shared_memory=True), _dm(server, shared_memory=False)
    loader = dm.train_dataloader()
    loader.slots.directory = tmp_path  # where the server's slot files are not
    _same(list(loader), list(reference.train_dataloader()))
    assert loader.slots is None


def test_a_server_that_cannot_make_slots_streams_over_grpc(data, server):
    """Slot files fail mid-stream (here: a file-size limit, as a full /dev/shm would): the error
    reaches the client with its kind (extra_info, mid-stream too), and the client goes on over
    gRPC at once, not after a minute of retries."""
    limited = ServerProcess(data.root, max_file_bytes=64 << 10)
    limited.start()
    try:
        dm = _dm(limited, shared_memory=True)
        loader = dm.train_dataloader()
        _same(list(loader), list(_dm(server, shared_memory=False).train_dataloader()))
        assert loader.slots is None
    finally:
        limited.stop()


def test_probe_reads_only_probe_files_of_its_folder(server):
    client = flight.FlightClient(server.flight_uri)
    for name in ("../etc/hostname", "cellfeed-probe-../../x", "hostname"):
        body = json.dumps({"name": name, "content": "00"}).encode()
        assert list(client.do_action(flight.Action("shm_probe", body)))[0].body.to_pybytes() == b"0"
    with pytest.raises(flight.FlightServerError, match="shm_probe: the body must be JSON"):
        list(client.do_action(flight.Action("shm_probe", b"not json")))


def test_a_malformed_slot_pool_key_is_refused(server):
    from cellfeed.client import RequestError

    dm = _dm(server, shared_memory=True)
    loader = dm.train_dataloader()
    loader.slot_use.key = "not-hex!"
    with pytest.raises(RequestError, match="shm_pool"):
        next(iter(loader))


def test_slot_files_go_with_the_server(data):
    process = ServerProcess(data.root)
    process.start()
    try:
        dm = _dm(process, shared_memory=True)
        batches = list(dm.train_dataloader())
        assert batches and _slot_files(process)
    finally:
        process.stop()
    assert not _slot_files(process)
    # a batch still held by the client stays readable: its mapping outlives the file
    assert torch.isfinite(batches[0]["anchor"]).all()


def test_resolve_refuses_refs_outside_a_slot(tmp_path):
    from cellfeed.client.shm import SlotReader

    name = "cellfeed-1-0123456789abcdef-0"
    (tmp_path / name).write_bytes(bytes(shm.HEADER_BYTES + 64))
    field = pa.field("x", shm.REF_TYPE, metadata={shm.REF_KEY: json.dumps({"shape": [16], "dtype": "float32"})})
    refs = pa.StructArray.from_arrays(
        [pa.array([name, name]).dictionary_encode(), pa.array([shm.HEADER_BYTES, shm.HEADER_BYTES + 64]), pa.array([0, 0], pa.uint32())],
        fields=list(shm.REF_TYPE),
    )
    with pytest.raises(ValueError, match="outside the data of slot"):
        SlotReader(tmp_path).resolve(pa.RecordBatch.from_arrays([refs], schema=pa.schema([field])))
    bad = pa.StructArray.from_arrays(
        [pa.array(["../../etc/passwd"]).dictionary_encode(), pa.array([shm.HEADER_BYTES]), pa.array([0], pa.uint32())], fields=list(shm.REF_TYPE)
    )
    with pytest.raises(ValueError, match="not a cellfeed slot"):
        SlotReader(tmp_path).resolve(pa.RecordBatch.from_arrays([bad], schema=pa.schema([field])))
    dangling = pa.StructArray.from_arrays(
        [pa.DictionaryArray.from_arrays(pa.array([3], pa.int32()), pa.array([name]), safe=False), pa.array([shm.HEADER_BYTES]), pa.array([0], pa.uint32())],
        fields=list(shm.REF_TYPE),
    )
    with pytest.raises(ValueError, match="1-name dictionary"):
        SlotReader(tmp_path).resolve(pa.RecordBatch.from_arrays([dangling], schema=pa.schema([field])))


def test_resolve_rebuilds_list_columns_and_refuses_broken_runs(tmp_path):
    """A `shm_list_ref` column comes back as its list column over the slot; rows that are not one
    contiguous run of the slot are refused."""
    from cellfeed.client.shm import SlotReader

    name = "cellfeed-1-0123456789abcdef-1"
    values = np.arange(10, dtype=np.float32)
    (tmp_path / name).write_bytes(bytes(shm.HEADER_BYTES) + values.tobytes())
    field = pa.field("x_data", shm.LIST_REF_TYPE, metadata={shm.LIST_KEY: json.dumps({"dtype": "float32"})})

    def refs(offsets, lengths):
        names = pa.DictionaryArray.from_arrays(np.zeros(len(offsets), np.int32), pa.array([name]))
        columns = [names, pa.array(offsets, pa.int64()), pa.array(lengths, pa.int32()), pa.array([0] * len(offsets), pa.uint32())]
        return pa.RecordBatch.from_arrays([pa.StructArray.from_arrays(columns, fields=list(shm.LIST_REF_TYPE))], schema=pa.schema([field]))

    start = shm.HEADER_BYTES
    column = SlotReader(tmp_path).resolve(refs([start, start + 12, start + 12], [3, 0, 7])).column(0)
    assert column.type == pa.list_(pa.float32())
    assert column.to_pylist() == [[0, 1, 2], [], [3, 4, 5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="not one contiguous run"):
        SlotReader(tmp_path).resolve(refs([start, start + 16], [3, 7]))
    with pytest.raises(ValueError, match="outside the data of slot"):
        SlotReader(tmp_path).resolve(refs([start, start + 12], [3, 8]))


def test_slot_pool_hands_out_only_slots_the_client_is_done_with(tmp_path):
    """The header words, one writer each: the server's GEN, the client's TAKEN and DONE."""
    from cellfeed.server.serving.shm import SlotsUnavailable, SlotPool

    pool = SlotPool(tmp_path)
    first: dict = {}
    a = pool.array((4,), np.float32, taken=first)
    (slot,) = pool.slots
    assert slot.in_flight() and not slot.is_free() and first == {slot: 1}
    slot.header[shm.TAKEN] = slot.header[shm.DONE] = 1  # the client decoded, then dropped it
    assert slot.is_free()
    second: dict = {}
    b = pool.array((4,), np.float32, taken=second)
    assert np.shares_memory(a, b) and second == {slot: 2}
    pool.give_up(first)  # the first stream ends late: generation 2 is not its to give up
    assert slot.in_flight()
    slot.header[shm.TAKEN] = 2  # the client took generation 2 and still holds it
    pool.give_up(second)
    assert not slot.is_free()
    slot.header[shm.DONE] = 2
    assert slot.is_free()
    # at most AHEAD slots in flight: the next stream waits (here: is told to stop waiting)
    pool.array((4,), np.float32)
    pool.array((4,), np.float32)
    with pytest.raises(SlotsUnavailable, match="ended while waiting"):
        pool.array((4,), np.float32, cancelled=lambda: True)
    pool.give_up()  # a new stream for this key: nothing in flight will be read any more
    assert all(s.is_free() for s in pool.slots)
    pool.close()
    assert not list(tmp_path.iterdir())


def test_a_new_server_removes_slot_files_of_servers_that_are_gone(tmp_path):
    import os
    import subprocess
    import sys

    from cellfeed.server.serving.shm import SlotPools

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = os.getppid()
    for pid in (dead.pid, alive, os.getpid()):
        (tmp_path / f"cellfeed-{pid}-0123456789abcdef-0").write_bytes(b"x")
    (tmp_path / "cellfeed-probe-notaslot").write_bytes(b"x")
    pools = SlotPools(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    pools.close()
    assert left == sorted([f"cellfeed-{alive}-0123456789abcdef-0", "cellfeed-probe-notaslot"])


def test_the_server_stops_promptly_while_clients_pause_mid_stream(data):
    """A client that stops reading (a long validation, a debugger) holds its streams open: the
    server waits for it as long as it lives, yet SIGTERM still ends the server within seconds."""
    import time

    process = ServerProcess(data.root)
    process.start()
    paused = []
    for shared_memory in (True, False):
        loader = _dm(process, shared_memory=shared_memory).train_dataloader()
        batches = iter(loader)
        next(batches)
        paused.append(batches)
    time.sleep(1.0)  # the server fills what the paused streams allow, then waits
    assert process.proc.poll() is None
    t0 = time.monotonic()
    process.proc.terminate()
    process.proc.wait(20)
    assert time.monotonic() - t0 < 12, "the server waited for clients that stopped reading"
    assert process.proc.returncode == 0
    assert not _slot_files(process)


def test_slot_buffers_place_columns_asked_for_together_in_one_slot(tmp_path):
    """A CSR's indices and values share a slot (values 64-byte aligned); a large column the
    source built elsewhere is copied into a slot of its own; both resolve to what was built."""
    from cellfeed.client.shm import SlotReader
    from cellfeed.server.serving.shm import SlotBuffers, SlotPool, to_refs
    from cellfeed.wire import codec, perturbation

    pool = SlotPool(tmp_path)
    buffers = SlotBuffers(pool)
    made = buffers.arrays({"pert_indices": ((5,), np.dtype(np.uint16)), "pert_data": ((5,), np.dtype(np.float32))})
    made["pert_indices"][:] = [0, 3, 1, 2, 4]
    made["pert_data"][:] = [1, 2, 3, 4, 5]
    columns = codec.csr_columns("pert", np.array([0, 2, 2, 5]), made["pert_indices"], made["pert_data"], pa.uint16())
    dense = np.arange(3 * 1024, dtype=np.float32).reshape(3, 1024)  # built outside the buffers
    schema = perturbation.batch_schema({"pert": (False, 8), "ctrl": (True, 1024)}, controls_by_row=False, barcodes=False,
                                       dataset_column=False, obs_types={}, meta={})
    rb = pa.RecordBatch.from_arrays([columns["pert_indices"], columns["pert_data"], codec.tensor_column(dense)], names=schema.names[:3])
    refs = to_refs(rb, shm.ref_schema(pa.schema(list(schema)[:3])), buffers)
    assert len(pool.slots) == 2  # the CSR's slot, and the dense column's copy
    csr_slot = pool.slots[0]
    assert buffers.placed["pert_data"][1] == shm.HEADER_BYTES + 64 and buffers.placed["pert_indices"][0] is csr_slot
    assert refs.column("pert_data").field("slot").dictionary[0].as_py() == csr_slot.name
    resolved = SlotReader(tmp_path).resolve(refs)
    assert resolved.column("pert_indices").to_pylist() == [[0, 3], [], [1, 2, 4]]
    assert resolved.column("pert_data").to_pylist() == [[1, 2], [], [3, 4, 5]]
    np.testing.assert_array_equal(codec.tensor_from_column(resolved.column("ctrl_dense")), dense)
    pool.close()
