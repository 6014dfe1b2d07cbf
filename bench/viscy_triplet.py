"""VisCy 0.4.1's own DataModule on a bench plate: run by bench/dynaclr.py in bench/.viscy-venv.

`viscy.data.triplet.TripletDataModule` (VisCy 0.4.1, the release on PyPI: VisCy main's
MultiExperimentDataModule is not installable from PyPI) reads one HCS plate and per-FOV tracking
CSVs, and with `time_interval=1`, `return_negative=False` yields anchor+positive pairs (the
positive is the same track one frame later) through MONAI's `ThreadDataLoader`, reading each batch
with one stacked tensorstore read (`TripletDataset.__getitems__`). This script times its train
loader, batch by batch as a training loop takes them, and prints one JSON line.

Usage: python viscy_triplet.py PLATE TRACKS --channels A B --z 0 5 --patch 128 --batch 64
       --batches 40 --workers 1 --split-ratio 0.96
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("plate")
    parser.add_argument("tracks")
    parser.add_argument("--channels", nargs="+", required=True)
    parser.add_argument("--z", type=int, nargs=2, required=True)
    parser.add_argument("--patch", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--batches", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--split-ratio", type=float, default=0.8)
    args = parser.parse_args()

    import viscy
    from lightning.pytorch import seed_everything
    from viscy.data.triplet import TripletDataModule

    warnings.filterwarnings("ignore")
    seed_everything(0, verbose=False)
    dm = TripletDataModule(
        data_path=args.plate,
        tracks_path=args.tracks,
        source_channel=list(args.channels),
        z_range=tuple(args.z),
        initial_yx_patch_size=(args.patch, args.patch),
        final_yx_patch_size=(args.patch, args.patch),
        split_ratio=args.split_ratio,  # VisCy needs at least one validation FOV
        batch_size=args.batch,
        num_workers=args.workers,
        time_interval=1,
        return_negative=False,
    )
    started = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - started
    shape = None
    got, t0 = 0, None
    while got < args.batches + 1:
        for batch in dm.train_dataloader():
            shape = tuple(batch["anchor"].shape)
            assert batch["positive"].shape == batch["anchor"].shape
            got += 1
            if t0 is None:  # the first batch pays for the loader's start-up
                t0, cpu0 = time.perf_counter(), time.process_time()
            if got == args.batches + 1:
                break
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "viscy_version": viscy.__version__ if hasattr(viscy, "__version__") else "0.4.1",
        "pairs_per_s": args.batches * args.batch / seconds,
        "cpu_s_per_batch": (time.process_time() - cpu0) / args.batches,
        "batches": args.batches,
        "anchors": len(dm.train_dataset),
        "batch_shape": shape,
        "num_workers": args.workers,
        "setup_s": setup_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
