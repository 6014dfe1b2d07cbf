"""Evaluation loaders read epoch 0 on every pass, whatever epoch the trainer is in, as
docs/protocol.md tells a raw client to ask; another epoch number is another (equally complete)
draw of the items, so a raw client that sent the trainer's epoch would see other batches."""

from __future__ import annotations

import pyarrow.flight as flight

from cellfeed.wire import cellfeed_pb2 as pb
from tests.helpers import datamodule

S = 3
FEWSHOT = '[datasets]\nsynth = "{k562,rpe1}.h5ad"\n[fewshot."synth.rpe1"]\nval = ["G000", "G001"]\ntest = ["G002", "G003"]\n'


def raw_pass(server, session_id: str, split: str, epoch: int) -> list[list[list[str]]]:
    """One rank's pass over `split` at `epoch` with plain pyarrow.flight: items' barcodes per batch."""
    client = flight.FlightClient(server.flight_uri)
    try:
        request = pb.StreamRequest(session_id=session_id, split=split, epoch=epoch, rank=0, world_size=1, stream_count=1)
        info = client.get_flight_info(flight.FlightDescriptor.for_command(request.SerializeToString()))
        out = []
        for chunk in client.do_get(info.endpoints[0].ticket):
            names = chunk.data.column("pert_barcode").to_pylist()
            out.append([names[i : i + S] for i in range(0, len(names), S)])
        return out
    finally:
        client.close()



def test_eval_passes_read_epoch_0_whatever_the_trainer_epoch(pert_server, pert_root):
    toml = pert_root.parent / "eval_epoch.toml"
    toml.write_text(FEWSHOT)
    dm = datamodule(pert_server, files=None, config_path=str(toml), group_size_S=S, batch_size=4, num_workers=2)
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        first = [b["pert_cell_barcode"].tolist() for b in loader]
        loader.set_epoch(5)  # what Lightning calls before each epoch's passes
        again = [b["pert_cell_barcode"].tolist() for b in loader]
        assert first == again, split
        assert raw_pass(pert_server, dm.session.session_id, split, epoch=0) == first, split
        assert raw_pass(pert_server, dm.session.session_id, split, epoch=5) != first, split
