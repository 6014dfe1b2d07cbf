"""Where the pipeline reads and writes: dataset names, input discovery and the seed's folders.

The folders are the seed's: interim/parquet_chunks/<name>/chunks, output/<name>/{train,test}/chunks
(or output/<name>/chunks without a split), logs/<name>/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cellfeed.server.errors import CellfeedError
from cellfeed.server.suffixes import H5AD_NAMES, is_h5ad

SPLITS = ("train", "test")


def dataset_name(path: str | Path) -> str:
    """The file stem with every run of characters other than letters, digits, `-`, `.` and `_`
    turned into one underscore, and no leading or trailing underscore ("ds one.h5ad" -> "ds_one")."""
    stem = Path(path).name
    if is_h5ad(stem):
        stem = Path(stem).stem
    name = re.sub(r"_+", "_", re.sub(r"[^\w\-.]", "_", stem)).strip("_")
    return name or "dataset"


def find_inputs(h5ad_path: str | Path | None, input_dir: str | Path) -> list[Path]:
    """The h5ad files to process: the file given, every .h5ad or .h5 file of the folder given, or of input_dir."""
    target = Path(h5ad_path) if h5ad_path is not None else Path(input_dir)
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if is_h5ad(p) and p.is_file())
        if not files:
            raise CellfeedError(f"no {H5AD_NAMES} files in {str(target)!r}")
        return files
    if not target.exists():
        raise CellfeedError(f"input not found: {str(target)!r}")
    return [target]


@dataclass(frozen=True)
class RunFolders:
    """The three roots of a run and the folders of each dataset inside them."""

    interim_dir: Path
    output_dir: Path
    log_dir: Path

    def interim(self, name: str) -> Path:
        return self.interim_dir / "parquet_chunks" / name

    def interim_chunks(self, name: str) -> Path:
        return self.interim(name) / "chunks"

    def output(self, name: str) -> Path:
        return self.output_dir / name

    def logs(self, name: str) -> Path:
        return self.log_dir / name

    def gene_table(self) -> Path:
        return self.interim_dir / "gene_symbols.parquet"


def chunk_dirs(dataset_dir: Path) -> dict[str, Path]:
    """Split name -> chunks folder of a finished dataset ("all" when it was not split)."""
    found = {s: dataset_dir / s / "chunks" for s in SPLITS if (dataset_dir / s / "chunks").is_dir()}
    if not found and (dataset_dir / "chunks").is_dir():
        found["all"] = dataset_dir / "chunks"
    return found
