"""Open each file once per server process and share the handle between every session and stream.

A handle belongs to one version of its file (size and modification time): when a job rewrites
the file, the next `get` opens the new version, while sessions holding the old handle keep
reading the old one (a rename leaves it readable), so no stream ever mixes two versions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellfeed.server.errors import CellfeedError

if TYPE_CHECKING:
    from cellfeed.server.paths import DataRoot

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

    def __init__(self, root: "DataRoot | None" = None) -> None:
        self.root = root  # when set, every path is contained in it at the moment it is opened
        self._handles: dict[tuple[Path, str], tuple[Version | None, Any]] = {}
        self._used: dict[tuple[Path, str], float] = {}  # when each handle was last got
        self._lock = threading.Lock()
        self._recorders = threading.local()
        self.on_close: Callable[[Any], object] | None = None  # told of each handle closed (caches drop its blocks)

    def get(self, path: Path, opener: Callable[[Path], Any], name: str | None = None) -> Any:
        """The handle of the current version of `path` (opened now if it changed or is new).

        With a data root, `path` is resolved through every symlink now and refused if it lands
        outside (a link in a dataset folder, a split folder that is a link), and checked again
        once opened."""
        resolved = self.root.contain(path) if self.root is not None else Path(path).resolve()
        key = (resolved, name or getattr(opener, "__qualname__", repr(opener)))
        version = version_of(resolved)
        with self._lock:
            entry = self._handles.get(key)
            if entry is None or entry[0] != version:
                handle = opener(resolved)
                if self.root is not None:
                    self._check_opened(path, resolved, handle)
                entry = (version, handle)
                self._handles[key] = entry
            self._used[key] = time.monotonic()
        for used in getattr(self._recorders, "stack", []):
            used[resolved] = version
        return entry[1]

    def _check_opened(self, path: Path, resolved: Path, handle: Any) -> None:
        """Once opened: `path` must still lead to `resolved` inside the root and, for a handle
        with a file descriptor (an h5ad), to the very file that was opened."""
        try:
            if self.root.contain(path) != resolved:
                raise CellfeedError(f"{self.root.relative_unresolved(Path(path))}: changed while being opened (a symlink swapped in?); refused")
            fileno = getattr(handle, "fileno", None)
            if callable(fileno):
                self.root.check_opened(path, fileno(), self.root.relative_unresolved(Path(path)))
        except BaseException:
            close = getattr(handle, "close", None)
            if callable(close):
                close()
            raise

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

    def release(self, keep: set[Path], idle_seconds: float = 60.0) -> int:
        """Close handles of files no open session reads (`keep`) that nobody got for
        `idle_seconds` (a session being opened may hold one not yet in `keep`)."""
        now = time.monotonic()
        with self._lock:
            gone = [key for key in self._handles if key[0] not in keep and now - self._used.get(key, 0.0) >= idle_seconds]
            handles = [self._handles.pop(key)[1] for key in gone]
            for key in gone:
                self._used.pop(key, None)
        for handle in handles:
            self._closed(handle)
        return len(handles)

    def _closed(self, handle: Any) -> None:
        if self.on_close is not None:
            self.on_close(handle)
        close = getattr(handle, "close", None)
        if callable(close):
            close()

    def paths(self) -> list[Path]:
        with self._lock:
            return sorted({p for p, _ in self._handles})

    def close(self) -> None:
        with self._lock:
            for _, handle in self._handles.values():
                self._closed(handle)
            self._handles.clear()
