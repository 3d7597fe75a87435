"""Readers for host settings, each relative to a proc root and a sysfs root.

Every reader returns ``None`` (or an empty result) when the setting is not
exposed, so a VM without cpufreq or a captured tree without ``/proc/self`` is
reported as "not available" instead of crashing. Nothing here writes.
"""

from __future__ import annotations

import os
import re
import resource
import socket
from dataclasses import dataclass
from pathlib import Path

from aitrain.fabric.probe.fs import MAX_TABLE_BYTES, read_regular

LIVE_PROC = Path("/proc")
LIVE_SYS = Path("/sys")
LIVE_SHM = Path("/dev/shm")


@dataclass(frozen=True)
class HostPaths:
    """Where to read a host from: the live one, or a captured tree in tests.

    ``shm`` is the tmpfs to measure; ``None`` means ``/dev/shm`` on the live host
    and the ``size=`` option of the ``/dev/shm`` mount in ``<proc>/self/mounts``
    for a captured tree.
    """

    proc: Path = LIVE_PROC
    sys: Path = LIVE_SYS
    shm: Path | None = None

    @property
    def is_live(self) -> bool:
        """True when ``proc`` is this machine's ``/proc`` (limits then come from getrlimit)."""
        return os.path.realpath(self.proc) == str(LIVE_PROC)

    def sysctl_path(self, name: str) -> Path:
        """``kernel.numa_balancing`` -> ``<proc>/sys/kernel/numa_balancing``."""
        return self.proc / "sys" / name.replace(".", "/")


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is missing, unreadable, not UTF-8, not a regular
    file (a FIFO would block for ever) or bigger than any real kernel table."""
    try:
        return read_regular(path, MAX_TABLE_BYTES).decode()
    except (OSError, UnicodeDecodeError):
        return None


def normalize(raw: str) -> str:
    """Kernel values compare by their tokens: ``"32768\\t60999\\n"`` == ``"32768 60999"``."""
    return " ".join(raw.split())


def read_sysctl(paths: HostPaths, name: str) -> str | None:
    raw = read_text(paths.sysctl_path(name))
    return None if raw is None else normalize(raw)


def parse_selector(raw: str) -> str:
    """``"always [madvise] never"`` -> ``"madvise"``; a plain value is returned stripped."""
    m = re.search(r"\[([^\]]+)\]", raw)
    return str(m.group(1)) if m else normalize(raw)


THP_DIR = "kernel/mm/transparent_hugepage"


def thp_path(paths: HostPaths, name: str) -> Path:
    return paths.sys / THP_DIR / name


def read_thp(paths: HostPaths, name: str) -> tuple[str, list[str]] | None:
    """(selected, choices) of ``transparent_hugepage/<name>``, or None."""
    raw = read_text(thp_path(paths, name))
    if raw is None or not raw.strip():
        return None
    choices = [c.strip("[]") for c in raw.split()]
    return parse_selector(raw), choices


def governor_paths(paths: HostPaths) -> dict[int, Path]:
    """cpu number -> its ``cpufreq/scaling_governor`` file, for the CPUs that have one."""
    cpu_dir = paths.sys / "devices/system/cpu"
    found: dict[int, Path] = {}
    try:
        entries = list(cpu_dir.iterdir())
    except OSError:
        return found
    for entry in entries:
        m = re.fullmatch(r"cpu(\d+)", entry.name)
        gov = entry / "cpufreq/scaling_governor"
        if m and os.path.isfile(gov):  # os.path: Path.is_file raises under an untraversable dir
            found[int(m.group(1))] = gov
    return dict(sorted(found.items()))


def read_governors(paths: HostPaths) -> dict[int, str]:
    """cpu number -> governor name; empty when cpufreq is not exposed (VMs, some BMCs)."""
    out: dict[int, str] = {}
    for cpu, path in governor_paths(paths).items():
        raw = read_text(path)
        if raw is not None and raw.strip():
            out[cpu] = raw.strip()
    return out


def available_governors(paths: HostPaths, cpu: int) -> list[str] | None:
    raw = read_text(paths.sys / f"devices/system/cpu/cpu{cpu}/cpufreq/scaling_available_governors")
    return None if raw is None else raw.split()


@dataclass(frozen=True)
class Limit:
    """A resource limit; ``None`` means unlimited."""

    soft: int | None
    hard: int | None


_LIMIT_ROWS = {"memlock": "Max locked memory", "nofile": "Max open files"}
_RLIMITS = {"memlock": resource.RLIMIT_MEMLOCK, "nofile": resource.RLIMIT_NOFILE}


def read_limit(paths: HostPaths, name: str) -> Limit | None:
    """``memlock`` or ``nofile``: getrlimit on the live host, ``<proc>/self/limits`` otherwise."""
    if paths.is_live:
        soft, hard = resource.getrlimit(_RLIMITS[name])
        inf = resource.RLIM_INFINITY
        return Limit(None if soft == inf else soft, None if hard == inf else hard)
    raw = read_text(paths.proc / "self/limits")
    if raw is None:
        return None
    row = _LIMIT_ROWS[name]
    for line in raw.splitlines():
        if line.startswith(row):
            fields = line[len(row):].split()
            if len(fields) < 2:
                return None
            try:
                return Limit(*(None if f == "unlimited" else int(f) for f in fields[:2]))
            except ValueError:
                return None
    return None


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_tmpfs_size(option: str) -> int | None:
    """The ``size=`` mount option in bytes (``65536k``, ``64m``, ``2g``); percentages are None."""
    m = re.fullmatch(r"(\d+)([kmgtKMGT]?)", option)
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()] if m else None


def read_shm_size(paths: HostPaths) -> tuple[int, str] | None:
    """(size in bytes, where it was read) of the shared-memory tmpfs, or None."""
    shm = paths.shm if paths.shm is not None else (LIVE_SHM if paths.is_live else None)
    if shm is not None:
        try:
            st = os.statvfs(shm)
        except OSError:
            return None
        return st.f_frsize * st.f_blocks, f"statvfs({shm})"
    for mounts in (paths.proc / "self/mounts", paths.proc / "mounts"):
        raw = read_text(mounts)
        if raw is None:
            continue
        for line in raw.splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[1] == str(LIVE_SHM):
                for opt in fields[3].split(","):
                    if opt.startswith("size="):
                        size = parse_tmpfs_size(opt[5:])
                        if size is not None:
                            return size, str(mounts)
        return None
    return None


def process_names(paths: HostPaths) -> set[str] | None:
    """The ``comm`` of every process under the proc root; None when there are no pid dirs."""
    try:
        pids = [e for e in paths.proc.iterdir() if e.name.isdigit()]
    except OSError:
        return None
    if not pids:
        return None
    names: set[str] = set()
    for pid in pids:
        comm = read_text(pid / "comm")
        if comm is not None:
            names.add(comm.strip())
    return names


def read_meminfo(paths: HostPaths) -> dict[str, int]:
    """``/proc/meminfo`` as name -> value (kB lines in bytes, counts as they are)."""
    raw = read_text(paths.proc / "meminfo")
    out: dict[str, int] = {}
    if raw is None:
        return out
    for line in raw.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if not fields or not fields[0].isdigit():
            continue
        value = int(fields[0])
        out[name.strip()] = value * 1024 if len(fields) > 1 and fields[1] == "kB" else value
    return out


@dataclass(frozen=True)
class CgroupInfo:
    """Which cgroup hierarchy the host runs and the controllers available in it.

    ``version`` is 2 (unified only), 1 (legacy, or hybrid with ``hybrid`` set).
    """

    version: int
    controllers: tuple[str, ...]
    hybrid: bool = False
    source: str = ""


_V1_NOT_CONTROLLERS = {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec", "xattr",
                       "clone_children", "noprefix", "cpuset_v2_mode", "seclabel"}


def _sys_path(paths: HostPaths, mount_point: str) -> Path | None:
    if mount_point == "/sys" or mount_point.startswith("/sys/"):
        return paths.sys / mount_point[len("/sys/"):]
    return None


def read_cgroup(paths: HostPaths) -> CgroupInfo | None:
    """The cgroup version and controllers from ``<proc>/self/mountinfo``, else from sysfs."""
    mountinfo = paths.proc / "self/mountinfo"
    raw = read_text(mountinfo)
    v1: set[str] = set()
    v2_mount: str | None = None
    if raw is not None:
        for line in raw.splitlines():
            pre, sep, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            if not sep or len(fields) < 5 or len(tail) < 3:
                continue
            if tail[0] == "cgroup2":
                v2_mount = v2_mount or fields[4]
            elif tail[0] == "cgroup":
                v1.update(o for o in tail[2].split(",")
                          if o not in _V1_NOT_CONTROLLERS and "=" not in o)
    if v1:
        return CgroupInfo(1, tuple(sorted(v1)), hybrid=v2_mount is not None, source=str(mountinfo))
    candidates = [_sys_path(paths, v2_mount)] if v2_mount else [paths.sys / "fs/cgroup"]
    for root in candidates:
        if root is None:
            continue
        ctl = read_text(root / "cgroup.controllers")
        if ctl is not None:
            return CgroupInfo(2, tuple(sorted(ctl.split())), source=str(root / "cgroup.controllers"))
    if v2_mount:
        return CgroupInfo(2, tuple(_enabled_controllers(paths)), source=str(mountinfo))
    return None


def _enabled_controllers(paths: HostPaths) -> list[str]:
    raw = read_text(paths.proc / "cgroups") or ""
    out = []
    for line in raw.splitlines():
        fields = line.split()
        if len(fields) == 4 and not line.startswith("#") and fields[3] == "1":
            out.append(fields[0])
    return sorted(out)


def has_rdma_devices(paths: HostPaths) -> bool:
    try:
        return any((paths.sys / "class/infiniband").iterdir())
    except OSError:
        return False


def read_hostname(paths: HostPaths) -> str:
    raw = read_text(paths.proc / "sys/kernel/hostname")
    if raw and raw.strip():
        return raw.strip()
    return socket.gethostname() if paths.is_live else "unknown"
