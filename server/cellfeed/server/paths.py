"""The data root is a wall: every path a client or a job names is resolved inside it."""

from __future__ import annotations

import os
from pathlib import Path

from cellfeed.server.errors import CellfeedError


class DataRoot:
    """Resolves client-supplied paths inside one directory and refuses anything outside it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root).resolve()

    def resolve(self, name: str | os.PathLike[str], *, must_exist: bool = True) -> Path:
        """Return the absolute path of `name` (relative to the root, or absolute inside it).

        Symlinks are followed before the check, so a link pointing outside is refused too.
        """
        raw = Path(name)
        candidate = raw if raw.is_absolute() else self.path / raw
        resolved = candidate.resolve()
        if resolved != self.path and self.path not in resolved.parents:
            raise CellfeedError(f"path {str(name)!r} is outside the server's data root")
        if must_exist and not resolved.exists():
            raise CellfeedError(f"file not found: {str(name)!r} (looked in the data root at {self.relative(resolved)!r})")
        return resolved

    def relative(self, path: Path) -> str:
        """The path as clients name it: relative to the root."""
        try:
            return str(path.resolve().relative_to(self.path))
        except ValueError:
            return str(path)
