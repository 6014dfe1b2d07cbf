"""Soak run: many clients and many sessions against one server, its memory sampled each second.

1. One client alone streams 3 epochs (the single-client rate), after an untimed warm-up epoch.
2. 8 clients at once, each 3 epochs, mixing configs (two files, two group sizes, seeds): every
   client must complete; aggregate throughput is reported against the single client's.
3. Twice, 50 sessions opened one after another (distinct seeds), each read for a few batches,
   with the server's idle time set short so that they are closed as they go idle.
The server's RSS is sampled every second throughout. Targets: after the 8 clients' first epoch,
RSS stays within 10% of its level then; after each round of sessions has gone idle and been
closed, RSS is under the stated bound (the level after phase 2, plus the part of the block
cache's budget, --cache-bytes, not yet filled then, plus 10%), and the second round leaves RSS
within 10% of the first (closed sessions leave nothing behind).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellfeed.client import PerturbationDataModule  # noqa: E402 - before anndata, as the README advises
from bench.common import Server, write_result  # noqa: E402
from cellfeed.server.kinds.perturbation.synthetic import PerturbationSpec, write_perturbation_h5ad  # noqa: E402

IDLE_S = 3
CACHE_MB = 512  # the server's block cache budget in this run (--cache-bytes)


def generate(root: Path) -> None:
    for i, name in enumerate(("k562", "rpe1")):
        if not (root / f"{name}.h5ad").exists():
            # ~100,000 cells each: the 8 clients' 3 epochs take a minute or more, not seconds
            spec = PerturbationSpec(cell_type=name, n_targets=250, cells_per_target=(300, 500), n_controls=4000, n_genes=2000, density=0.1, seed=i)
            write_perturbation_h5ad(root / f"{name}.h5ad", spec)


def cache_mb(server: Server) -> float:
    """The block cache's bytes, from the server's /metrics (the cache is bounded by --cache-bytes)."""
    for line in httpx.get(f"{server.http_url}/metrics").text.splitlines():
        if line.startswith("cellfeed_block_cache_bytes "):
            return float(line.split()[1]) / 2**20
    return float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(threading.Thread):
    """The server's RSS once a second, with what phase the run was in."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.phase = pid, [], "start"
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.samples.append((time.monotonic(), self.phase, rss_mb(self.pid)))


def client(server: Server, i: int, epochs: int, marks: list, errors: list, cells: list) -> None:
    try:
        dm = PerturbationDataModule(
            files=["k562.h5ad" if i % 2 == 0 else "rpe1.h5ad"], group_size_S=(8, 16)[i % 4 // 2], batch_size=16,
            server=server.flight_uri, seed=i % 3, num_workers=2, shared_memory=False,
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        for e in range(epochs):
            loader.set_epoch(e)
            for batch in loader:
                cells.append(batch["pert_cell_emb"].shape[0] * batch["pert_cell_emb"].shape[1])
            marks.append((i, e, time.monotonic()))
        dm.teardown("fit")
    except BaseException as exc:  # noqa: BLE001 - reported
        errors.append(f"client {i}: {type(exc).__name__}: {exc}")


def run_clients(server: Server, n: int, epochs: int) -> dict:
    marks, errors, cells = [], [], []
    threads = [threading.Thread(target=client, args=(server, i, epochs, marks, errors, cells)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    return {"clients": n, "completed": len({i for i, e, _ in marks if e == epochs - 1}), "errors": errors,
            "cells_per_s": sum(cells) / seconds, "seconds": seconds, "marks": marks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "data" / "soak-100k")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--session-rounds", type=int, default=2, help="rounds of --sessions sessions")
    args = parser.parse_args()
    generate(args.data)
    with Server(args.data, session_idle_seconds=IDLE_S, cache_bytes=CACHE_MB << 20) as server:
        sampler = Sampler(server.proc.pid)
        sampler.start()
        sampler.phase = "warm-up"
        run_clients(server, 1, 1)  # file opened, pages cached, session planned: not timed
        sampler.phase = "one client"
        alone = run_clients(server, 1, args.epochs)
        sampler.phase = f"{args.clients} clients"
        many = run_clients(server, args.clients, args.epochs)
        after_many, cache_after_many = rss_mb(server.proc.pid), cache_mb(server)
        rounds = []
        for r in range(args.session_rounds):  # later rounds show whether closed sessions leave memory behind
            sampler.phase = f"{args.sessions} sessions, round {r + 1}"
            for s in range(args.sessions):
                dm = PerturbationDataModule(files=["k562.h5ad"], group_size_S=8, batch_size=16, server=server.flight_uri,
                                            seed=100 + r * args.sessions + s, num_workers=1, shared_memory=False)
                dm.setup("fit")
                for k, _ in zip(range(3), dm.train_dataloader()):
                    pass
                dm.teardown("fit")
            listed = len(httpx.get(f"{server.http_url}/v1/sessions").json())
            sampler.phase = f"idle, round {r + 1}"
            time.sleep(IDLE_S + 1)
            PerturbationDataModule(files=["rpe1.h5ad"], group_size_S=8, batch_size=16, server=server.flight_uri, seed=999, shared_memory=False).setup("fit")  # sweeps
            left = len(httpx.get(f"{server.http_url}/v1/sessions").json())
            time.sleep(2)
            rounds.append({"listed": listed, "left": left, "rss_mb": rss_mb(server.proc.pid), "block_cache_mb": cache_mb(server)})
        sampler.stop.set()
        sampler.join()
    t0 = sampler.samples[0][0] if sampler.samples else 0.0
    samples = [(round(t - t0, 1), phase, round(r, 1)) for t, phase, r in sampler.samples]
    # from the end of the first epoch of the first of the 8 clients to finish one
    first_epoch = min((t for _, e, t in many["marks"] if e == 0), default=float("inf"))
    steady = [r for t, phase, r in sampler.samples if phase == f"{args.clients} clients" and t >= first_epoch]
    base = steady[0] if steady else after_many
    drift = (max(steady) - base) / base if steady else 0.0
    # the stated bound: the level after the clients plus what the block cache may still fill
    # (its budget, --cache-bytes, less what it held then), plus 10%
    bound = (after_many + max(0.0, CACHE_MB - cache_after_many)) * 1.1
    result = {
        "one_client_cells_per_s": round(alone["cells_per_s"]),
        "clients": args.clients,
        "completed": many["completed"],
        "errors": many["errors"] + alone["errors"],
        "aggregate_cells_per_s": round(many["cells_per_s"]),
        "aggregate_vs_one": round(many["cells_per_s"] / alone["cells_per_s"], 2),
        "rss_after_first_epoch_mb": round(base, 1),
        "rss_max_after_first_epoch_mb": round(max(steady) if steady else base, 1),
        "rss_drift_after_first_epoch": round(drift, 3),
        "sessions_opened_per_round": args.sessions,
        "session_rounds": rounds,
        "rss_after_clients_mb": round(after_many, 1),
        "block_cache_after_clients_mb": round(cache_after_many, 1),
        "cache_budget_mb": CACHE_MB,
        "rss_bound_mb": round(bound, 1),
        "rss_last_round_vs_first": round(rounds[-1]["rss_mb"] / rounds[0]["rss_mb"], 3),
        "rss_samples": samples,
    }
    print(f"1 client: {result['one_client_cells_per_s']:,} cells/s; {args.clients} clients: {many['completed']}/{args.clients} completed, "
          f"{result['aggregate_cells_per_s']:,} cells/s together ({result['aggregate_vs_one']}x one)")
    print(f"server RSS after the first epoch {base:.0f} MB, at most {result['rss_max_after_first_epoch_mb']:.0f} MB after it "
          f"(drift {drift:+.1%}, target within 10%)")
    for r, rd in enumerate(rounds):
        print(f"round {r + 1}: {args.sessions} sessions opened one after another, {rd['listed']} listed after them, {rd['left']} left once idle; "
              f"RSS {rd['rss_mb']:.0f} MB, block cache {rd['block_cache_mb']:.0f} MB")
    print(f"RSS bound {bound:.0f} MB (after the clients {after_many:.0f} MB + {max(0.0, CACHE_MB - cache_after_many):.0f} MB of the {CACHE_MB} MB cache budget unfilled then, + 10%); "
          f"last round / first: {result['rss_last_round_vs_first']:.2f} (flat: within 1.10)")
    if result["errors"]:
        print("errors:", *result["errors"], sep="\n  ")
    write_result("soak", result)
    ok = (not result["errors"] and many["completed"] == args.clients and drift <= 0.10
          and all(rd["rss_mb"] <= bound for rd in rounds) and result["rss_last_round_vs_first"] <= 1.10)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
