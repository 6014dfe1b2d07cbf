"""`make bench`: every benchmark in turn, each printing its figures and writing bench/results/*.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["perturbation.py", "dynaclr.py", "preprocess.py", "faults.py", "soak.py"]


def main() -> int:
    failed = []
    for name in BENCHES:
        if not (HERE / name).exists():
            continue
        print(f"\n=== bench/{name} ===", flush=True)
        if subprocess.call([sys.executable, str(HERE / name)], cwd=HERE.parent) != 0:
            failed.append(name)
    print("\n=== summary (bench/results) ===")
    for path in sorted((HERE / "results").glob("*.json")):
        print(f"{path.stem}: {json.dumps(json.loads(path.read_text()))}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
