"""The `build-cell-index` job: VisCy main's cell index parquet built from a collection YAML.

One input file per collection; its output is `options.output` (a parquet path inside the data
root; default: beside the collection, `<stem>.cell_index.parquet`), written under the output's
lock and renamed into place. Registered in jobs.models (request and kind) and jobs.work (dispatch).
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cellfeed.server.errors import CellfeedError
from cellfeed.server.limits import PathName

KIND = "build-cell-index"


class CellIndexOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output: PathName | None = Field(None, description="parquet to write, inside the data root; default <collection stem>.cell_index.parquet beside it")
    include_wells: list[str] | None = Field(None, description="only these wells (A/1 ...)")
    exclude_fovs: list[str] | None = Field(None, description="skip these FOVs (A/1/0 ...), beside each experiment's own exclude_fovs")
    preprocess: bool = Field(False, description="also fill norm_* and z_focus_mean from the plates (VisCy's preprocess-cell-index)")
    focus_channel: str | None = Field(None, description="channel of focus_slice for z_focus_mean; default each experiment's first")


class CellIndexJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["build-cell-index"]
    inputs: list[PathName] = Field(min_length=1, max_length=100, description="collection YAML files inside the data root")
    options: CellIndexOptions = Field(default_factory=CellIndexOptions)


def output_of(path: str, options: dict[str, Any]) -> Path:
    if options.get("output"):
        return Path(options["output"])
    source = Path(path)
    return source.parent / f"{source.stem}.cell_index.parquet"


def run(task, options: dict[str, Any], root, progress, cancelled, log) -> dict[str, Any]:
    """One collection: build, write, and report rows and warnings (never raises for bad input)."""
    from cellfeed.server.kinds.dynaclr.cell_index import build_from_collection
    from cellfeed.server.paths import DataRoot
    from cellfeed.server.preprocess.convert import Cancelled

    started = time.time()
    root = root or DataRoot("/")
    output = output_of(task.path, options)
    log.event("cell_index.started", dataset=task.dataset, path=task.path, output=str(output))
    try:
        done = build_from_collection(
            task.path, str(output), root, include_wells=options.get("include_wells"), exclude_fovs=options.get("exclude_fovs"),
            preprocess=bool(options.get("preprocess")), focus_channel=options.get("focus_channel"),
            progress=progress, cancelled=cancelled,
        )
    except Cancelled:
        raise
    except CellfeedError as exc:
        log.event("cell_index.failed", level="error", dataset=task.dataset, error=str(exc))
        return {"state": "failed", "seconds": round(time.time() - started, 3), "message": str(exc)}
    except Exception as exc:  # a bug or an I/O error: this file fails, the trace goes to the log
        log.event("cell_index.failed", level="error", dataset=task.dataset, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return {"state": "failed", "seconds": round(time.time() - started, 3), "message": f"{type(exc).__name__}: {exc}"}
    seconds = round(time.time() - started, 3)
    log.event("cell_index.finished", dataset=task.dataset, output=done["output"], rows=done["rows"], warnings=done["warnings"], seconds=seconds)
    message = "; ".join(done["warnings"]) or None
    return {"state": "succeeded", "seconds": seconds, "output": done["output"], "message": message,
            "counts": {"rows": done["rows"], "experiments": done["experiments"], "warnings": len(done["warnings"])}}
