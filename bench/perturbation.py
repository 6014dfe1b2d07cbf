"""Perturbation stream benchmark: perturbed cells/s through PerturbationDataModule vs raw h5py.

Dataset (as in the reference measurements): 2 files x 25,000 cells x 2,000 genes, ~10% non-zeros,
50 targets x 450 cells + 2,500 controls per file, 2 batches, 128-d embeddings (10 missing);
batch 64 x S 32. The ceiling is the raw contiguous h5py read of as many perturbed and control
cells as one epoch delivers, in this process, with nothing else running.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Server, self_peak_rss_mb, write_result  # noqa: E402
from cellfeed.server.perturbation.synthetic import PerturbationSpec, write_embeddings, write_perturbation_h5ad  # noqa: E402


def generate(root: Path, cells_per_target: int, n_genes: int) -> None:
    if (root / "rpe1.h5ad").exists():
        return
    for i, name in enumerate(("k562", "rpe1")):
        spec = PerturbationSpec(cell_type=name, n_targets=50, cells_per_target=(cells_per_target, cells_per_target),
                                n_controls=cells_per_target * 50 // 9, n_genes=n_genes, density=0.1, n_batches=2, seed=i)
        write_perturbation_h5ad(root / f"{name}.h5ad", spec)
    write_embeddings(root / "emb.pt", [f"G{i:03d}" for i in range(40)], dim=128)


def raw_h5py_rate(paths: list[Path], block: int = 2048) -> tuple[float, int]:
    """Contiguous CSR reads of every row (indptr, indices, data slices): rows per second."""
    rows = 0
    t0 = time.perf_counter()
    for path in paths:
        with h5py.File(path, "r") as f:
            indptr = f["X/indptr"][...]
            n = len(indptr) - 1
            for s in range(0, n, block):
                e = min(n, s + block)
                lo, hi = indptr[s], indptr[e]
                f["X/indices"][lo:hi]
                f["X/data"][lo:hi]
                rows += e - s
    return rows / (time.perf_counter() - t0), rows


def run_client(server_uri: str, epochs: int, num_workers: int, server: Server) -> dict:
    from cellfeed.client import PerturbationDataModule

    dm = PerturbationDataModule(files=["k562.h5ad", "rpe1.h5ad"], pert_embedding_file="emb.pt", batch_size=64,
                                group_size_S=32, num_workers=num_workers, server=server_uri)
    t_setup = time.perf_counter()
    dm.setup("fit")
    loader = dm.train_dataloader()
    setup_s = time.perf_counter() - t_setup
    first = None
    t0 = time.perf_counter()
    loader.set_epoch(0)
    cold_cells = 0
    for batch in loader:  # epoch 0: cold (reads from disk, opens streams); time to first batch
        if first is None:
            first = time.perf_counter() - t0
        cold_cells += batch["pert_cell_emb"].shape[0] * batch["pert_cell_emb"].shape[1]
    cold_s = time.perf_counter() - t0
    cells = 0
    t0 = time.perf_counter()
    cpu0, server_cpu0 = time.process_time(), server.cpu_seconds()
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        for batch in loader:
            cells += batch["pert_cell_emb"].shape[0] * batch["pert_cell_emb"].shape[1]
    elapsed = time.perf_counter() - t0
    batches = cells / (batch["pert_cell_emb"].shape[0] * batch["pert_cell_emb"].shape[1])
    cpu_ms, server_cpu_ms = (time.process_time() - cpu0) / batches * 1e3, (server.cpu_seconds() - server_cpu0) / batches * 1e3
    # The same epochs as Arrow record batches, before conversion to torch: what the service
    # itself delivers, apart from the COO tensors the schema asks the client to build.
    decode, loader.decode = loader.decode, lambda rb: rb
    arrow_cells = 0
    t1 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        arrow_cells += sum(rb.num_rows for rb in loader)
    arrow_elapsed = time.perf_counter() - t1
    loader.decode = decode
    return {"perturbed_cells": cells, "seconds": elapsed, "cells_per_s": cells / elapsed,
            "client_cpu_ms_per_batch": cpu_ms, "server_cpu_ms_per_batch": server_cpu_ms,
            "arrow_cells_per_s": arrow_cells / arrow_elapsed,
            "cold_epoch_cells_per_s": cold_cells / cold_s, "time_to_first_batch_s": first, "setup_s": setup_s,
            "batches_per_epoch": len(loader)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="bench/data/perturbation")
    parser.add_argument("--cells-per-target", type=int, default=450)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10, help="timed epochs after the cold first one")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    generate(root, args.cells_per_target, args.genes)

    files = [root / "k562.h5ad", root / "rpe1.h5ad"]
    raw_h5py_rate(files)  # warm the page cache, as the server's reads are warm after its first epoch
    raw_rate, raw_rows = max(raw_h5py_rate(files) for _ in range(3))
    with Server(root) as server:
        client = run_client(server.flight_uri, args.epochs, args.num_workers, server)
        server_rss = server.peak_rss_mb()
    # Every perturbed cell is delivered with one control cell: the ceiling reads two rows per cell.
    ceiling = raw_rate / 2
    result = {
        "dataset": f"2 files x {raw_rows // 2} cells x {args.genes} genes, ~10% non-zeros; batch 64 x S 32",
        "cellfeed_perturbed_cells_per_s": round(client["cells_per_s"]),
        "cold_first_epoch_cells_per_s": round(client["cold_epoch_cells_per_s"]),
        "time_to_first_batch_s": round(client["time_to_first_batch_s"], 3),
        "session_setup_s": round(client["setup_s"], 3),
        "arrow_stream_cells_per_s": round(client["arrow_cells_per_s"]),
        "arrow_stream_ratio_to_ceiling": round(client["arrow_cells_per_s"] / ceiling, 3),
        "raw_h5py_rows_per_s": round(raw_rate),
        "ceiling_perturbed_cells_per_s": round(ceiling),
        "ratio_to_ceiling": round(client["cells_per_s"] / ceiling, 3),
        "server_peak_rss_mb": round(server_rss, 1),
        "client_peak_rss_mb": round(self_peak_rss_mb(), 1),
        "server_cpu_ms_per_batch": round(client["server_cpu_ms_per_batch"], 2),
        "client_cpu_ms_per_batch": round(client["client_cpu_ms_per_batch"], 2),
        "epochs": args.epochs,
        "num_workers": args.num_workers,
        "targets": {"cells_per_s": 200_000, "ratio_to_ceiling": 0.5},
    }
    print("perturbation stream")
    for key, value in result.items():
        print(f"  {key:32s} {value}")
    write_result("perturbation", result)


if __name__ == "__main__":
    main()
