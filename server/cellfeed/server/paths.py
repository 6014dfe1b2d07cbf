"""The data root is a wall: every path a client or a job names, and every file the server opens
or writes, is resolved inside it.

One helper, `DataRoot`, does all of it:

- `resolve(name)`: a name from a request (config, job, ticket), checked for what would make the
  OS fail without naming it (a NUL byte, a name or path too long, not a string), then resolved
  through every symlink and refused if it lands outside the root.
- `contain(path)`: the same for a path the server found itself (listing a folder, a parquet chunk,
  a split folder, a tracks CSV, a job's output folder), at the moment it is about to be opened.
- `listdir(folder, ...)`: a folder's entries, each contained (a link out of the root is an error
  naming the link, or skipped when listing what there is to see).
- `check_opened(path, fd)`: after opening, that the open file is the very file now at `path`
  inside the root (a link swapped in between the check and the open is caught).
- `open_dir(path)`: a folder inside the root as a file descriptor, for writing by `dir_fd`.

Messages name paths as clients do, relative to the root: the server's own location never
appears in an error or on the HTTP plane.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from cellfeed.server.errors import CellfeedError, MissingFile, OutsideRoot

MAX_PATH = 4096  # PATH_MAX on Linux: longer names fail with a bare OSError
MAX_NAME = 255  # NAME_MAX: one path component


def check_name(name: object, what: str = "path") -> str:
    """`name` as a str, or a CellfeedError saying what is wrong with it as a path."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if isinstance(name, bytes):
        raise CellfeedError(f"{what} must be a string, got bytes {name[:60]!r}")
    if not isinstance(name, str):
        raise CellfeedError(f"{what} must be a string, got {type(name).__name__} {name!r:.60}")
    if name == "":
        raise CellfeedError(f"{what} is empty")
    if "\x00" in name:
        raise CellfeedError(f"{what} {_short(name)!r} contains a NUL byte")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise CellfeedError(f"{what} {_short(name)!r} is too long ({len(name)} characters; at most {MAX_PATH})")
    long = next((part for part in name.split("/") if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME), None)
    if long is not None:
        raise CellfeedError(f"{what} {_short(name)!r} has a name of {len(long)} characters (at most {MAX_NAME} per folder or file name)")
    return name


def _short(name: str, keep: int = 80) -> str:
    return name if len(name) <= keep else f"{name[: keep // 2]}...{name[-keep // 2 :]}"


class DataRoot:
    """Resolves client-supplied and server-found paths inside one directory; refuses the rest."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root).resolve()

    # names from requests ---------------------------------------------------------------------

    def resolve(self, name: str | os.PathLike[str], *, must_exist: bool = True, what: str = "path") -> Path:
        """Return the absolute path of `name` (relative to the root, or absolute inside it).

        Symlinks are followed before the check, so a link pointing outside is refused too.
        """
        text = check_name(name, what)
        raw = Path(text)
        candidate = raw if raw.is_absolute() else self.path / raw
        shown = _short(self.relative_unresolved(raw) if self.inside(Path(os.path.normpath(candidate))) else text)
        resolved = self._realpath(candidate, shown)
        if not self.inside(resolved):
            raise OutsideRoot(f"{what} {shown!r} is outside the server's data root")
        if must_exist and not resolved.exists():
            raise MissingFile(f"file not found: {shown!r} (looked in the data root at {self.relative(resolved)!r})")
        return resolved

    # paths the server found ------------------------------------------------------------------

    def inside(self, resolved: Path) -> bool:
        return resolved == self.path or self.path in resolved.parents

    def contain(self, path: str | os.PathLike[str], label: str | None = None) -> Path:
        """`path` resolved through every symlink now; a CellfeedError if it lands outside the root.

        Use it on every path the server found by itself, right before opening it."""
        path = Path(path)
        resolved = self._realpath(path if path.is_absolute() else self.path / path, str(path))
        if not self.inside(resolved):
            shown = label or self.relative_unresolved(path)
            raise OutsideRoot(f"{shown} resolves outside the server's data root (a symlink out of it?); refused")
        return resolved

    def listdir(self, folder: Path, keep: Callable[[Path], bool] = lambda p: True, *, skip_outside: bool = False, label: str | None = None) -> list[Path]:
        """The entries of `folder` that `keep` accepts, in name order, each resolved inside the
        root. An entry that resolves outside raises (naming it), or is left out with skip_outside."""
        out = []
        for entry in sorted(Path(folder).iterdir()):
            if not keep(entry):
                continue
            try:
                out.append(self.contain(entry, f"{label}/{entry.name}" if label else None))
            except CellfeedError:
                if not skip_outside:
                    raise
        return out

    def check_opened(self, path: Path, fd: int, label: str | None = None) -> None:
        """After opening `path` as `fd`: the open file must be the file now at `path`, inside the root.

        A link swapped in between a check and the open points the fd at another file; this
        re-resolves `path` and compares device and inode with the open file's."""
        resolved = self.contain(path, label)
        try:
            now, opened = os.stat(resolved), os.fstat(fd)
        except OSError as exc:
            raise CellfeedError(f"{label or self.relative_unresolved(Path(path))}: changed while being opened ({exc.strerror})") from None
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            raise CellfeedError(f"{label or self.relative_unresolved(Path(path))}: was replaced while being opened (a symlink swapped in?); refused")

    def open_dir(self, folder: Path, *, create: bool = False) -> int:
        """A file descriptor of `folder` (made if asked), checked to be inside the root after opening.

        Files made through it (`os.open(name, dir_fd=fd)`, `os.mkdir(name, dir_fd=fd)`,
        `os.replace(a, b, src_dir_fd=fd, dst_dir_fd=fd)`) land inside the root even if a folder
        on the way is swapped for a symlink afterwards."""
        folder = Path(folder)
        label = self.relative_unresolved(folder)
        if create:
            resolved = self.contain(folder)
            try:
                resolved.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CellfeedError(f"cannot make folder {label!r}: {exc.strerror or exc}") from None
        resolved = self.contain(folder)
        try:
            fd = os.open(resolved, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise CellfeedError(f"cannot open folder {label!r}: {exc.strerror or exc}") from None
        try:
            self.check_opened(folder, fd)
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise CellfeedError(f"{label!r} is not a folder")
        except BaseException:
            os.close(fd)
            raise
        return fd

    # names for people ------------------------------------------------------------------------

    def relative(self, path: Path) -> str:
        """The path as clients name it: relative to the root."""
        try:
            return str(Path(path).resolve().relative_to(self.path))
        except (ValueError, OSError):
            return self.relative_unresolved(Path(path))

    def relative_unresolved(self, path: Path) -> str:
        """The path relative to the root without following links (a link's own name); a path
        outside shows its last part only, never the server's folder tree."""
        path = Path(path)
        try:
            return str(path.relative_to(self.path)) if path.is_absolute() else str(path)
        except ValueError:
            return path.name

    def _realpath(self, path: Path, shown: str) -> Path:
        try:
            return Path(os.path.realpath(path, strict=False))
        except (OSError, ValueError) as exc:  # a loop of links, a name the OS refuses
            raise CellfeedError(f"path {_short(shown)!r} cannot be resolved: {getattr(exc, 'strerror', None) or exc}") from None
