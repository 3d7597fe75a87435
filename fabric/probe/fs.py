"""Reading files under a root without ever crashing on what is there.

Every reader takes a root (``/sys``, ``/proc`` or a captured copy of them) and reads
through a :class:`Root`. A missing optional file is simply absent; a file that cannot
be read, or whose content a parser rejects, becomes a :class:`ProbeWarning` naming
the file, and the reader carries on without that value.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from aitrain.fabric.topology import ProbeWarning

T = TypeVar("T")

# Kernel attributes that legitimately fail to read: EINVAL for ``speed`` of a down
# link, ENODATA/EINVAL for the type/ndev of an empty GID slot, EOPNOTSUPP for
# attributes a driver does not implement, EBUSY/EAGAIN transiently.
_QUIET_ERRNOS = {errno.EINVAL, errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENXIO}

MAX_ATTR_BYTES = 1 << 20  # sysfs attributes are one page; anything huge is not one


class Root:
    """A directory tree standing in for ``/sys`` or ``/proc``."""

    def __init__(self, path: str | os.PathLike[str], warnings: list[ProbeWarning]) -> None:
        self.path = Path(path)
        self.warnings = warnings

    def __repr__(self) -> str:
        return f"Root({str(self.path)!r})"

    def exists(self) -> bool:
        return self.path.is_dir()

    def join(self, rel: str | os.PathLike[str]) -> Path:
        rel = os.fspath(rel)
        return self.path / rel.lstrip("/")

    def warn(self, path: str | os.PathLike[str], message: str, kind: str = "bad-file-content") -> None:
        self.warnings.append(ProbeWarning(path=str(path), message=message, kind=kind))

    # -- reading -----------------------------------------------------------------------

    def read_bytes(self, rel: str | os.PathLike[str], *, quiet: bool = False) -> bytes | None:
        """The file's bytes, or None when it is missing or unreadable (warned)."""
        path = self.join(rel)
        try:
            with open(path, "rb") as fh:
                return fh.read(MAX_ATTR_BYTES)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            if not quiet:
                self.warn(path, "expected a file, found a directory", "unreadable-file")
            return None
        except OSError as e:
            if not quiet and e.errno not in _QUIET_ERRNOS:
                self.warn(path, f"cannot read: {e.strerror or e}", "unreadable-file")
            return None

    def read_text(self, rel: str | os.PathLike[str], *, quiet: bool = False) -> str | None:
        """The file as text (undecodable bytes replaced; NUL bytes are a warning)."""
        data = self.read_bytes(rel, quiet=quiet)
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
                self.warn(self.join(rel), f"has several lines; using the first ({first!r})")
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
            if not quiet_missing and not self.join(rel).exists():
                self.warn(self.join(rel), "is missing", "unreadable-file")
            return None
        try:
            return parser(value)
        except (ValueError, OverflowError) as e:
            if not quiet:
                self.warn(self.join(rel), f"unexpected content {_clip(value)}: {e}")
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
        return self.join(rel).is_dir()

    def is_file(self, rel: str | os.PathLike[str]) -> bool:
        return self.join(rel).is_file()

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
        except (OSError, ValueError):
            return []


def _clip(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
