"""Stream striding and epoch roll-over, the arithmetic both ends of a DoGet stream must share.

A rank's epoch is `num_batches` rank-local batches. `stream_count` streams split it: stream i
carries the batches k with k % stream_count == i, from the first one at or after `first_batch`,
in increasing order. With `continue_epochs`, after its last batch of an epoch a stream goes on
with batch i of the next epoch. The server builds one Ticket per stream in GetFlightInfo.
"""

from __future__ import annotations

from collections.abc import Sequence

from cellfeed.wire import cellfeed_pb2 as pb


def stream_of(batch: int, stream_count: int) -> int:
    """The stream that carries rank-local batch `batch`."""
    return batch % stream_count


def stream_start(first_batch: int, stream_index: int, stream_count: int) -> int:
    """The first batch stream `stream_index` carries: the least k >= first_batch on that stream."""
    return first_batch + (stream_index - first_batch) % stream_count


def stream_batches(first_batch: int, stream_index: int, stream_count: int, num_batches: int) -> range:
    """The batches stream `stream_index` carries in one epoch, in order."""
    return range(stream_start(first_batch, stream_index, stream_count), num_batches, stream_count)


def roll_over(epoch: int, stream_index: int) -> tuple[int, int]:
    """(epoch, batch) a `continue_epochs` stream goes on with after its epoch's last batch."""
    return epoch + 1, stream_index


def tickets(request: pb.StreamRequest) -> list[pb.Ticket]:
    """One ticket per stream of `request` (a rank's view of one epoch of one split)."""
    return [
        pb.Ticket(
            session_id=request.session_id,
            split=request.split,
            epoch=request.epoch,
            rank=request.rank,
            world_size=request.world_size,
            stream_index=index,
            stream_count=request.stream_count,
            first_batch=request.first_batch,
            shm_pool=f"{request.shm_pool}{index:04x}" if request.shm_pool else "",
            continue_epochs=request.continue_epochs,
        )
        for index in range(request.stream_count)
    ]


def endpoint_locations(locations: Sequence[str], rank: int, stream_index: int, stream_count: int) -> list[str]:
    """Every replica in `locations`, starting at the one stream `stream_index` of `rank` reads
    first, so that the streams of all ranks spread evenly over the fleet."""
    if not locations:
        return []
    start = (rank * stream_count + stream_index) % len(locations)
    return [*locations[start:], *locations[:start]]
