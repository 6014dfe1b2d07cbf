"""Keep freed batch buffers in the process heap instead of returning them to the kernel.

glibc serves allocations above 128 KiB with fresh mmaps and unmaps them on free, so every
multi-MB batch buffer is page-faulted in again, byte by byte: measured here, that tripled the
cost of building and decoding a batch. Raising the mmap and trim thresholds lets the next batch
reuse the last one's pages. Set CELLFEED_MALLOPT=0 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_done = False
_libc: ctypes.CDLL | None = None


def reuse_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Apply once per process (glibc only); returns whether the settings were applied."""
    global _done
    if _done or os.environ.get("CELLFEED_MALLOPT", "1") == "0":
        return _done
    name = ctypes.util.find_library("c")
    if not name:
        return False
    global _libc
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    # Buffers above glibc's 32 MiB threshold cap (a received DynaCLR batch is ~42 MB, copied whole
    # by gRPC) would still be fresh mmaps; serve them from the heap too, and from one arena: a
    # thread arena's 64 MiB heaps are unmapped and mapped again batch after batch.
    _done = _done and bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_ARENA_MAX, 1))
    _libc = libc if _done else None
    return _done


def return_freed_memory() -> bool:
    """Give free heap pages back to the kernel (glibc's malloc_trim; the high trim threshold above
    keeps them otherwise): a long-running server calls it after closing sessions."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()  # Arrow's own allocator (jemalloc or mimalloc) likewise
    if _libc is None:
        return False
    try:
        return bool(_libc.malloc_trim(0))
    except AttributeError:
        return False
