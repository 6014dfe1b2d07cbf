"""DynaCLR stream benchmark: anchor+positive pairs/s through MultiExperimentDataModule, against the
raw batched tensorstore read of the same patches (the ceiling) and VisCy's own DataModule, on the
same iohub-written plates in the same run.

Configurations (plates written by iohub 0.3, `open_ome_zarr(layout="hcs")` + `create_image`):
- `ngff-0.4`: NGFF 0.4 on zarr v2 (blosc), chunks 1x1x5x128x128; 24 FOVs x 24 frames x 2 channels
  x 5 Z x 256 x 256 float32, 8 tracks per FOV. Batch 64 pairs of 2 x 5 x 128 x 128 (app-dynaclr's
  3D form: `experiments_yaml`, `z_range`).
- `ngff-0.5-sharded`: the same pixels, NGFF 0.5 on zarr v3, chunks 1x1x5x128x128 in one shard per
  (t, c) image.
- `2d-mip-bag`: VisCy main's 2D form: NGFF 0.5 sharded, 8 FOVs x 12 frames x 2 channels x 8 Z x
  512 x 512, chunks 1x1x8x256x256, `z_window=1` with a 5-slice `z_extraction_window` around the
  plate's `focus_slice`, `z_reduction="mip"`, `channels_per_sample=1` (bag of channels), 256 x 256
  patches; each pair 1 x 5 x 256 x 256 read (the MIP runs on the device, after transfer).

Per configuration, ceiling, cellfeed and VisCy runs alternate for `--rounds` rounds (medians), so
that a busy neighbour on the machine weighs on all alike:
- ceiling: cellfeed's own tensorstore reader on the very same patches (anchors and positives of the
  same epoch plan), 1, 2 or 4 batches in flight, in a child process (its own peak RSS);
- cellfeed: MultiExperimentDataModule against a local `cellfeed serve` (shared-memory slots with 2
  and 4 Flight streams, gRPC only with 2);
- VisCy: `viscy.data.triplet.TripletDataModule` of VisCy 0.4.1 (PyPI; VisCy main is not on PyPI),
  `time_interval=1`, `return_negative=False`, thread workers 1 and 2, in bench/.viscy-venv (made
  by this script on first use: viscy 0.4.1 pins iohub 0.3.0a2 and a newer torch than cellfeed's
  venv, so it cannot share it), run by bench/viscy_triplet.py. Same plate, batch, channels, Z and
  patch size; its positives are the same track one frame later.
Also: how long the vectorised lineage / anchor index takes on millions of rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Server, cpu_info, self_peak_rss_mb, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent
VISCY_VENV = HERE / ".viscy-venv"
VISCY_SPEC = "viscy==0.4.1"
BATCH = 64
CHANNELS = ["Phase3D", "GFP"]

CONFIGS: dict[str, dict] = {
    "ngff-0.4": dict(version="0.4", shard=False, fovs=24, T=24, Z=5, HW=256, chunk_yx=128, tracks=8, patch=128,
                     session={"z_range": [0, 5]}, viscy_channels=CHANNELS, viscy_z=(0, 5)),
    "ngff-0.5-sharded": dict(version="0.5", shard=True, fovs=24, T=24, Z=5, HW=256, chunk_yx=128, tracks=8, patch=128,
                             session={"z_range": [0, 5]}, viscy_channels=CHANNELS, viscy_z=(0, 5)),
    "2d-mip-bag": dict(version="0.5", shard=True, fovs=8, T=12, Z=8, HW=512, chunk_yx=256, tracks=8, patch=256,
                       session={"z_window": 1, "z_extraction_window": 5, "channels_per_sample": 1},
                       client={"z_reduction": "mip"}, viscy_channels=["Phase3D"], viscy_z=(2, 7)),
}


# -- plates ----------------------------------------------------------------------------------------

def data_dir(base: Path, name: str) -> Path:
    return base / f"dynaclr-iohub-{name}"


def generate(root: Path, name: str) -> None:
    """An iohub-written plate, ultrack-style tracks CSVs and experiments.yml under `root`."""
    import pandas as pd
    from iohub.ngff import open_ome_zarr

    if (root / ".complete").exists():
        return
    cfg = CONFIGS[name]
    root.mkdir(parents=True, exist_ok=True)
    T, Z, HW, patch = cfg["T"], cfg["Z"], cfg["HW"], cfg["patch"]
    rng = np.random.default_rng(0)
    options: dict = {"chunks": (1, 1, Z, cfg["chunk_yx"], cfg["chunk_yx"])}
    if cfg["shard"]:
        ratio = HW // cfg["chunk_yx"]
        options["shards_ratio"] = (1, 1, 1, ratio, ratio)
    lo, hi = patch // 2 + 2, HW - patch // 2 - 2  # inside VisCy 0.4.1's border filter (it drops, cellfeed clamps)
    wells = ["A/1", "A/2", "B/1", "B/2"]
    started = time.perf_counter()
    with open_ome_zarr(root / "plate.zarr", layout="hcs", mode="w", channel_names=CHANNELS, version=cfg["version"]) as plate:
        for f in range(cfg["fovs"]):
            well, fov = wells[f % 4], str(f // 4)
            row, col = well.split("/")
            position = plate.create_position(row, col, fov)
            image = rng.normal(100.0, 10.0, size=(T, len(CHANNELS), Z, HW, HW)).astype(np.float32)
            position.create_image("0", image, **options)
            sample = image[:, :, :, ::8, ::8]
            position.zattrs["normalization"] = {
                c: {level: {"mean": float(sample[:, i].mean()), "std": float(sample[:, i].std()),
                            "median": float(np.median(sample[:, i])), "iqr": 13.5}
                    for level in ("dataset_statistics", "fov_statistics")}
                for i, c in enumerate(CHANNELS)
            }
            rows = []
            for track in range(1, cfg["tracks"] + 1):
                y, x = (int(v) for v in rng.integers(lo, hi, 2))
                for t in range(T):
                    rows.append((track, t, len(rows), -1, -1, 0, y, x))
                    y, x = (int(np.clip(v + rng.integers(-2, 3), lo, hi - 1)) for v in (y, x))
            folder = root / "tracks" / row / col / fov
            folder.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows, columns=["track_id", "t", "id", "parent_track_id", "parent_id", "z", "y", "x"]).to_csv(
                folder / "tracks.csv", index=False)
        plate.zattrs["focus_slice"] = {c: {"dataset_statistics": {"z_focus_mean": Z / 2}} for c in CHANNELS}
    (root / "experiments.yml").write_text(
        "experiments:\n"
        "  - name: bench\n"
        "    data_path: plate.zarr\n"
        "    tracks_path: tracks\n"
        f"    channel_names: {CHANNELS}\n"
        f"    source_channel: {CHANNELS}\n"
        "    condition_wells: {uninfected: ['A/1', 'A/2'], infected: ['B/1', 'B/2']}\n"
        "    interval_minutes: 30.0\n"
    )
    (root / ".complete").write_text(f"written in {time.perf_counter() - started:.0f} s\n")


def session_config(name: str, cache_pool_bytes: int) -> dict:
    cfg = CONFIGS[name]
    return {
        "experiments_yaml": "experiments.yml",
        "yx_patch_size": [cfg["patch"], cfg["patch"]],
        "batch_size": BATCH,
        "tau_range": [0.5, 2.0],
        "cache_pool_bytes": cache_pool_bytes,
        **cfg["session"],
    }


# -- the three readers -----------------------------------------------------------------------------

def ceiling(root: Path, name: str, batches: int, cache_pool_bytes: int) -> dict:
    """Pairs/s of the bare batched reads of each batch's anchors and positives, nothing else.

    The requests are the server's own for the same epoch plan (the anchors of each planned batch
    and their positives). Reads are kept 1, 2 or 4 batches deep in flight (as a local loader with
    prefetch would); the best depth is the ceiling. Freed buffers are reused as the server does.
    """
    from cellfeed.wire.malloc import reuse_freed_memory

    reuse_freed_memory()  # first, as the server does, before any thread takes a malloc arena
    from cellfeed.server.context import ServerContext
    from cellfeed.server.settings import Settings
    from cellfeed.server.kinds.dynaclr.source import DynaCLRSource

    source = DynaCLRSource.open(session_config(name, cache_pool_bytes), ServerContext.from_settings(Settings(data_root=str(root))))
    sampler, sel = source.sampler("train"), source.sel
    requests = []
    for k in range(batches):
        planned = sampler.batch(0, 0, 1, k % sampler.num_batches(1))
        items = source.items["train"][planned.items]
        anchors, slots = sel.item_row[items], sel.item_slot[items]
        rng = np.random.default_rng([0, 0, 0, planned.global_index])
        positives, _ = source.positives.sample(anchors, rng)
        pos_slots = sel.positive_slots(slots, positives, rng)
        requests.append(source.patches(np.concatenate([anchors, positives]), np.concatenate([slots, pos_slots])))
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
        "batches": batches,
        "patch_shape": list(source.patch_shape),
        "peak_rss_mb": self_peak_rss_mb(),
    }


def service(server: Server, name: str, batches: int, num_workers: int, cache_pool_bytes: int, shared_memory: bool) -> dict:
    """Pairs/s through MultiExperimentDataModule: server read, Arrow Flight (patches in shared-memory
    slots, or in the gRPC byte stream), client decode to torch."""
    from cellfeed.client import MultiExperimentDataModule

    cfg = CONFIGS[name]
    dm = MultiExperimentDataModule(server=server.flight_uri, num_workers=num_workers, prefetch_factor=2, shared_memory=shared_memory,
                                   final_yx_patch_size=(cfg["patch"], cfg["patch"]), **session_config(name, cache_pool_bytes),
                                   **cfg.get("client", {}))
    started = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - started
    loader = dm.train_dataloader()
    shape = tuple(dm.info["patch_shape"])
    got, epoch, t0 = 0, 0, None
    while got < batches + 1:
        loader.set_epoch(epoch)
        for batch in loader:
            assert tuple(batch["anchor"].shape) == (BATCH, *shape)
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
        "batches_per_epoch": len(loader),
        "session_setup_s": setup_s,
        "num_workers": num_workers,
        "transport": "shared memory" if shared_memory else "grpc",
    }


def viscy_python() -> Path | str:
    """bench/.viscy-venv/bin/python, made on first use; or the reason it could not be."""
    python = VISCY_VENV / "bin" / "python"
    marker = VISCY_VENV / ".installed"
    if marker.exists():
        return python
    print(f"  setting up {VISCY_VENV} ({VISCY_SPEC}; once)", flush=True)
    try:
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(VISCY_VENV)], check=True, capture_output=True, text=True)
        (VISCY_VENV / ".gitignore").write_text("*\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", VISCY_SPEC], check=True, capture_output=True, text=True,
                       timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return f"could not install {VISCY_SPEC} into {VISCY_VENV}: {detail.strip().splitlines()[-1] if detail.strip() else exc}"
    marker.write_text(VISCY_SPEC + "\n")
    return python


def viscy(python: Path, root: Path, name: str, batches: int, workers: int) -> dict:
    cfg = CONFIGS[name]
    fovs = cfg["fovs"]
    cmd = [str(python), str(HERE / "viscy_triplet.py"), str(root / "plate.zarr"), str(root / "tracks"),
           "--channels", *cfg["viscy_channels"], "--z", *(str(z) for z in cfg["viscy_z"]), "--patch", str(cfg["patch"]),
           "--batch", str(BATCH), "--batches", str(batches), "--workers", str(workers),
           "--split-ratio", str((fovs - 1) / fovs + 1e-6)]  # every FOV but one trains (VisCy needs a val FOV)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELLFEED_", "PYTHON"))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def index_build(n_tracks: int = 300_000, frames: int = 10) -> dict:
    """Seconds for lineages, the lineage grid and valid anchors over n_tracks * frames rows."""
    from cellfeed.server.kinds.dynaclr.lineage import (
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


# -- one configuration -----------------------------------------------------------------------------

def run_config(name: str, args, python: Path | str) -> dict:
    root = data_dir(args.data, name)
    generate(root, name)
    child = [sys.executable, __file__, "--ceiling-only", name, "--data", str(args.data), "--batches", str(args.batches),
             "--cache-pool-bytes", str(args.cache_pool_bytes)]
    setups = [(w, True) for w in args.workers] + [(args.workers[0], False)]
    ceilings: list[dict] = []
    runs: dict[tuple[int, bool], list[dict]] = {s: [] for s in setups}
    viscy_runs: dict[int, list[dict]] = {w: [] for w in args.viscy_workers}
    with Server(root) as server:
        for _ in range(args.rounds):
            ceilings.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout))
            for workers, shared in setups:
                runs[(workers, shared)].append(service(server, name, args.batches, workers, args.cache_pool_bytes, shared))
            if isinstance(python, Path):
                for w in args.viscy_workers:
                    viscy_runs[w].append(viscy(python, root, name, args.batches, w))
        server_rss = server.peak_rss_mb()
    label = {s: f"{s[0]} streams, {'shared memory' if s[1] else 'gRPC'}" for s in setups}
    rate = {s: float(np.median([r["pairs_per_s"] for r in rs])) for s, rs in runs.items()}
    best = max(rate, key=rate.get)
    ceiling_rate = float(np.median([c["pairs_per_s"] for c in ceilings]))
    out = {
        "plate": {k: v for k, v in CONFIGS[name].items() if k not in ("session", "client")},
        "session_config": session_config(name, args.cache_pool_bytes) | CONFIGS[name].get("client", {}),
        "patch_shape": ceilings[0]["patch_shape"],
        "plate_written": (root / ".complete").read_text().strip(),
        "ceiling_pairs_per_s": ceiling_rate,
        "ceiling_depth1_pairs_per_s": float(np.median([c["by_depth"]["1"] for c in ceilings])),
        "ceiling_runs": ceilings,
        "ceiling_peak_rss_mb": max(c["peak_rss_mb"] for c in ceilings),
        "cellfeed_pairs_per_s_by_setup": {label[s]: r for s, r in rate.items()},
        "cellfeed_runs": {label[s]: v for s, v in runs.items()},
        "cellfeed_pairs_per_s": rate[best],
        "cellfeed_setup": label[best],
        "ratio_to_ceiling": rate[best] / ceiling_rate,
        "grpc_pairs_per_s": rate[(args.workers[0], False)],
        "server_cpu_s_per_batch": float(np.median([r["server_cpu_s_per_batch"] for r in runs[best]])),
        "client_cpu_s_per_batch": float(np.median([r["client_cpu_s_per_batch"] for r in runs[best]])),
        "server_peak_rss_mb": server_rss,
    }
    if isinstance(python, Path):
        ok = {w: [r for r in rs if "error" not in r] for w, rs in viscy_runs.items()}
        errors = [r["error"] for rs in viscy_runs.values() for r in rs if "error" in r]
        vrate = {w: float(np.median([r["pairs_per_s"] for r in rs])) for w, rs in ok.items() if rs}
        out["viscy_runs"] = {str(w): rs for w, rs in viscy_runs.items()}
        if vrate:
            vbest = max(vrate, key=vrate.get)
            out["viscy_pairs_per_s_by_workers"] = {str(w): r for w, r in vrate.items()}
            out["viscy_pairs_per_s"] = vrate[vbest]
            out["viscy_workers"] = vbest
            out["viscy_anchors"] = ok[vbest][0]["anchors"]
            out["viscy_batch_shape"] = ok[vbest][0]["batch_shape"]
            out["viscy_cpu_s_per_batch"] = float(np.median([r["cpu_s_per_batch"] for r in ok[vbest]]))
            out["viscy_peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok[vbest])
            out["speedup_vs_viscy"] = rate[best] / vrate[vbest]
        if errors:
            out["viscy_errors"] = errors
    else:
        out["viscy_error"] = python
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--viscy-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-viscy", action="store_true", help="skip VisCy's DataModule")
    parser.add_argument("--cache-pool-bytes", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ceiling-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling_only:
        print(json.dumps(ceiling(data_dir(args.data, args.ceiling_only), args.ceiling_only, args.batches, args.cache_pool_bytes)))
        return

    python = "skipped (--no-viscy)" if args.no_viscy else viscy_python()
    configs = {name: run_config(name, args, python) for name in args.configs}
    ratios = [c["ratio_to_ceiling"] for c in configs.values()]
    speedups = [c["speedup_vs_viscy"] for c in configs.values() if "speedup_vs_viscy" in c]
    result = {
        "machine": cpu_info(),
        "batch_size": BATCH,
        "rounds": args.rounds,
        "batches_per_run": args.batches,
        "cache_pool_bytes": args.cache_pool_bytes,
        "viscy": VISCY_SPEC + " TripletDataModule (time_interval=1, return_negative=False), in " + str(VISCY_VENV.relative_to(HERE.parent)),
        "configs": configs,
        "min_ratio_to_ceiling": min(ratios),
        "min_speedup_vs_viscy": min(speedups) if speedups else None,
        "targets": {"ratio_to_ceiling": 0.8, "speedup_vs_viscy": 3.0},
        "index_build": index_build(),
        "client_peak_rss_mb": self_peak_rss_mb(),
    }
    path = write_result("dynaclr", result)

    print(f"DynaCLR stream, batch {BATCH} pairs, {cpu_info()}, median of {args.rounds} rounds of {args.batches} batches (pairs/s)")
    head = f"  {'config':18s} {'patch CxZxYxX':>15s} {'ceiling':>8s} {'1-deep':>8s} {'cellfeed':>9s} {'gRPC':>7s} {'VisCy':>7s} {'/ceil':>6s} {'x VisCy':>8s}"
    print(head)
    for name, c in configs.items():
        shape = "x".join(str(v) for v in c["patch_shape"])
        vis = c.get("viscy_pairs_per_s")
        print(f"  {name:18s} {shape:>15s} {c['ceiling_pairs_per_s']:8.1f} {c['ceiling_depth1_pairs_per_s']:8.1f} "
              f"{c['cellfeed_pairs_per_s']:9.1f} {c['grpc_pairs_per_s']:7.1f} {vis if vis else float('nan'):7.1f} "
              f"{c['ratio_to_ceiling']:6.0%} {c.get('speedup_vs_viscy', float('nan')):7.1f}x")
    for name, c in configs.items():
        print(f"  {name}: cellfeed best {c['cellfeed_setup']}; VisCy best with {c.get('viscy_workers', '-')} thread worker(s); "
              f"CPU s/batch ceiling {np.median([r['cpu_s_per_batch'] for r in c['ceiling_runs']]):.3f}, "
              f"server {c['server_cpu_s_per_batch']:.3f}, client {c['client_cpu_s_per_batch']:.3f}, "
              f"VisCy {c.get('viscy_cpu_s_per_batch', float('nan')):.3f}; peak RSS ceiling {c['ceiling_peak_rss_mb']:.0f} MiB, "
              f"server {c['server_peak_rss_mb']:.0f} MiB, VisCy {c.get('viscy_peak_rss_mb', float('nan')):.0f} MiB")
        for err in c.get("viscy_errors", []) + ([c["viscy_error"]] if "viscy_error" in c else []):
            print(f"  {name}: VisCy: {err}")
    print(f"  targets: >= 80% of the ceiling (min {result['min_ratio_to_ceiling']:.0%}), >= 3x VisCy "
          f"(min {result['min_speedup_vs_viscy'] if result['min_speedup_vs_viscy'] is None else round(result['min_speedup_vs_viscy'], 2)}x)")
    ib = result["index_build"]
    print(f"  index build (lineages, grid, valid anchors): {ib['rows']:,} rows in {ib['seconds']:.2f} s")
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
