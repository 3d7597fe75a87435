"""Reading files under a root without ever crashing or hanging on what is there.

Every reader takes a root (``/sys``, ``/proc`` or a captured copy of them) and reads
through a :class:`Root`. A missing optional file is simply absent; a file that cannot
be read, or whose content a parser rejects, becomes a :class:`ProbeWarning` naming
the file, and the reader carries on without that value.

Only regular files are read (every sysfs attribute and procfs table is one): a FIFO
would block the probe for ever, a device can block or act when opened. Reads are
capped, so a huge file costs what its first bytes cost. Nothing here walks a tree
recursively, so a symlink loop is only ever one failed lookup (``ELOOP``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from aitrain.fabric.topology import ProbeWarning

T = TypeVar("T")

# Kernel attributes that legitimately fail to read: EINVAL for ``speed`` of a down
# link, ENODATA/EINVAL for the type/ndev of an empty GID slot, EOPNOTSUPP for
# attributes a driver does not implement, EBUSY/EAGAIN transiently.
_QUIET_ERRNOS = {errno.EINVAL, errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENXIO}

# A sysfs attribute is one page (64 KiB with arm64's largest pages); anything bigger is not one.
MAX_ATTR_BYTES = 64 << 10
# procfs tables (routes, fib_trie, mounts, modules) of a real training host are far smaller.
MAX_TABLE_BYTES = 4 << 20

_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFLNK: "a symlink",
}


def file_kind(mode: int) -> str:
    """``"a FIFO"``, ``"a directory"``, ... for an ``st_mode``; ``"a regular file"``."""
    return _FILE_KINDS.get(stat.S_IFMT(mode), "a regular file")


class NotRegularFileError(OSError):
    """The path is a FIFO, socket, device or directory where a regular file was expected."""

    def __init__(self, path: str | os.PathLike[str], mode: int) -> None:
        self.kind = file_kind(mode)
        super().__init__(errno.EINVAL, f"is {self.kind}, not a regular file", os.fspath(path))


class OutsideRootError(OSError):
    """The path is a symlink to a file outside the root it was read under."""

    def __init__(self, path: str | os.PathLike[str], target: str) -> None:
        self.target = target
        super().__init__(errno.EACCES, f"is a link out of the tree (to {target})", os.fspath(path))


class FileTooLargeError(OSError):
    """The file holds more than the reader's cap."""

    def __init__(self, path: str | os.PathLike[str], limit: int) -> None:
        self.limit = limit
        super().__init__(errno.EFBIG, f"is larger than {_size(limit)}", os.fspath(path))


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10} KiB"


def _inside(path: str, top: str) -> bool:
    return top == os.sep or path == top or path.startswith(top + os.sep)


def open_regular(path: str | os.PathLike[str], *, within: str | None = None) -> int:
    """A read-only fd of the regular file at ``path`` (symlinks followed).

    Anything else raises :class:`NotRegularFileError` before it is opened: opening a
    FIFO blocks until a writer comes, and opening a device can block or have effects.
    ``O_NONBLOCK`` and the ``fstat`` after opening cover a file swapped in between.
    With ``within`` (a real path), a file that is itself a symlink to a file outside it
    raises :class:`OutsideRootError`: no sysfs attribute is a symlink, and a captured
    tree must not make a probe (often run as root) read and print ``/etc/shadow``.
    """
    if within is not None and os.path.islink(path):
        target = os.path.realpath(path)
        if not _inside(target, within):
            raise OutsideRootError(path, target)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(path, st.st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str], limit: int, *, prefix: bool = False,
                 within: str | None = None) -> bytes:
    """At most ``limit`` bytes of a regular file (see :func:`open_regular`).

    A longer file raises :class:`FileTooLargeError`, unless ``prefix``: then its first
    ``limit`` bytes are returned. Either way no more than ``limit + 1`` bytes are read.
    """
    fd = open_regular(path, within=within)
    try:
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        if not prefix:
            raise FileTooLargeError(path, limit)
        data = data[:limit]
    return data


class Root:
    """A directory tree standing in for ``/sys`` or ``/proc``."""

    def __init__(self, path: str | os.PathLike[str], warnings: list[ProbeWarning],
                 max_bytes: int = MAX_ATTR_BYTES) -> None:
        self.path = Path(path)
        self.warnings = warnings
        self.max_bytes = max_bytes
        """The most a file under this root may hold (a bigger one is warned about and not used)."""
        self._real: str | None = None

    @property
    def real_path(self) -> str:
        """The root with every symlink resolved (what a file link must stay inside)."""
        if self._real is None:
            self._real = os.path.realpath(self.path)
        return self._real

    def __repr__(self) -> str:
        return f"Root({str(self.path)!r})"

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def join(self, rel: str | os.PathLike[str]) -> Path:
        rel = os.fspath(rel)
        return self.path / rel.lstrip("/")

    def warn(self, path: str | os.PathLike[str], message: str, kind: str = "bad-file-content") -> None:
        self.warnings.append(ProbeWarning(path=str(path), message=message, kind=kind))

    # -- reading -----------------------------------------------------------------------

    def read_bytes(self, rel: str | os.PathLike[str], *, quiet: bool = False,
                   limit: int | None = None, prefix: bool = False) -> bytes | None:
        """The file's bytes, or None when it is missing or unreadable (warned).

        Only a regular file is read, and at most ``limit`` (default ``max_bytes``) bytes
        of it: a bigger one is warned about and None, or with ``prefix`` cut to ``limit``.
        """
        path = self.join(rel)
        try:
            return read_regular(path, self.max_bytes if limit is None else limit, prefix=prefix,
                                within=self.real_path)
        except FileNotFoundError:
            return None
        except OutsideRootError as e:
            if not quiet:
                self.warn(path, f"{e.strerror}: not read", "unreadable-file")
            return None
        except NotRegularFileError as e:
            if not quiet:
                found = "found a directory" if e.kind == "a directory" else f"found {e.kind}; not read"
                self.warn(path, f"expected a file, {found}", "unreadable-file")
            return None
        except FileTooLargeError as e:
            if not quiet:
                what = "sysfs attribute" if e.limit <= MAX_ATTR_BYTES else "kernel table"
                self.warn(path, f"{e.strerror}: not a real {what}; not read", "bad-file-content")
            return None
        except OSError as e:
            if not quiet and e.errno not in _QUIET_ERRNOS:
                self.warn(path, f"cannot read: {e.strerror or e}", "unreadable-file")
            return None

    def read_text(self, rel: str | os.PathLike[str], *, quiet: bool = False,
                  limit: int | None = None, prefix: bool = False) -> str | None:
        """The file as text (undecodable bytes replaced; NUL bytes are a warning)."""
        data = self.read_bytes(rel, quiet=quiet, limit=limit, prefix=prefix)
        if data is None:
            return None
        if b"\x00" in data:
            if not quiet:
                self.warn(self.join(rel), "contains NUL bytes: not a text attribute")
            data = data.replace(b"\x00", b"")
        text = data.decode("utf-8", errors="replace")
        if "\ufffd" in text and not quiet:
            self.warn(self.join(rel), "is not valid UTF-8")
        return text

    def read_value(self, rel: str | os.PathLike[str], *, quiet: bool = False) -> str | None:
        """A one-value attribute, whitespace stripped; None when missing or empty.

        Tolerates what captured trees do: no trailing newline, a trailing blank line.
        More than one non-blank line is garbage and is warned about.
        """
        text = self.read_text(rel, quiet=quiet)
        if text is None:
            return None
        value = text.strip()
        if not value:
            if not quiet:
                self.warn(self.join(rel), "is empty", "bad-file-content")
            return None
        if "\n" in value:
            first = value.splitlines()[0].strip()
            if not quiet:
                self.warn(self.join(rel), f"has several lines; using the first ({clip(first)})")
            return first
        return value

    def parse(
        self,
        rel: str | os.PathLike[str],
        parser: Callable[[str], T],
        *,
        quiet_missing: bool = True,
        quiet: bool = False,
    ) -> T | None:
        """Reads a one-value attribute and parses it; a parser ``ValueError`` is warned."""
        value = self.read_value(rel, quiet=quiet)
        if value is None:
            if not quiet_missing and not os.path.exists(self.join(rel)):
                self.warn(self.join(rel), "is missing", "unreadable-file")
            return None
        try:
            return parser(value)
        except (ValueError, OverflowError) as e:
            if not quiet:
                self.warn(self.join(rel), f"unexpected content {clip(value)}: {e}")
            return None

    # -- structure ---------------------------------------------------------------------

    def listdir(self, rel: str | os.PathLike[str] = "") -> list[str]:
        """Sorted entry names; [] when missing or unreadable."""
        path = self.join(rel)
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            self.warn(path, "expected a directory, found a file", "unreadable-file")
            return []
        except OSError as e:
            self.warn(path, f"cannot list: {e.strerror or e}", "unreadable-file")
            return []

    def is_dir(self, rel: str | os.PathLike[str]) -> bool:
        # os.path, not Path: Path.is_dir raises PermissionError under an untraversable dir
        return os.path.isdir(self.join(rel))

    def is_file(self, rel: str | os.PathLike[str]) -> bool:
        return os.path.isfile(self.join(rel))

    def link_target_name(self, rel: str | os.PathLike[str]) -> str | None:
        """The last component of a symlink's target (``device/driver`` -> ``mlx5_core``)."""
        try:
            return os.path.basename(os.readlink(self.join(rel)).rstrip("/")) or None
        except OSError:
            return None

    def resolve(self, rel: str | os.PathLike[str]) -> Path | None:
        """The real path of ``rel``, or None when it does not exist."""
        path = self.join(rel)
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        return real

    def relative_parts(self, real: Path) -> list[str]:
        """``real`` as path components below the root ([] when outside it)."""
        try:
            base = self.path.resolve()
            return list(real.relative_to(base).parts)
        except (OSError, RuntimeError, ValueError):  # RuntimeError: a symlink loop (Python < 3.13)
            return []


def clip(text: str, limit: int = 60) -> str:
    """``repr`` of at most ``limit`` characters of ``text`` (garbage stays readable in a warning)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
