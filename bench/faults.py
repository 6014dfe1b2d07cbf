"""Fault run: a training epoch while the server is SIGKILLed, SIGSTOPped and SIGTERMed under it.

Per transport (gRPC, and shared-memory slots on the same host): one uninterrupted epoch is the
reference; then the same epoch again while, at random batches, the server is SIGKILLed and
restarted 20 times, SIGSTOPped for longer than the client's read deadline and then continued
once, and SIGTERMed and restarted once. Reported: batches lost, repeated and differing against
the reference (target 0 each), and the longest wait for one batch (the stall a fault costs; a
fault due while the last one's restart is under way makes the loop wait, uncounted, for it).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellfeed.client import PerturbationDataModule  # noqa: E402 - before anndata, as the README advises
from bench.common import Server, write_result  # noqa: E402
from cellfeed.server.kinds.perturbation.synthetic import PerturbationSpec, write_perturbation_h5ad  # noqa: E402


class Restartable(Server):
    """A bench server that can be killed, stopped and started again on the same ports."""

    def start(self) -> None:
        self.__enter__()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)


def generate(root: Path) -> None:
    if not (root / "k562.h5ad").exists():
        spec = PerturbationSpec(cell_type="k562", n_targets=60, cells_per_target=(120, 200), n_controls=600, n_genes=2000, density=0.1, seed=7)
        write_perturbation_h5ad(root / "k562.h5ad", spec)


def digest(batch: dict) -> str:
    """What identifies a batch's content: its cells (barcodes) and their expression."""
    h = hashlib.blake2b(digest_size=16)
    for key in ("pert_cell_barcode", "ctrl_cell_barcode"):
        h.update("\0".join(batch[key].ravel().tolist()).encode())
    for key in ("pert_cell_emb", "ctrl_cell_emb"):
        h.update(batch[key].to_dense().numpy().tobytes())
    return h.hexdigest()


def datamodule(server: Server, shared_memory: bool) -> PerturbationDataModule:
    dm = PerturbationDataModule(
        files=["k562.h5ad"], group_size_S=8, batch_size=2, barcodes=True, server=server.flight_uri,
        seed=3, num_workers=2, prefetch_factor=2, shared_memory=shared_memory,
    )
    dm.setup("fit")
    return dm


def one_epoch(dm: PerturbationDataModule, on_batch=None, step_seconds: float = 0.0) -> tuple[list[str], float]:
    """The digests of one epoch's batches, and the longest wait for one; `step_seconds` plays a
    training step after each batch (the faults then land across the epoch, not after it)."""
    loader = dm.train_dataloader()
    loader.set_epoch(0)
    got, longest = [], 0.0
    it = iter(loader)
    k = 0
    while True:
        t0 = time.monotonic()
        try:
            batch = next(it)
        except StopIteration:
            break
        longest = max(longest, time.monotonic() - t0)
        got.append(digest(batch))
        if on_batch is not None:
            on_batch(k)
            time.sleep(step_seconds)
        k += 1
    loader.close()
    return got, longest


def fault_run(root: Path, shared_memory: bool, kills: int, stop_seconds: float, seed: int, step_seconds: float) -> dict:
    server = Restartable(root)
    server.start()
    try:
        reference, _ = one_epoch(datamodule(server, shared_memory))
        n = len(reference)
        rng = random.Random(seed)
        kinds = ["SIGKILL"] * kills + ["SIGSTOP", "SIGTERM"]
        rng.shuffle(kinds)
        at = sorted(rng.sample(range(5, int(n * 0.8)), len(kinds)))
        pending = list(zip(at, kinds))
        faults: collections.Counter = collections.Counter()
        busy = threading.Lock()

        def fault(k: int) -> None:
            # one fault at a time: one due while the last restart is under way waits for it (the
            # training loop pauses, as for a long validation), so every fault lands in the epoch
            if not pending or pending[0][0] > k:
                return
            busy.acquire()
            what = pending.pop(0)[1]

            def act() -> None:
                try:
                    if what == "SIGSTOP":
                        server.signal(signal.SIGSTOP)
                        time.sleep(stop_seconds)
                        server.signal(signal.SIGCONT)
                    else:
                        server.signal(signal.SIGKILL if what == "SIGKILL" else signal.SIGTERM)
                        server.proc.wait(30)
                        server.start()
                    faults[what] += 1
                finally:
                    busy.release()

            threading.Thread(target=act, daemon=True).start()

        t0 = time.monotonic()
        got, longest = one_epoch(datamodule(server, shared_memory), fault, step_seconds)
        seconds = time.monotonic() - t0
        while busy.locked():
            time.sleep(0.1)
    finally:
        server.__exit__()
    ref_counts, got_counts = collections.Counter(reference), collections.Counter(got)
    return {
        "transport": "shared memory" if shared_memory else "gRPC",
        "batches": n,
        "faults": dict(faults),
        "faults_not_reached": len(pending),
        "lost": sum((ref_counts - got_counts).values()),
        "repeated": sum((got_counts - ref_counts).values()),
        "differing": sum(1 for a, b in zip(reference, got) if a != b) + abs(len(reference) - len(got)),
        "longest_stall_s": round(longest, 2),
        "epoch_seconds": round(seconds, 1),
    }


READ_TIMEOUT_S = 4.0  # the client's read deadline here: the SIGSTOP lasts longer


def main() -> int:
    # the stopped server must outlast the client's deadlines, so that the client detects the hang
    # (not merely waits it out): its defaults are 60 s, which a 12 s stop would not reach
    os.environ.setdefault("CELLFEED_READ_TIMEOUT", str(READ_TIMEOUT_S))
    os.environ.setdefault("CELLFEED_CALL_TIMEOUT", str(READ_TIMEOUT_S))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "data" / "faults")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--stop-seconds", type=float, default=12.0, help="how long the server stays SIGSTOPped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-seconds", type=float, default=0.05, help="a training step's time after each batch")
    args = parser.parse_args()
    generate(args.data)
    results = [fault_run(args.data, shm, args.kills, args.stop_seconds, args.seed, args.step_seconds) for shm in (False, True)]
    print(f"{'transport':<14}{'batches':>8}{'faults':>34}{'lost':>6}{'repeated':>10}{'differing':>11}{'longest stall':>15}")
    for r in results:
        faults = ", ".join(f"{v} {k}" for k, v in sorted(r["faults"].items()))
        print(f"{r['transport']:<14}{r['batches']:>8}{faults:>34}{r['lost']:>6}{r['repeated']:>10}{r['differing']:>11}{r['longest_stall_s']:>13.1f} s")
    write_result("faults", {"runs": results})
    return 0 if all(r["lost"] == r["repeated"] == r["differing"] == r["faults_not_reached"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
