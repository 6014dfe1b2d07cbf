"""Open each file once per server process and share the handle between every session and stream.

A handle belongs to one version of its file (size and modification time): when a job rewrites
the file, the next `get` opens the new version, while sessions holding the old handle keep
reading the old one (a rename leaves it readable), so no stream ever mixes two versions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Version = tuple[int, int]  # (size, or 0 for a folder; mtime in ns)


def version_of(path: Path) -> Version | None:
    """What identifies one version of a file or folder; None when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (0 if path.is_dir() else st.st_size, st.st_mtime_ns)


class HandleCache:
    """Read-only handles keyed by (resolved path, opener name); opened on first use, kept open.

    h5py handles cannot be pickled or shared across forks, which is why the server (one process,
    many threads) owns them rather than each training job's loader workers.
    """

    def __init__(self) -> None:
        self._handles: dict[tuple[Path, str], tuple[Version | None, Any]] = {}
        self._lock = threading.Lock()
        self._recorders = threading.local()

    def get(self, path: Path, opener: Callable[[Path], Any], name: str | None = None) -> Any:
        """The handle of the current version of `path` (opened now if it changed or is new)."""
        resolved = Path(path).resolve()
        key = (resolved, name or getattr(opener, "__qualname__", repr(opener)))
        version = version_of(resolved)
        with self._lock:
            entry = self._handles.get(key)
            if entry is None or entry[0] != version:
                entry = (version, opener(resolved))
                self._handles[key] = entry
        for used in getattr(self._recorders, "stack", []):
            used[resolved] = version
        return entry[1]

    @contextmanager
    def recording(self) -> Iterator[dict[Path, Version | None]]:
        """Collect {path: version} of every handle this thread gets inside the block."""
        stack = self._recorders.__dict__.setdefault("stack", [])
        used: dict[Path, Version | None] = {}
        stack.append(used)
        try:
            yield used
        finally:
            stack.remove(used)

    def paths(self) -> list[Path]:
        with self._lock:
            return sorted({p for p, _ in self._handles})

    def close(self) -> None:
        with self._lock:
            for _, handle in self._handles.values():
                close = getattr(handle, "close", None)
                if callable(close):
                    close()
            self._handles.clear()
