"""Open each file once per server process and share the handle between every session and stream."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable


class HandleCache:
    """Read-only handles keyed by (resolved path, opener name); opened on first use, kept open.

    h5py handles cannot be pickled or shared across forks, which is why the server (one process,
    many threads) owns them rather than each training job's loader workers.
    """

    def __init__(self) -> None:
        self._handles: dict[tuple[Path, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, opener: Callable[[Path], Any], name: str | None = None) -> Any:
        key = (Path(path).resolve(), name or getattr(opener, "__qualname__", repr(opener)))
        with self._lock:
            handle = self._handles.get(key)
            if handle is None:
                handle = opener(key[0])
                self._handles[key] = handle
            return handle

    def paths(self) -> list[Path]:
        with self._lock:
            return sorted({p for p, _ in self._handles})

    def close(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                close = getattr(handle, "close", None)
                if callable(close):
                    close()
            self._handles.clear()
