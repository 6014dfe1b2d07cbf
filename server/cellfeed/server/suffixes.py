"""The file suffixes the server reads as AnnData h5ad: one list, so sessions, jobs and the
preprocess pipeline accept the same files."""

from __future__ import annotations

from pathlib import Path

H5AD_SUFFIXES: tuple[str, ...] = (".h5ad", ".h5")
H5AD_NAMES = " or ".join(H5AD_SUFFIXES)  # for messages: ".h5ad or .h5"


def is_h5ad(path: str | Path) -> bool:
    """Whether the file's suffix is one of H5AD_SUFFIXES."""
    return Path(path).suffix in H5AD_SUFFIXES
