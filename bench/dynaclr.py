"""DynaCLR stream benchmark: anchor+positive pairs/s through MultiExperimentDataModule vs local reads.

Data: one experiment, 4 wells x 6 FOVs of 256 x 256, Z = 5, T = 24, 2 channels, NGFF 0.5 on zarr v3
(chunks 1x1x5x128x128 in one shard per image), 8 tracks per FOV: enough images (576) that a batch
touches a small share of the chunks, as in real collections, so concurrent reads rarely share
decoded chunks. Batch 64 pairs of 2 x 5 x 128 x 128.
The ceiling is the raw batched tensorstore read of the very same patches (anchors and positives
of the same epoch plan) in one local process, in a child process of its own so its peak RSS is
its own. Also: how long the vectorised lineage / anchor index takes on millions of rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Server, cpu_info, self_peak_rss_mb, write_result  # noqa: E402

BATCH, PATCH, Z_RANGE = 64, (128, 128), (0, 5)


def generate(root: Path) -> None:
    from cellfeed.server.dynaclr.synthetic import (
        PlateSpec,
        experiments_yaml,
        write_experiment,
    )

    if (root / "experiments.yml").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    spec = PlateSpec(
        name="bench",
        channel_names=["Phase3D", "GFP"],
        source_channel=["Phase3D", "GFP"],
        condition_wells={"uninfected": ["A/1", "A/2"], "infected": ["B/1", "B/2"]},
        fovs_per_well=6,
        shape_tzyx=(24, 5, 256, 256),
        chunks_zyx=(5, 128, 128),
        ngff="0.5",
        shard=True,
        tracks="grid",
        tracks_per_fov=8,
    )
    entry = write_experiment(root, spec, seed=0)
    (root / "experiments.yml").write_text(experiments_yaml([entry], relative_to=root))


def config(cache_pool_bytes: int) -> dict:
    return {
        "experiments_yaml": "experiments.yml",
        "z_range": list(Z_RANGE),
        "yx_patch_size": list(PATCH),
        "batch_size": BATCH,
        "tau_range": [0.5, 2.0],
        "cache_pool_bytes": cache_pool_bytes,
    }


def ceiling(root: Path, batches: int, cache_pool_bytes: int) -> dict:
    """Pairs/s of the bare batched reads of each batch's anchors and positives, nothing else.

    Reads are kept 1, 2 or 4 batches deep in flight (as a local loader with prefetch would);
    the best depth is the ceiling. Freed buffers are reused as the server reuses them.
    """
    from cellfeed.wire.malloc import reuse_freed_memory

    reuse_freed_memory()  # first, as the server does, before any thread takes a malloc arena
    from cellfeed.server.context import ServerContext
    from cellfeed.server.settings import Settings
    from cellfeed.server.sources.dynaclr import DynaCLRSource

    source = DynaCLRSource.open(config(cache_pool_bytes), ServerContext.from_settings(Settings(data_root=str(root))))
    sampler = source.samplers["train"]
    requests = []
    for k in range(batches):
        planned = sampler.batch(0, 0, 1, k % sampler.num_batches(1))
        anchors = source.items["train"][planned.items]
        positives, _ = source.positives.sample(anchors, np.random.default_rng([0, 0, 0, planned.global_index]))
        requests.append(source.patches(np.concatenate([anchors, positives])))
    size = source.patch_shape[1:]
    source.reader.read(requests[0], size)  # open the handles
    rates, cpu = {}, {}
    for depth in (1, 2, 4):
        pending: deque = deque()
        started, cpu0 = time.perf_counter(), time.process_time()
        for patches in requests:
            pending.append(source.reader.read_async(patches, size))
            if len(pending) >= depth:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
        rates[depth] = batches * BATCH / (time.perf_counter() - started)
        cpu[depth] = (time.process_time() - cpu0) / batches
    best = max(rates, key=rates.get)
    return {
        "pairs_per_s": rates[best],
        "depth": best,
        "by_depth": rates,
        "cpu_s_per_batch": cpu[best],
        "cpu_s_per_batch_by_depth": cpu,
        "batches": batches,
        "peak_rss_mb": self_peak_rss_mb(),
    }


def service(server: Server, batches: int, num_workers: int, cache_pool_bytes: int, shared_memory: bool) -> dict:
    """Pairs/s through MultiExperimentDataModule: server read, Arrow Flight (patches in shared-memory
    slots, or in the gRPC byte stream), client decode to torch."""
    from cellfeed.client import MultiExperimentDataModule

    dm = MultiExperimentDataModule(server=server.flight_uri, num_workers=num_workers, prefetch=2, shared_memory=shared_memory,
                                   **config(cache_pool_bytes))
    started = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - started
    loader = dm.train_dataloader()
    per_epoch = len(loader)
    got, epoch = 0, 0
    t0 = None
    while got < batches + 1:
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch["anchor"].shape == (BATCH, 2, 5, *PATCH)
            got += 1
            if t0 is None:  # the first batch pays for stream start-up
                t0, cpu0, server_cpu0 = time.perf_counter(), time.process_time(), server.cpu_seconds()
            if got == batches + 1:
                break
        epoch += 1
    seconds = time.perf_counter() - t0
    return {
        "pairs_per_s": batches * BATCH / seconds,
        "server_cpu_s_per_batch": (server.cpu_seconds() - server_cpu0) / batches,
        "client_cpu_s_per_batch": (time.process_time() - cpu0) / batches,
        "batches": batches,
        "batches_per_epoch": per_epoch,
        "session_setup_s": setup_s,
        "num_workers": num_workers,
        "transport": "shared memory" if shared_memory else "grpc",
    }


def index_build(n_tracks: int = 300_000, frames: int = 10) -> dict:
    """Seconds for lineages, the lineage grid and valid anchors over n_tracks * frames rows."""
    from cellfeed.server.dynaclr.lineage import (
        LineageGrid,
        lineage_roots,
        valid_anchors,
    )

    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(n_tracks // 100), 100)
    track = np.tile(np.arange(1, 101), n_tracks // 100)
    parent = np.where((rng.random(n_tracks) < 0.4) & (track > 1), track - 1, np.nan)
    t = np.tile(np.arange(frames), n_tracks)
    row_track = np.repeat(np.arange(n_tracks), frames)
    started = time.perf_counter()
    roots, _ = lineage_roots(group, track, parent)
    lineage = np.unique(group * 1000 + roots, return_inverse=True)[1][row_track]
    grid = LineageGrid(lineage, t)
    valid = valid_anchors(grid, np.full(len(t), 1), np.full(len(t), 4))
    return {"rows": int(len(t)), "seconds": time.perf_counter() - started, "valid_anchors": int(valid.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "data" / "dynaclr")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--cache-pool-bytes", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ceiling-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling_only:
        print(json.dumps(ceiling(args.data, args.batches, args.cache_pool_bytes)))
        return

    generate(args.data)
    child = [
        sys.executable,
        __file__,
        "--ceiling-only",
        "--data",
        str(args.data),
        "--batches",
        str(args.batches),
        "--cache-pool-bytes",
        str(args.cache_pool_bytes),
    ]
    # Ceiling and service alternate, so that a busy neighbour on the machine weighs on both alike.
    setups = [(w, True) for w in args.workers] + [(args.workers[0], False)]
    ceilings: list[dict] = []
    runs: dict[tuple[int, bool], list[dict]] = {s: [] for s in setups}
    with Server(args.data) as server:
        for _ in range(args.rounds):
            ceilings.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout))
            for workers, shared in setups:
                runs[(workers, shared)].append(service(server, args.batches, workers, args.cache_pool_bytes, shared))
        server_rss = server.peak_rss_mb()
    ceiling_rate = float(np.median([c["pairs_per_s"] for c in ceilings]))
    rate = {s: float(np.median([r["pairs_per_s"] for r in rs])) for s, rs in runs.items()}
    best = max(rate, key=rate.get)
    label = {s: f"{s[0]} stream(s), {'shared memory' if s[1] else 'gRPC'}" for s in setups}
    service_rate = {label[s]: r for s, r in rate.items()}
    result = {
        "machine": cpu_info(),
        "batch_size": BATCH,
        "patch": [2, Z_RANGE[1] - Z_RANGE[0], *PATCH],
        "cache_pool_bytes": args.cache_pool_bytes,
        "rounds": args.rounds,
        "ceiling_pairs_per_s": ceiling_rate,
        "ceiling_runs": ceilings,
        "ceiling_peak_rss_mb": max(c["peak_rss_mb"] for c in ceilings),
        "service_pairs_per_s_by_setup": service_rate,
        "service_runs": {label[k]: v for k, v in runs.items()},
        "service_pairs_per_s": rate[best],
        "service_setup": label[best],
        "ratio_to_ceiling": rate[best] / ceiling_rate,
        "grpc_pairs_per_s": rate[(args.workers[0], False)],
        "grpc_ratio_to_ceiling": rate[(args.workers[0], False)] / ceiling_rate,
        "ceiling_depth1_pairs_per_s": float(np.median([c["by_depth"]["1"] for c in ceilings])),
        "ceiling_cpu_s_per_batch": float(np.median([c["cpu_s_per_batch"] for c in ceilings])),
        "server_cpu_s_per_batch": float(np.median([r["server_cpu_s_per_batch"] for r in runs[best]])),
        "client_cpu_s_per_batch": float(np.median([r["client_cpu_s_per_batch"] for r in runs[best]])),
        "server_peak_rss_mb": server_rss,
        "client_peak_rss_mb": self_peak_rss_mb(),
        "index_build": index_build(),
    }
    path = write_result("dynaclr", result)
    print(f"DynaCLR stream, batch {BATCH} pairs of 2x5x128x128 float32, {cpu_info()}, median of {args.rounds} rounds")
    lines = [
        ("ceiling: local batched tensorstore read, best of 1/2/4 in flight", ceiling_rate),
        ("ceiling: one read at a time (VisCy's per-batch read)", result["ceiling_depth1_pairs_per_s"]),
    ]
    lines += [(f"service: MultiExperimentDataModule, {name}", r) for name, r in service_rate.items()]
    for name, r in lines:
        print(f"  {name:66s} {r:7.1f} pairs/s")
    print(
        f"  ratio to ceiling {result['ratio_to_ceiling']:.0%} ({label[best]}; over gRPC {result['grpc_ratio_to_ceiling']:.0%}); peak RSS: ceiling {result['ceiling_peak_rss_mb']:.0f} MiB, "
        f"server {server_rss:.0f} MiB, client {result['client_peak_rss_mb']:.0f} MiB"
    )
    print(
        f"  CPU s per batch: ceiling {result['ceiling_cpu_s_per_batch']:.3f}, server {result['server_cpu_s_per_batch']:.3f}, "
        f"client {result['client_cpu_s_per_batch']:.3f} (server and client share this machine's cores)"
    )
    ib = result["index_build"]
    print(f"  index build (lineages, grid, valid anchors): {ib['rows']:,} rows in {ib['seconds']:.2f} s")
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
