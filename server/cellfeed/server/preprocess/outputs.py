"""One dataset's outputs: rows routed to train/test chunk folders, and manifest.json beside them.

The manifest records what was made from which source file (size and mtime), so a resumed job
can tell a finished dataset from one it still has to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cellfeed.server.preprocess.chunks import ChunkWriter
from cellfeed.server.preprocess.split import TEST, TRAIN

MANIFEST = "manifest.json"


class DatasetWriter:
    """Writes rows to <folder>/train/chunks and <folder>/test/chunks, or <folder>/chunks unsplit."""

    def __init__(self, folder: Path, split: bool, chunk_size: int, compression: str, compression_level: int | None) -> None:
        names = {"train": TRAIN, "test": TEST} if split else {"all": None}
        self.writers = {
            name: ChunkWriter(folder / name / "chunks" if split else folder / "chunks", chunk_size, compression, compression_level)
            for name in names
        }
        self._codes = names

    def write(self, table: pa.Table, codes: np.ndarray | None = None) -> None:
        for name, writer in self.writers.items():
            code = self._codes[name]
            writer.write(table if code is None else table.filter(pa.array(codes == code)))

    def close(self) -> dict[str, int]:
        """Rows written per split."""
        for writer in self.writers.values():
            writer.close()
        return {name: writer.rows for name, writer in self.writers.items()}


def source_stamp(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime": stat.st_mtime}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_done(folder: Path, source: Path) -> bool:
    """True when `folder` holds a finished dataset made from this very version of `source`."""
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    stamp = source_stamp(source)
    made_from = manifest.get("source", {})
    return made_from.get("bytes") == stamp["bytes"] and made_from.get("mtime") == stamp["mtime"]
