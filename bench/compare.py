"""This tree against another commit, one benchmark run by run in alternation (A B A B ...).

A refactor must not cost speed, and this machine is shared and noisy: so the two trees run the
same benchmark script of their own, interleaved, and each figure is compared as the ratio of
medians. The other commit is checked out as a git worktree; each tree's code is imported through
PYTHONPATH (ahead of the venv's editable install), and both read this tree's bench/data.

    python bench/compare.py --baseline ace48b0 --bench perturbation.py --rounds 2 -- --skip-cell-load
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worktree(commit: str) -> Path:
    """A detached worktree of `commit` (made once), sharing this tree's bench/data."""
    sha = subprocess.check_output(["git", "rev-parse", commit], cwd=ROOT, text=True).strip()
    path = Path(tempfile.gettempdir()) / f"cellfeed-baseline-{sha[:12]}"
    if not path.exists():
        subprocess.check_call(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT)
    data = path / "bench" / "data"
    if not data.exists():
        (HERE / "data").mkdir(exist_ok=True)
        data.symlink_to(HERE / "data", target_is_directory=True)
    return path


def run(tree: Path, bench: str, args: list[str]) -> dict:
    """One run of `tree`'s bench/<bench>: the JSON results it wrote."""
    env = dict(os.environ)  # each tree's own code, whichever tree the venv's editable install points at
    env["PYTHONPATH"] = os.pathsep.join(str(tree / p) for p in ("proto", "server", "client", "."))
    results = tree / "bench" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.glob("*.json")} if results.exists() else {}
    subprocess.check_call([sys.executable, str(tree / "bench" / bench), *args], cwd=tree, env=env)
    written = [p for p in results.glob("*.json") if before.get(p) != p.stat().st_mtime_ns]
    return {p.stem: json.loads(p.read_text()) for p in written}


def numbers(value: object, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON result, by its dotted path (lists of samples left out)."""
    if isinstance(value, bool):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: float(value)}
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, item in value.items():
            out.update(numbers(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare with (e.g. the last main before a refactor)")
    parser.add_argument("--bench", required=True, help="a script in bench/, e.g. perturbation.py")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compare.json")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: arguments for the benchmark")
    args = parser.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    base = worktree(args.baseline)
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this tree": []}
    for r in range(args.rounds):
        for label, tree in (("baseline", base), ("this tree", ROOT)) if r % 2 == 0 else (("this tree", ROOT), ("baseline", base)):
            print(f"\n--- round {r + 1}: {label} ({tree}) ---", flush=True)
            runs[label].append(numbers(run(tree, args.bench, bench_args)))
    keys = sorted(set.intersection(*(set(d) for d in runs["baseline"] + runs["this tree"])))
    table = {}
    for key in keys:
        a = statistics.median(d[key] for d in runs["baseline"])
        b = statistics.median(d[key] for d in runs["this tree"])
        table[key] = {"baseline": a, "this_tree": b, "ratio": (b / a) if a else None}
    print(f"\n{'figure':<70} {'baseline':>12} {'this tree':>12} {'ratio':>7}")
    for key, row in table.items():
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        print(f"{key:<70} {row['baseline']:>12.4g} {row['this_tree']:>12.4g} {ratio:>7}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"baseline": args.baseline, "bench": args.bench, "args": bench_args, "rounds": args.rounds, "figures": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
