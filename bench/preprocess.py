"""Benchmark: `cellfeed preprocess run-all` against the seed's method on one generated h5ad.

The file is CELLxGENE-like: CSR X of normalised values (~1,500 non-zeros per cell), Ensembl
var_names with var.feature_name, obs donor_id / development_stage / ontology term / cell_type,
cells grouped by donor. It is written in blocks straight through h5py (bounded memory) and kept
in bench/data for later runs. Both methods run in their own child process, which gives each its
own peak RSS and CPU time (wait4). The baseline follows the seed: densify each 10,000-row block,
then per cell argpartition the top N, sort them, map to symbols, join with spaces; write zstd-3
parquet chunks with polars.

    python bench/preprocess.py [--cells 200000] [--genes 20000] [--baseline-cells N]
    CELLFEED_BENCH_CELLS=20000 python bench/preprocess.py     # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench.common import cpu_info, write_result  # noqa: E402

DATA = HERE / "data" / "preprocess"
NNZ_RANGE = (1200, 1800)
DONORS = 100
TOP_GENES = 2000
BLOCK = 10_000


def generate(path: Path, n_cells: int, n_genes: int, seed: int = 0) -> None:
    """Write the benchmark h5ad block by block (memory bounded by one block)."""
    from anndata.io import write_elem

    from cellfeed.server.preprocess.genes import GeneTable

    rng = np.random.default_rng(seed)
    genes = GeneTable.shipped().table.slice(0, n_genes)
    var = pd.DataFrame({"feature_name": pd.Categorical(genes["symbol"].to_pylist())}, index=genes["id"].to_pylist())
    per_cell = rng.integers(*NNZ_RANGE, size=n_cells)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(per_cell, out=indptr[1:])
    donor_of = np.sort(rng.integers(0, DONORS, size=n_cells))
    donor_age = rng.integers(20, 81, size=DONORS)
    stages = {a: f"{a}-year-old stage" for a in range(20, 81)}
    terms = {a: f"HsapDv:{a + 94:07d}" for a in range(20, 81)}  # HsapDv:0000114 is 20-year-old
    obs = pd.DataFrame(
        {
            "donor_id": pd.Categorical([f"donor_{d:03d}" for d in donor_of]),
            "development_stage": pd.Categorical([stages[donor_age[d]] for d in donor_of]),
            "development_stage_ontology_term_id": pd.Categorical([terms[donor_age[d]] for d in donor_of]),
            "cell_type": pd.Categorical(rng.choice(["T cell", "B cell", "monocyte", "NK cell"], size=n_cells)),
        },
        index=[f"cell_{i:07d}" for i in range(n_cells)],
    )
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": np.array([n_cells, n_genes])})
        x.create_dataset("indptr", data=indptr)
        data = x.create_dataset("data", shape=(int(indptr[-1]),), dtype=np.float32)
        indices = x.create_dataset("indices", shape=(int(indptr[-1]),), dtype=np.int32)
        for start in range(0, n_cells, BLOCK):
            stop = min(start + BLOCK, n_cells)
            counts = per_cell[start:stop]
            cols = np.concatenate([rng.choice(n_genes, k, replace=False) for k in counts]).astype(np.int64)
            rows = np.repeat(np.arange(stop - start, dtype=np.int64), counts)
            cols = (np.sort(rows * n_genes + cols) % n_genes).astype(np.int32)
            raw = rng.geometric(0.3, size=len(cols)).astype(np.float32)
            totals = np.add.reduceat(raw, np.r_[0, np.cumsum(counts)[:-1]])
            values = np.log1p(raw / np.repeat(totals, counts) * 1e4).astype(np.float32)
            lo, hi = int(indptr[start]), int(indptr[stop])
            indices[lo:hi] = cols
            data[lo:hi] = values
        for name in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            write_elem(f, name, {})
    tmp.replace(path)


def baseline(path: Path, out: Path, n_cells: int) -> None:
    """The seed's step 2 on the first n_cells cells (run in a child process)."""
    import anndata as ad
    import polars as pl

    adata = ad.read_h5ad(path, backed="r")
    symbols = np.asarray(adata.var["feature_name"].astype(str))
    out.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, n_cells, BLOCK)):
        stop = min(start + BLOCK, n_cells)
        block = adata.X[start:stop].toarray()
        sentences = []
        for expr in block:  # per cell, as the seed does
            top = np.argpartition(expr, -TOP_GENES)[-TOP_GENES:]
            top = top[np.argsort(-expr[top])]
            sentences.append(" ".join(symbols[top]))
        frame = {col: adata.obs[col].iloc[start:stop].astype(str).tolist() for col in adata.obs.columns}
        frame["cell_sentence"] = sentences
        pl.DataFrame(frame).write_parquet(out / f"chunk_{i:04d}.parquet", compression="zstd", compression_level=3, use_pyarrow=True)


def measure(args: list[str]) -> dict:
    """Wall seconds, CPU seconds, peak RSS (MiB) and exit status of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "status": os.waitstatus_to_exitcode(status),
    }


def figures(run: dict, cells: int) -> dict:
    return {
        "cells": cells,
        "seconds": round(run["seconds"], 2),
        "cpu_seconds": round(run["cpu_seconds"], 2),
        "cells_per_s": round(cells / run["seconds"]),
        "cells_per_cpu_s": round(cells / run["cpu_seconds"]),
        "peak_rss_mib": round(run["peak_rss_mib"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=int(os.environ.get("CELLFEED_BENCH_CELLS", 200_000)))
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--baseline-cells", type=int, default=int(os.environ.get("CELLFEED_BENCH_BASELINE_CELLS", 0)), help="cells the baseline runs on (0: all)")
    parser.add_argument("--baseline-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_only:
        baseline(args.baseline_only, args.baseline_out, args.baseline_cells)
        return

    path = DATA / f"bench_{args.cells}x{args.genes}.h5ad"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        generate(path, args.cells, args.genes)
        print(f"generated {path.name} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s")
    with path.open("rb") as f:  # the page cache warm for every run alike, not only for the later ones
        while f.read(64 << 20):
            pass
    work = DATA / "work"
    shutil.rmtree(work, ignore_errors=True)
    runs = {}
    for label, extra in (("run_all", []), ("run_all_zstd3", ["--compression-level", "3"])):
        out = work / label
        command = [sys.executable, "-m", "cellfeed.server.preprocess.cli", "run-all", str(path), "--no-progress", *extra,
                   "--interim-dir", str(out / "interim"), "--output-dir", str(out / "output"), "--log-dir", str(out / "logs")]
        run = measure(command)
        if run["status"] != 0:
            raise SystemExit(f"{label} failed ({run['status']}); see {out / 'logs'}")
        manifest = json.loads(next((out / "output").glob("*/manifest.json")).read_text())
        runs[label] = figures(run, int(manifest["cells"])) | {"rows": manifest["rows"], "output_bytes": du(out / "output")}
        shutil.rmtree(out, ignore_errors=True)

    base_cells = args.baseline_cells or args.cells
    base = [sys.executable, __file__, "--baseline-only", str(path), "--baseline-out", str(work / "baseline"), "--baseline-cells", str(base_cells)]
    run = measure(base)
    if run["status"] != 0:
        raise SystemExit(f"baseline failed ({run['status']})")
    baseline_figures = figures(run, base_cells) | {"output_bytes": du(work / "baseline")}

    result = {
        "machine": cpu_info(),
        "file": {"cells": args.cells, "genes": args.genes, "bytes": path.stat().st_size, "nnz_per_cell": list(NNZ_RANGE)},
        **runs,
        "baseline": baseline_figures,
        "speedup": round(runs["run_all"]["cells_per_s"] / baseline_figures["cells_per_s"], 1),
        "speedup_cpu": round(runs["run_all"]["cells_per_cpu_s"] / baseline_figures["cells_per_cpu_s"], 1),
        "speedup_zstd3": round(runs["run_all_zstd3"]["cells_per_s"] / baseline_figures["cells_per_s"], 1),
        "target": "speedup >= 10 at peak RSS <= 1024 MiB",
    }
    for label, f in (*runs.items(), ("baseline", baseline_figures)):
        print(f"{label:14s}: {f['cells_per_s']:8,} cells/s ({f['cells_per_cpu_s']:,} per CPU-second)  peak RSS {f['peak_rss_mib']:5} MiB  "
              f"{f['cells']:,} cells in {f['seconds']} s")
    print(f"speedup: {result['speedup']}x wall, {result['speedup_cpu']}x CPU ({result['speedup_zstd3']}x wall at zstd 3)  -> {write_result('preprocess', result)}")
    shutil.rmtree(work, ignore_errors=True)


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


if __name__ == "__main__":
    main()
