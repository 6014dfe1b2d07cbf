"""The end-of-batch summary: printed for people, and written to the output folder as TSV and JSON
(batch_processing_summary.{tsv,json}, the seed's columns), even when every file failed."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from cellfeed.server.preprocess.folders import RunFolders
from cellfeed.server.preprocess.pipeline import FileResult

COLUMNS = ["dataset_name", "status", "processing_time_seconds", "processing_time_formatted", "output_path", "message"]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


def render(results: list[FileResult], dirs: RunFolders) -> str:
    ok = sum(r.status == "SUCCESS" for r in results)
    failed = sum(r.status == "FAILED" for r in results)
    lines = [
        "=" * 60,
        "PIPELINE COMPLETE - SUMMARY",
        "=" * 60,
        f"Total: {len(results)}  Successful: {ok}  Failed: {failed}  Skipped: {len(results) - ok - failed}",
    ]
    marks = {"SUCCESS": "✓", "FAILED": "✗"}
    lines += [f"  {marks.get(r.status, '-')} {r.dataset} [{r.status}] {_duration(r.seconds)}: {r.message}" for r in results]
    lines += [f"Input files: {', '.join(sorted({str(Path(r.path).parent) for r in results}))}", f"Interim: {dirs.interim_dir}", f"Output: {dirs.output_dir}", f"Logs: {dirs.log_dir}"]
    return "\n".join(lines)


def write(results: list[FileResult], dirs: RunFolders) -> Path:
    """Write batch_processing_summary.tsv and .json into the output folder; return the TSV path."""
    dirs.output_dir.mkdir(parents=True, exist_ok=True)
    tsv = dirs.output_dir / "batch_processing_summary.tsv"
    with open(tsv, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in results:
            writer.writerow([r.dataset, r.status, f"{r.seconds:.3f}", _duration(r.seconds), r.output, r.message.replace("\n", " ")])
    (dirs.output_dir / "batch_processing_summary.json").write_text(json.dumps([asdict(r) for r in results], indent=2, default=str) + "\n", encoding="utf-8")
    return tsv
