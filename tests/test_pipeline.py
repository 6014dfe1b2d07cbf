"""The client pipeline's stages (cellfeed.client.pipeline) against a real server on loopback:
each follows the Node protocol, runs are deterministic, and get_state / reset mid-epoch give
exactly the batches not yet taken, whatever the number of streams."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cellfeed.client.loader import RemoteLoader
from cellfeed.client.pipeline.base import state_at
from cellfeed.client.pipeline.decode import Decode
from cellfeed.client.pipeline.prefetch import Prefetch
from cellfeed.client.pipeline.reader import StreamReader
from tests.helpers import barcodes, datamodule


@pytest.fixture(scope="module")
def dm(pert_server):
    return datamodule(pert_server, batch_size=4, num_workers=1)


def loader(dm, num_streams: int, **kw) -> RemoteLoader:
    return RemoteLoader(dm._connection, dm.session, "train", dm.decoder, num_streams=num_streams, prefetch=2, **kw)


def run(pipeline, count: int) -> list[dict]:
    return [pipeline.next() for _ in range(count)]


def test_two_runs_of_the_merged_pipeline_give_identical_batches(dm):
    a, b = loader(dm, 3, fixed_epoch=True), loader(dm, 1, fixed_epoch=True)
    total = len(a)
    assert total > 6
    first, second = a._pipeline(total), b._pipeline(total)
    first.reset(state_at(1, 0))
    second.reset(state_at(1, 0))
    try:
        x, y = run(first, total), run(second, total)
        with pytest.raises(StopIteration):  # a fixed epoch ends
            first.next()
        assert first.get_state() == state_at(1, total)
    finally:
        first.close()
        second.close()
    np.testing.assert_array_equal(barcodes(x), barcodes(y))
    np.testing.assert_array_equal(barcodes(x, "ctrl_cell_barcode"), barcodes(y, "ctrl_cell_barcode"))
    other = loader(dm, 2, fixed_epoch=True)._pipeline(total)
    other.reset(state_at(2, 0))  # another epoch: other batches
    try:
        assert not np.array_equal(barcodes(run(other, total)), barcodes(x))
    finally:
        other.close()


def test_get_state_and_reset_mid_epoch_give_exactly_the_rest(dm):
    reference_loader = loader(dm, 1, fixed_epoch=True)
    total = len(reference_loader)
    reference = reference_loader._pipeline(total)
    reference.reset(state_at(0, 0))
    try:
        whole = run(reference, total)
    finally:
        reference.close()
    taken = 5
    for streams, resumed_with in ((3, 2), (2, 4)):  # the state does not depend on the stream count
        first = loader(dm, streams)._pipeline(total)
        first.reset(state_at(0, 0))
        try:
            seen = run(first, taken)
            state = first.get_state()
        finally:
            first.close()
        assert state == state_at(0, taken)
        again = loader(dm, resumed_with)._pipeline(total)
        again.reset(state)
        try:
            rest = run(again, total - taken)
            assert again.get_state() == state_at(1, 0)  # a training pipeline goes on into epoch 1
        finally:
            again.close()
        np.testing.assert_array_equal(barcodes(seen + rest), barcodes(whole))


def test_a_stream_reader_resets_to_the_batch_it_owes(dm):
    owner = loader(dm, 3, fixed_epoch=True)
    total = len(owner)
    reader = StreamReader(owner, 1, total)
    reader.reset(state_at(0, 1))
    try:
        got = [reader.next() for _ in range(3)]
        assert [(r.epoch, r.batch) for r in got] == [(0, 1), (0, 4), (0, 7)]
        state = reader.get_state()
        assert state == state_at(0, 10)
        following = reader.next()
    finally:
        reader.close()
    fresh = StreamReader(owner, 1, total)
    fresh.reset(state)
    try:
        resumed = fresh.next()
    finally:
        fresh.close()
    assert (resumed.epoch, resumed.batch) == (following.epoch, following.batch) == (0, 10)
    assert resumed.data.equals(following.data)
    last = StreamReader(owner, 1, total)
    last.reset(state_at(0, total + 1))  # past a fixed epoch's end: nothing
    with pytest.raises(StopIteration):
        last.next()


def test_prefetch_state_is_the_consumers_not_the_threads(dm):
    owner = loader(dm, 2, fixed_epoch=True)
    total = len(owner)
    decoded: list[int] = []

    def decode(data):
        decoded.append(data.num_rows)
        return owner.decode(data)

    stage = Prefetch(Decode(StreamReader(owner, 0, total), decode, owner), 3, name="test-prefetch")
    stage.reset(state_at(0, 0))
    try:
        first = stage.next()
        deadline = time.monotonic() + 20
        # the thread runs ahead, bounded: 1 taken, 3 queued, 1 decoded and waiting for room
        while len(decoded) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert len(decoded) == 5
        assert (first.epoch, first.batch) == (0, 0)
        assert stage.get_state() == state_at(0, 2)  # what the consumer takes next, not the thread
        assert stage.next().batch == 2
    finally:
        stage.close()


def test_a_pass_asks_getflightinfo_once_for_all_its_streams(dm, monkeypatch):
    """The client builds no ticket: a pass's streams read endpoints of one FlightInfo, asked at
    the pass's start (again at a resume point), naming the client's replicas as locations."""
    conn = dm._connection
    asked: list[tuple[int, int, list[str]]] = []
    ask = conn.flight_info_once

    def counted(request):
        asked.append((request.epoch, request.first_batch, list(request.locations)))
        return ask(request)

    monkeypatch.setattr(conn, "flight_info_once", counted)
    ld = loader(dm, 3, fixed_epoch=True)
    total = len(ld)
    assert len(list(ld)) == total
    assert asked == [(0, 0, [conn.location])]
    ld.load_state_dict(dict(ld.state_dict(), next_batch=4))
    assert len(list(ld)) == total - 4
    assert asked[1:] == [(0, 4, [conn.location])]
