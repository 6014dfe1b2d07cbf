"""Perturbation stream benchmark: perturbed cells/s through PerturbationDataModule vs raw h5py.

Dataset (as in the reference measurements): 2 files x 25,000 cells x 2,000 genes, ~10% non-zeros,
50 targets x 450 cells + 2,500 controls per file, 2 batches, 128-d embeddings (10 missing);
batch 64 x S 32. The ceiling is the raw contiguous h5py read of the same files' rows (a perturbed
and a control row per perturbed cell), in this process, with nothing else running. Ceiling and
stream are measured in interleaved rounds (the machine's speed drifts), each over about the same
time and as a rate over that whole time; each round gives one ratio. The best single pass of the
ceiling is reported too. The loader goes on from epoch to epoch as a training loop's does; the
rounds follow a cold first epoch and two warm-up epochs, whose rates are reported on their own.

Then a STATE-style run in cell-load's format (`cell_load_run`): the same cells and X, with
cell-load's obs columns (`gene`, `cell_type`, `gem_group`) and a 2,000-wide dense `obsm["X_hvg"]`,
read through cellfeed's cell-load drop-in and through cell-load 0.10.4 itself, side by side in
this process on the same files and TOML: `embed_key="X_hvg"` (rows of the obsm matrix), and
`output_space="gene"` on X rows; cell-load's defaults otherwise (control cells as items, random
controls), batch 16 x sentence 128. cell-load is timed in each of its modes (num_workers 0, 2, 4;
use_consecutive_loading off and on) after its first batch, and its fastest is the reference.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# cellfeed.client before anndata (below), as the README advises: threads that anndata's imports
# start would otherwise take malloc arenas of their own, which the stream threads may then share
from cellfeed.client import PerturbationDataModule  # noqa: E402
from bench.common import Server, self_peak_rss_mb, write_result  # noqa: E402
from cellfeed.server.kinds.perturbation.synthetic import PerturbationSpec, write_embeddings, write_perturbation_h5ad  # noqa: E402


def generate(root: Path, cells_per_target: int, n_genes: int) -> None:
    if (root / "rpe1.h5ad").exists():
        return
    for i, name in enumerate(("k562", "rpe1")):
        spec = PerturbationSpec(cell_type=name, n_targets=50, cells_per_target=(cells_per_target, cells_per_target),
                                n_controls=cells_per_target * 50 // 9, n_genes=n_genes, density=0.1, n_batches=2, seed=i)
        write_perturbation_h5ad(root / f"{name}.h5ad", spec)
    write_embeddings(root / "emb.pt", [f"G{i:03d}" for i in range(40)], dim=128)


def raw_h5py_rate(paths: list[Path], min_seconds: float = 0.0, block: int = 2048) -> tuple[float, float]:
    """Contiguous CSR reads of every row (indptr, indices, data slices; the datasets opened once
    per file), pass after pass until `min_seconds` have gone: (rows per second over all passes,
    rows per second of the best pass)."""
    rows = 0
    best = 0.0
    t0 = time.perf_counter()
    while True:
        t_pass, pass_rows = time.perf_counter(), 0
        for path in paths:
            with h5py.File(path, "r") as f:
                indptr, indices, data = f["X/indptr"][...], f["X/indices"], f["X/data"]
                n = len(indptr) - 1
                for s in range(0, n, block):
                    e = min(n, s + block)
                    lo, hi = indptr[s], indptr[e]
                    indices[lo:hi]
                    data[lo:hi]
                    pass_rows += e - s
        now = time.perf_counter()
        rows += pass_rows
        best = max(best, pass_rows / (now - t_pass))
        if now - t0 >= min_seconds:
            return rows / (now - t0), best


def timed_epochs(loader, epochs: range, server: Server, skip: int = 0) -> dict:
    """Perturbed cells/s over these epochs, with the CPU both processes spent per batch; the
    first `skip` batches are taken before the clock starts (made while the loop paused)."""

    def every_batch() -> Iterator:
        for epoch in epochs:
            loader.set_epoch(epoch)
            yield from loader

    batches_of_epochs = every_batch()
    for _ in itertools.islice(batches_of_epochs, skip):
        pass
    cells = batches = 0
    t0, cpu0, server_cpu0 = time.perf_counter(), time.process_time(), server.cpu_seconds()
    for batch in batches_of_epochs:
        cells += _cells(batch)
        batches += 1
    elapsed = time.perf_counter() - t0
    return {"cells": cells, "seconds": elapsed, "cells_per_s": cells / elapsed,
            "client_cpu_ms": (time.process_time() - cpu0) / batches * 1e3,
            "server_cpu_ms": (server.cpu_seconds() - server_cpu0) / batches * 1e3}


def _cells(batch) -> int:
    if isinstance(batch, dict):
        return batch["pert_cell_emb"].shape[0] * batch["pert_cell_emb"].shape[1]
    return batch.num_rows  # an Arrow record batch: one row per perturbed cell


WARMUP_EPOCHS = 2


def run(server: Server, files: list[Path], rounds: int, epochs_per_round: int, num_workers: int) -> dict:
    """A cold first epoch, WARMUP_EPOCHS warm-up epochs, then `rounds` rounds of the raw h5py
    ceiling and converted epochs, one after the other, so that each ratio compares like with like
    on this shared machine (its speed drifts over a run); then the same number of epochs as Arrow
    record batches. The ceiling of a
    round reads for as long as the round's last epochs took (at least 0.2 s)."""

    def datamodule() -> PerturbationDataModule:
        return PerturbationDataModule(files=["k562.h5ad", "rpe1.h5ad"], pert_embedding_file="emb.pt", batch_size=64,
                                      group_size_S=32, num_workers=num_workers, server=server.flight_uri)

    dm = datamodule()
    t_setup = time.perf_counter()
    dm.setup("fit")
    loader = dm.train_dataloader()
    setup_s = time.perf_counter() - t_setup
    first = None
    cold_cells = 0
    t0 = time.perf_counter()
    loader.set_epoch(0)
    for batch in loader:  # epoch 0: cold (reads from disk, opens streams); time to first batch
        if first is None:
            first = time.perf_counter() - t0
        cold_cells += _cells(batch)
    cold_s = time.perf_counter() - t0
    # warm-up, untimed as such: the client's heap grows to its working size (page faults per
    # batch fall from ~50 to 0 over the first epochs after the cold one)
    warmup = timed_epochs(loader, range(1, 1 + WARMUP_EPOCHS), server)
    per_round = []
    epoch = 1 + WARMUP_EPOCHS
    # The loader goes on from epoch to epoch as in a training loop. While the ceiling is read,
    # its streams fill their queues (as they would during a validation pass) and then wait; the
    # batches made during that pause are taken before each round's clock starts.
    prefilled = num_workers * (loader.prefetch + 2)
    seconds = 0.2
    for _ in range(rounds):
        time.sleep(0.3)
        sustained, best_pass = raw_h5py_rate(files, min_seconds=seconds)
        converted = timed_epochs(loader, range(epoch, epoch + epochs_per_round), server, skip=prefilled)
        # two rows (a perturbed and a control cell) per perturbed cell
        per_round.append({"ceiling": sustained / 2, "ceiling_best_pass": best_pass / 2, "converted": converted})
        seconds = max(0.2, converted["seconds"])
        epoch += epochs_per_round
    dm.teardown("fit")
    # the same epochs as Arrow record batches, before conversion to torch: what the service
    # itself delivers, apart from the COO tensors the schema asks the client to build
    arrow_dm = datamodule()
    arrow_dm.setup("fit")
    arrow_loader = arrow_dm.train_dataloader()
    arrow_loader.decode = lambda rb: rb
    arrow = timed_epochs(arrow_loader, range(1, epoch), server)
    arrow_dm.teardown("fit")
    return {"rounds": per_round, "arrow": arrow, "cold_epoch_cells_per_s": cold_cells / cold_s, "warmup": warmup,
            "time_to_first_batch_s": first, "setup_s": setup_s, "batches_per_epoch": len(loader)}


CELL_LOAD_B, CELL_LOAD_S = 16, 128
CELL_LOAD_CASES = {"embed_key_X_hvg": {"embed_key": "X_hvg", "output_space": "gene"}, "output_space_gene": {"output_space": "gene"}}


def generate_cell_load(root: Path) -> Path:
    """The bench files in cell-load's format (under root/cell_load) and their TOML."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    out = root / "cell_load"
    out.mkdir(exist_ok=True)
    for name in ("k562", "rpe1"):
        path = out / f"{name}.h5ad"
        if path.exists():
            continue
        adata = ad.read_h5ad(root / f"{name}.h5ad")
        adata.obs = pd.DataFrame(
            {"gene": adata.obs.target_gene, "cell_type": adata.obs.cell_type, "gem_group": adata.obs.batch_var}, index=adata.obs_names
        )
        rng = np.random.default_rng(len(name))
        adata.obsm["X_hvg"] = rng.random((adata.n_obs, 2000), dtype=np.float32)
        adata.write_h5ad(path)
    toml = root / "cell_load.toml"
    toml.write_text(f'[datasets]\nbench = "{out}/{{k562,rpe1}}.h5ad"\n[training]\nbench = "train"\n')
    return toml


def _rate(loader, seconds: float, max_batches: int | None = None) -> tuple[float, int]:
    """Cells/s of a loader after its first batch (worker start-up left out), over `seconds`
    (or `max_batches`), going on to the next epoch when one ends."""
    it = iter(loader)
    next(it)
    cells = batches = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds and (max_batches is None or batches < max_batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        cells += batch["pert_cell_emb"].shape[0]
        batches += 1
    return cells / (time.perf_counter() - t0), batches


def cell_load_run(server: Server, toml: Path, seconds: float, workers: list[int], rounds: int = 3) -> dict:
    """Per case: every cell-load mode for `seconds` (its fastest is the reference), then `rounds`
    interleaved rounds of cellfeed's drop-in and cell-load's fastest mode, `seconds` each, so
    that each round's ratio compares like with like on this shared machine."""
    import cell_load.data_modules as cl
    from cellfeed.client.cell_load.data_modules import PerturbationDataModule as Dropin

    common = dict(pert_col="gene", batch_col="gem_group", cell_type_key="cell_type", control_pert="non-targeting",
                  batch_size=CELL_LOAD_B, cell_sentence_len=CELL_LOAD_S)

    def cell_load_rate(n: int, consecutive: bool, options: dict) -> tuple[float, int]:
        dm = cl.PerturbationDataModule(toml_config_path=str(toml), num_workers=n, use_consecutive_loading=consecutive,
                                       **common, **options)
        dm.setup()
        return _rate(dm.train_dataloader(), seconds)

    out = {}
    for case, options in CELL_LOAD_CASES.items():
        modes = {}
        for consecutive in (False, True):
            for n in workers:
                rate, batches = cell_load_rate(n, consecutive, options)
                modes[(n, consecutive)] = {"cells_per_s": round(rate), "batches": batches}
        fastest = max(modes, key=lambda k: modes[k]["cells_per_s"])
        ours = Dropin(toml_config_path=str(toml), num_workers=2, server=server.flight_uri, **common, **options)
        ours.setup("fit")
        loader = ours.train_dataloader()
        for _ in loader:  # a first epoch: the server's reads warm, as in training
            pass
        per_round = []
        for _ in range(rounds):
            mine, _ = _rate(loader, seconds)
            theirs, _ = cell_load_rate(*fastest, options)
            per_round.append({"cellfeed": round(mine), "cell_load": round(theirs), "ratio": round(mine / theirs, 1)})
        ours.teardown("fit")
        name = lambda k: f"num_workers={k[0]}{', consecutive' if k[1] else ''}"  # noqa: E731
        out[case] = {
            "options": options,
            "cellfeed_cells_per_s": round(statistics.median(r["cellfeed"] for r in per_round)),
            "cell_load_fastest_cells_per_s": round(statistics.median(r["cell_load"] for r in per_round)),
            "cell_load_fastest_mode": name(fastest),
            "speedup_median": statistics.median(r["ratio"] for r in per_round),
            "rounds": per_round,
            "cell_load_modes": {name(k): v for k, v in modes.items()},
        }
    return out


def cell_load_section(root: Path, args: argparse.Namespace) -> dict:
    """The cell-load-format run (a server of its own), printed as it ends."""
    toml = generate_cell_load(root)
    with Server(root) as server:
        cell_load = cell_load_run(server, toml, args.cell_load_seconds, [int(w) for w in args.cell_load_workers.split(",")])
    print("perturbation, cell-load format (STATE-style; batch 16 x sentence 128)")
    for case, figures in cell_load.items():
        print(f"  {case:22s} cellfeed {figures['cellfeed_cells_per_s']:>9,} cells/s   cell-load 0.10.4 fastest "
              f"{figures['cell_load_fastest_cells_per_s']:>7,} cells/s ({figures['cell_load_fastest_mode']})   "
              f"x{figures['speedup_median']} (rounds: {', '.join(str(r['ratio']) for r in figures['rounds'])})")
        for mode, m in figures["cell_load_modes"].items():
            print(f"      cell-load {mode:32s} {m['cells_per_s']:>7,} cells/s (survey)")
    return cell_load


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="bench/data/perturbation")
    parser.add_argument("--cells-per-target", type=int, default=450)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of ceiling and stream")
    parser.add_argument("--epochs-per-round", type=int, default=6, help="timed warm epochs per round")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--cell-load-seconds", type=float, default=8.0, help="time per cell-load mode (cellfeed: twice)")
    parser.add_argument("--cell-load-workers", default="0,2,4", help="cell-load num_workers settings tried")
    parser.add_argument("--skip-cell-load", action="store_true", help="only the protoplast-format run")
    parser.add_argument("--only-cell-load", action="store_true", help="only the cell-load-format run")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    generate(root, args.cells_per_target, args.genes)

    files = [root / "k562.h5ad", root / "rpe1.h5ad"]
    if args.only_cell_load:
        write_result("perturbation_cell_load", {"cell_load_format": cell_load_section(root, args)})
        return
    raw_h5py_rate(files)  # warm the page cache, as the server's reads are warm after its first epoch
    # also the ceiling as earlier runs of this bench took it: best of 3 passes, before the server starts
    ceiling_before = max(raw_h5py_rate(files)[1] for _ in range(3)) / 2
    with Server(root) as server:
        client = run(server, files, args.rounds, args.epochs_per_round, args.num_workers)
        server_rss = server.peak_rss_mb()
    rounds = client["rounds"]
    ratios = [r["converted"]["cells_per_s"] / r["ceiling"] for r in rounds]
    converted_cells = sum(r["converted"]["cells"] for r in rounds)
    converted_s = sum(r["converted"]["seconds"] for r in rounds)
    result = {
        "dataset": f"2 files x {args.cells_per_target * 50 + args.cells_per_target * 50 // 9} cells x {args.genes} genes, "
                   "~10% non-zeros; batch 64 x S 32",
        "cellfeed_perturbed_cells_per_s": round(converted_cells / converted_s),
        "cold_first_epoch_cells_per_s": round(client["cold_epoch_cells_per_s"]),
        "warmup_epochs_cells_per_s": round(client["warmup"]["cells_per_s"]),
        "time_to_first_batch_s": round(client["time_to_first_batch_s"], 3),
        "session_setup_s": round(client["setup_s"], 3),
        "ceiling_perturbed_cells_per_s_median": round(statistics.median(r["ceiling"] for r in rounds)),
        "ratio_to_ceiling_median": round(statistics.median(ratios), 3),
        "ratio_to_ceiling_per_round": [round(x, 3) for x in ratios],
        "ceiling_per_round": [round(r["ceiling"]) for r in rounds],
        "ceiling_best_pass_median": round(statistics.median(r["ceiling_best_pass"] for r in rounds)),
        "ratio_to_best_pass_ceiling_median": round(statistics.median(r["converted"]["cells_per_s"] / r["ceiling_best_pass"] for r in rounds), 3),
        "ceiling_before_server_best_of_3": round(ceiling_before),
        "ratio_to_ceiling_before_server": round(converted_cells / converted_s / ceiling_before, 3),
        "arrow_stream_cells_per_s": round(client["arrow"]["cells_per_s"]),
        "arrow_stream_ratio_to_ceiling": round(client["arrow"]["cells_per_s"] / statistics.median(r["ceiling"] for r in rounds), 3),
        "server_peak_rss_mb": round(server_rss, 1),
        "client_peak_rss_mb": round(self_peak_rss_mb(), 1),
        "server_cpu_ms_per_batch": round(statistics.median(r["converted"]["server_cpu_ms"] for r in rounds), 2),
        "client_cpu_ms_per_batch": round(statistics.median(r["converted"]["client_cpu_ms"] for r in rounds), 2),
        "rounds": args.rounds,
        "epochs_per_round": args.epochs_per_round,
        "num_workers": args.num_workers,
        "targets": {"cells_per_s": 200_000, "ratio_to_ceiling": 0.5},
    }
    print("perturbation stream")
    for key, value in result.items():
        print(f"  {key:38s} {value}")
    # after the protoplast-format figures (and their peak RSS): cell-load's loaders and its forked
    # workers would otherwise share this process's heap with them
    result["cell_load_format"] = None if args.skip_cell_load else cell_load_section(root, args)
    write_result("perturbation", result)


if __name__ == "__main__":
    main()
