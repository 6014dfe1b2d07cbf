"""Outputs appear whole or not at all: build in a hidden sibling folder, then rename into place."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cellfeed.server.errors import CellfeedError


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside `final`; on success it replaces `final`, on error it goes."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as exc:
        raise CellfeedError(f"cannot write to {str(final.parent)!r}: {exc.strerror or exc}") from None
    try:
        yield staging
        replace_dir(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def replace_dir(new: Path, final: Path) -> None:
    """Move `new` to `final`, replacing an older `final` (renamed away first, then deleted)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale(final: Path) -> None:
    """Delete what a killed earlier run left beside `final` (its ".<name>.tmp-*" and ".<name>.old-*")."""
    if not final.parent.is_dir():
        return
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for entry in final.parent.glob(pattern):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
