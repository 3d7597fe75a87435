"""Small helpers every part of the launcher shares: whole-file writes, free ports, processes."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

# What aitrain writes is its user's own: a run dir holds the job's config, env and logs.
PRIVATE_UMASK = 0o077
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


USER_UMASK_ENV = "AITRAIN_USER_UMASK"  # the umask a user's program gets back (launcher/supervise.py)
_user_umask: list[int] = []


# The errnos of a full or failing disk, or one aitrain may not write: a rank stops without
# @record's error file (launcher/train.py), tracking keeps its spool for a later sync
# (launcher/tracking.py), a failure's hint says what to do about the disk (launcher/agent.py).
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES)


def os_error_text(e: OSError) -> str:
    """``No space left on device (ENOSPC)``: what the system said, and the errno's name."""
    name = errno.errorcode.get(e.errno or 0, "")
    return f"{e.strerror or e}" + (f" ({name})" if name else "")


def describe_os_error(e: OSError, path: Path | str | None = None, doing: str = "write") -> str:
    """``cannot write /x/y: No space left on device (ENOSPC)``."""
    where = path if path is not None else (e.filename or "a file")
    return f"cannot {doing} {where}: {os_error_text(e)}"


def private_umask() -> int:
    """Make every file and directory this process (and every process it starts: node agents,
    ranks, the srun steps) creates its user's only; the umask it had."""
    old = os.umask(PRIVATE_UMASK)
    if not _user_umask:
        _user_umask.append(old)
    return old


def user_umask() -> int | None:
    """The umask the user launched with (before :func:`private_umask`), if it was changed."""
    if os.environ.get(USER_UMASK_ENV, "").isdigit():  # a re-run (sbatch, Jobs API) of a private launch
        return int(os.environ[USER_UMASK_ENV], 8)
    return _user_umask[0] if _user_umask else None


def private_dir(path: Path | str) -> Path:
    """``path`` (and missing parents) created; ``path`` itself made 0700 (Hydra, or an earlier
    attempt, may have made it already with another mode)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    if path.stat().st_mode & 0o777 != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)
    return path


def write_atomic(path: Path | str, text: str, mode: int = PRIVATE_FILE) -> None:
    """Write ``path`` so that a reader sees the old or the new text, never part of it.
    ``mode``: the file's permissions, whatever the umask (default 0600: the user's only)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # a leftover tmp file keeps its mode through O_TRUNC
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
    finally:
        if fd >= 0:
            os.close(fd)
    os.replace(tmp, path)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``host`` now (the kernel's choice)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def random_port() -> int:
    """A high port for a rendezvous on another host (or network namespace), where this process
    cannot ask the kernel for a free one; free in practice."""
    import random

    return random.randint(20000, 45000)


def port_on(host: str) -> int:
    """A free port at ``host`` when it is this machine's address, else :func:`random_port`."""
    try:
        return free_port(host)
    except OSError:
        return random_port()


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22):
    with the pid, it names one process even after the pid is reused. None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # a zombie has ended
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start: int | None = None) -> bool:
    """The process runs (not a zombie) and, when ``start`` is given, is the one that started then."""
    now = process_start(pid)
    return now is not None and (start is None or now == start)
