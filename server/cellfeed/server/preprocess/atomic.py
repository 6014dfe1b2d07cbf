"""Outputs appear whole or not at all, one writer at a time, and only inside the data root.

- **One writer per output.** `output_lock(final)` takes an exclusive flock on `.<name>.lock` in the
  output's parent. flock is held across processes (two servers on one data root, the CLI beside
  a server job) and released by the kernel when its holder dies, so a killed writer never leaves
  the output locked (the lock file goes when released). A second writer fails at once with a message naming the output and the
  holder (pid, host, since when).
- **Staging owned by its writer.** The output is built in a hidden sibling
  `.<name>.tmp-<pid>-<id>` and renamed into place. Only the lock holder deletes leftovers
  (`.<name>.tmp-*`, `.<name>.old-*`, `.<name>.spill-*` of a killed earlier run), so no writer
  ever deletes another live writer's staging.
- **Written through descriptors.** The parent is opened as a directory descriptor (checked to be
  inside the data root after opening); the staging folder is made, renamed and removed relative
  to it, and writers get the staging folder as /proc/self/fd/<fd> (on Linux), so a folder on
  the way swapped for a symlink while a job runs cannot send its files outside the root. Before
  the rename the parent is checked once more to still be the folder that was locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cellfeed.server.errors import CellfeedError

if TYPE_CHECKING:
    from cellfeed.server.paths import DataRoot

STALE = ("tmp", "old", "spill")
_PROC_FD = Path("/proc/self/fd")


class OutputBusy(CellfeedError):
    """Another process (or job) is writing this output now."""


def _shown(path: Path, root: "DataRoot | None") -> str:
    return root.relative_unresolved(path) if root is not None else str(path)


def _open_parent(final: Path, root: "DataRoot | None") -> int:
    """A directory descriptor of final's parent (made if missing), inside the root when given."""
    if root is not None:
        return root.open_dir(final.parent, create=True)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        return os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CellfeedError(f"cannot write to {str(final.parent)!r}: {exc.strerror or exc}") from None


def fd_path(fd: int, fallback: Path) -> Path:
    """A path naming the open folder `fd` itself (Linux), else `fallback`."""
    path = _PROC_FD / str(fd)
    return path if _PROC_FD.is_dir() and os.path.isdir(path) else fallback


@contextmanager
def output_lock(final: Path, root: "DataRoot | None" = None) -> Iterator[int]:
    """Hold the lock of `final` (a lock file beside it, removed on release); yields the parent's
    directory descriptor. Raises OutputBusy, naming the output and its writer, when another holds it."""
    final = Path(final)
    lock_name = f".{final.name}.lock"
    parent = _open_parent(final, root)
    try:
        fd = _acquire(parent, lock_name, final, root)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}".encode(), 0)
            yield parent
        finally:
            try:
                os.unlink(lock_name, dir_fd=parent)  # still held: a waiter that opened it re-checks and retries
            except FileNotFoundError:
                pass
            os.close(fd)  # closing the descriptor releases the flock
    finally:
        os.close(parent)


def _acquire(parent: int, lock_name: str, final: Path, root: "DataRoot | None") -> int:
    for _ in range(100):
        try:
            fd = os.open(lock_name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=parent)
        except OSError as exc:
            raise CellfeedError(f"cannot lock output {_shown(final, root)!r}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CellfeedError(f"cannot lock output {_shown(final, root)!r}: {exc.strerror or exc}") from None
            raise OutputBusy(
                f"output {_shown(final, root)!r} is being written by another job ({holder}); "
                "wait for it to finish, or name another output folder"
            ) from None
        try:  # the file locked must still be the lock file (its holder removes it on release)
            same = os.stat(lock_name, dir_fd=parent, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise OutputBusy(f"output {_shown(final, root)!r}: its lock keeps changing hands; try again")


def remove_at(parent: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent, ignore_errors=True)
    else:
        try:
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass


def remove_stale_at(parent: int, name: str) -> list[str]:
    """Leftovers of killed earlier writers of `name` (call with its lock held)."""
    prefixes = tuple(f".{name}.{kind}-" for kind in STALE)
    gone = [entry for entry in os.listdir(parent) if entry.startswith(prefixes)]
    for entry in gone:
        remove_at(parent, entry)
    return gone


def remove_stale(final: Path, root: "DataRoot | None" = None) -> list[str]:
    """Delete what killed earlier runs left beside `final` (".<name>.tmp-*", ".old-*", ".spill-*").

    Only while holding the output's lock: when another writer holds it, its staging is its own
    and nothing is deleted. Returns the names removed."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    try:
        with output_lock(final, root) as parent:
            return remove_stale_at(parent, final.name)
    except OutputBusy:
        return []


def _check_parent(final: Path, parent: int, root: "DataRoot | None") -> None:
    """The parent path must still name the folder that was locked (inside the root)."""
    shown = _shown(final.parent, root)
    try:
        real = root.contain(final.parent) if root is not None else final.parent.resolve()
        now, held = os.stat(real), os.fstat(parent)
    except OSError as exc:
        raise CellfeedError(f"output folder {shown!r} changed while being written ({exc.strerror or exc}); nothing was published") from None
    if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        raise CellfeedError(f"output folder {shown!r} was replaced while being written (a symlink swapped in?); nothing was published")


@contextmanager
def staged_dir(final: Path, root: "DataRoot | None" = None) -> Iterator[Path]:
    """Yield an empty hidden folder beside `final`; on success it replaces `final`, on error it goes.

    Holds the output's lock throughout (OutputBusy if another writer has it)."""
    final = Path(final)
    with output_lock(final, root) as parent:
        remove_stale_at(parent, final.name)
        name = f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
            staging_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError as exc:
            raise CellfeedError(f"cannot write to {_shown(final.parent, root)!r}: {exc.strerror or exc}") from None
        try:
            yield fd_path(staging_fd, final.parent / name)
            _check_parent(final, parent, root)
            _replace_at(parent, name, final.name)
        finally:
            os.close(staging_fd)
            remove_at(parent, name)


def _replace_at(parent: int, new: str, final: str) -> None:
    """Move `new` to `final` in the folder `parent`, replacing an older `final` (renamed away first)."""
    old = None
    try:
        os.stat(final, dir_fd=parent, follow_symlinks=False)
        old = f".{final}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old, src_dir_fd=parent, dst_dir_fd=parent)
    except FileNotFoundError:
        pass
    os.replace(new, final, src_dir_fd=parent, dst_dir_fd=parent)
    if old is not None:
        remove_at(parent, old)


def replace_dir(new: Path, final: Path) -> None:
    """Move `new` to `final`, replacing an older `final` (renamed away first, then deleted)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
