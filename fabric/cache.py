"""Probe and check results cached per host fingerprint, so a relaunch does not pay again.

The probe cache key is a *cheap* fingerprint: a few dozen small reads (boot id,
hostname, kernel, routes and addresses, limits, loaded modules, each NIC's state/MTU/
MAC and each RDMA port's state/rate/link layer, torch version). Anything that would
change a check's verdict and can change without a reboot is in it, so a port going
down or an MTU change misses the cache. What only changes across a reboot (GPUs, PCIe
layout, GID tables follow addresses) is covered by the boot id. Entries also expire
after ``max_age_s``.

The check cache key is the sorted full fingerprints of the hosts plus the options.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aitrain import __version__
from aitrain.errors import FabricError
from aitrain.fabric.checks import FINDING_IDS, CheckOptions, check_with
from aitrain.fabric.findings import Finding, Severity, has_errors
from aitrain.fabric.probe import probe, resolve_roots
from aitrain.fabric.probe.fs import read_regular
from aitrain.fabric.topology import SCHEMA_VERSION, Cluster, HostTopology

DEFAULT_MAX_AGE_S = 24 * 3600

_PROC_FILES = (
    "sys/kernel/hostname", "sys/kernel/osrelease", "sys/kernel/random/boot_id",
    "net/route", "net/ipv6_route", "net/if_inet6", "net/fib_trie", "self/limits",
    "driver/nvidia/version",
)
_NET_ATTRS = ("operstate", "mtu", "address")
_PORT_ATTRS = ("state", "phys_state", "rate", "link_layer")


def default_cache_dir() -> Path:
    if os.environ.get("AITRAIN_CACHE_DIR"):
        return Path(os.environ["AITRAIN_CACHE_DIR"]) / "fabric"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aitrain" / "fabric"


def _read(path: Path, limit: int = 1 << 20) -> bytes:
    """The first ``limit`` bytes of a regular file; a FIFO or device is never opened."""
    try:
        return read_regular(path, limit, prefix=True)
    except OSError:
        return b"<unreadable>"


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def host_key(
    sysfs_root: str | os.PathLike[str] = "/sys",
    proc_root: str | os.PathLike[str] | None = "/proc",
    **options: Any,
) -> str:
    """The cheap fingerprint of a host as a probe with ``options`` would see it."""
    sys_path, proc_path = resolve_roots(sysfs_root, proc_root)
    h = hashlib.sha256()

    def feed(label: str, data: bytes | str) -> None:
        h.update(label.encode() + b"\0")
        h.update(data if isinstance(data, bytes) else data.encode())
        h.update(b"\0")

    feed("version", f"{__version__}/{SCHEMA_VERSION}")
    feed("roots", f"{sys_path.resolve()}|{proc_path.resolve() if proc_path else ''}")
    feed("options", json.dumps(options, sort_keys=True, default=str))
    if proc_path is not None:
        for rel in _PROC_FILES:
            feed(rel, _read(proc_path / rel))
        modules = _read(proc_path / "modules").decode(errors="replace")
        feed("modules", " ".join(sorted(line.split(" ", 1)[0] for line in modules.splitlines())))
    for name in _listdir(sys_path / "class" / "net"):
        for attr in _NET_ATTRS:
            feed(f"net/{name}/{attr}", _read(sys_path / "class" / "net" / name / attr))
    for dev in _listdir(sys_path / "class" / "infiniband"):
        ports = sys_path / "class" / "infiniband" / dev / "ports"
        feed(f"ib/{dev}", _read(sys_path / "class" / "infiniband" / dev / "fw_ver"))
        for port in _listdir(ports):
            for attr in _PORT_ATTRS:
                feed(f"ib/{dev}/{port}/{attr}", _read(ports / port / attr))
    try:
        feed("torch", importlib.metadata.version("torch"))
    except importlib.metadata.PackageNotFoundError:
        feed("torch", "none")
    return h.hexdigest()[:32]


@dataclass
class FabricCache:
    """A directory of ``probe-<key>.json`` and ``check-<key>.json`` files."""

    directory: Path = field(default_factory=default_cache_dir)
    max_age_s: float = DEFAULT_MAX_AGE_S
    read_only: bool = False  # use what is cached, store nothing (a dry run writes nothing)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)

    # -- storage -------------------------------------------------------------------

    def _path(self, kind: str, key: str) -> Path:
        return self.directory / f"{kind}-{key}.json"

    def _load(self, kind: str, key: str) -> Any | None:
        path = self._path(kind, key)
        try:
            if time.time() - path.stat().st_mtime > self.max_age_s:
                return None
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # missing, unreadable or corrupt: probe again

    def _store(self, kind: str, key: str, data: Any) -> None:
        if self.read_only:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self._path(kind, key)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home is no reason to fail a launch

    def clear(self) -> int:
        removed = 0
        for path in self.directory.glob("*.json"):
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
        return removed

    # -- probe / check ---------------------------------------------------------------

    def probe(
        self,
        sysfs_root: str | os.PathLike[str] = "/sys",
        proc_root: str | os.PathLike[str] | None = "/proc",
        **probe_kwargs: Any,
    ) -> tuple[HostTopology, bool]:
        """(topology, True if it came from the cache)."""
        key = host_key(sysfs_root, proc_root, **probe_kwargs)
        data = self._load("probe", key)
        if data is not None:
            try:
                return HostTopology.from_dict(data), True
            except (TypeError, ValueError):
                pass
        topo = probe(sysfs_root, proc_root, **probe_kwargs)
        self._store("probe", key, topo.to_dict())
        return topo, False

    def check(self, cluster: Cluster, opts: CheckOptions) -> tuple[list[Finding], bool]:
        blob = json.dumps(
            {
                "hosts": sorted(h.fingerprint() for h in cluster.hosts),
                "warnings": sorted(len(h.warnings) for h in cluster.hosts),
                "options": asdict(opts),
                "rules": sorted(FINDING_IDS),
                "version": __version__,
            },
            sort_keys=True,
        )
        key = hashlib.sha256(blob.encode()).hexdigest()[:32]
        data = self._load("check", key)
        if isinstance(data, list):
            try:
                return [Finding.from_dict(d) for d in data], True
            except (TypeError, ValueError, KeyError):
                pass
        findings = check_with(cluster, opts)
        self._store("check", key, [f.to_dict() for f in findings])
        return findings, False


# --------------------------------------------------------------------------- preflight


@dataclass
class PreflightResult:
    cluster: Cluster
    findings: list[Finding]
    probe_cache_hits: int = 0
    check_cache_hit: bool = False

    @property
    def ok(self) -> bool:
        return not has_errors(self.findings)

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.WARNING]


ON_ERROR_STOP = ("fail", "error", "stop")
ON_ERROR_GO = ("warn", "ignore")


def preflight(
    topologies: Iterable[HostTopology] | None = None,
    *,
    on_error: str = "fail",
    expected_rate_gbps: float | None = None,
    rendezvous: str | None = None,
    cache: FabricCache | None = None,
    use_cache: bool = True,
) -> PreflightResult:
    """Probe (this host, unless ``topologies`` come from the job's nodes) and check,
    through the cache. With ``on_error="fail"`` error findings raise a
    :class:`FabricError` listing them; ``"warn"`` returns them for the caller to log.

    Multi-node launchers run ``aitrain fabric probe --json --cache`` on every node,
    parse the outputs with ``loads_topologies`` and pass them here.
    """
    if on_error not in ON_ERROR_STOP + ON_ERROR_GO:
        raise FabricError(
            f"fabric.on_error={on_error!r} is not one of {', '.join(ON_ERROR_STOP + ON_ERROR_GO)}",
            "use fabric.on_error=fail (stop the launch on errors) or fabric.on_error=warn",
        )
    cache = cache if cache is not None else FabricCache()
    hits = 0
    if topologies is None:
        if use_cache:
            topo, hit = cache.probe(rendezvous=rendezvous)
            hits += int(hit)
        else:
            topo = probe(rendezvous=rendezvous)
        hosts = [topo]
    else:
        hosts = list(topologies)
    cluster = Cluster(hosts=hosts)
    opts = CheckOptions(expected_rate_gbps=expected_rate_gbps, rendezvous=rendezvous)
    if use_cache:
        findings, check_hit = cache.check(cluster, opts)
    else:
        findings, check_hit = check_with(cluster, opts), False
    result = PreflightResult(cluster=cluster, findings=findings, probe_cache_hits=hits,
                             check_cache_hit=check_hit)
    if not result.ok and on_error in ON_ERROR_STOP:
        raise FabricError(summarize_errors(result.errors(), len(hosts)),
                          "fix the problems above (each has its own hint), or launch anyway "
                          "with fabric.on_error=warn")
    return result


def summarize_errors(errors: Sequence[Finding], hosts: int, limit: int = 10) -> str:
    lines = [f"fabric check found {len(errors)} error(s) on {hosts} host(s):"]
    for f in errors[:limit]:
        lines.append(f"  [{f.id}] {f.host} {f.subject}: {f.message}")
        if f.hint:
            lines.append(f"      fix: {f.hint}")
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more (`aitrain fabric check` lists them all)")
    return "\n".join(lines)
