"""``probe()``: read one host's fabric into a :class:`HostTopology`.

Readers, one module each, all taking a root so a captured tree probes like the live
host: ``net`` (``/sys/class/net``), ``routes`` (``/proc/net``), ``infiniband``
(``/sys/class/infiniband``), ``verbs`` (pyverbs), ``pci`` (links, ACS), ``gpu``
(NVML or PCI class), ``system`` (procfs host facts and software versions).

Note: ``aitrain.fabric.probe`` the *function* shadows this package as an attribute of
``aitrain.fabric``; import readers with ``from aitrain.fabric.probe.net import ...``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from aitrain.errors import FabricError
from aitrain.fabric.probe.fs import MAX_TABLE_BYTES, Root
from aitrain.fabric.topology import HostTopology, ProbeWarning

LIVE_SYSFS = Path("/sys")
LIVE_PROCFS = Path("/proc")
_NO_ROOT = "/nonexistent/aitrain-no-procfs"


def _is_live(path: Path) -> bool:
    try:
        return path.resolve() == LIVE_SYSFS
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def _isdir(path: Path) -> bool:
    # os.path.isdir, not Path.is_dir: that raises PermissionError below an untraversable dir
    return os.path.isdir(path)


def check_readable(path: Path, what: str = "", flag: str = "") -> None:
    """A root the probe cannot list is an error, not a host without devices."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                os.lstat(entry.path)  # a listable but untraversable (no x bit) dir fails here
                break
    except OSError as e:
        elsewhere = f", or point {flag} at another copy" if flag else ""
        raise FabricError(
            f"cannot read {what + ' ' if what else ''}{path}: {e.strerror or e}",
            f"run as a user who can read it (sudo), or make the tree readable "
            f"(chmod -R a+rX {path}){elsewhere}",
        ) from e


def resolve_roots(
    sysfs_root: str | os.PathLike[str], proc_root: str | os.PathLike[str] | None
) -> tuple[Path, Path | None]:
    """(sysfs root, procfs root or None). A host tree (a directory holding ``sys/``
    and maybe ``proc/``) is accepted in place of a sysfs root. When the sysfs root is
    a captured tree and ``proc_root`` is the live default, the tree's own ``proc/``
    next to ``sys/`` is used instead (or none): never mix a capture with this host.
    A root that is missing, not a directory or unreadable raises :class:`FabricError`."""
    sys_path = Path(sysfs_root)
    if not os.path.exists(sys_path):
        dangling = os.path.islink(sys_path)
        raise FabricError(
            f"sysfs root {sys_path} " + ("is a symlink to nowhere (or a symlink loop)" if dangling
                                         else "does not exist"),
            "pass --sysfs-root pointing at /sys or a captured copy of it "
            "(a directory containing class/), or a host tree containing sys/ and proc/",
        )
    if not _isdir(sys_path):
        raise FabricError(f"sysfs root {sys_path} is not a directory",
                          "a path-map JSON goes through aitrain.fabric.sources.load_hosts")
    check_readable(sys_path, "the sysfs root", "--sysfs-root")
    explicit_proc = proc_root is not None and Path(proc_root) != LIVE_PROCFS
    if not _isdir(sys_path / "class") and _isdir(sys_path / "sys"):
        if not explicit_proc:
            proc_root = sys_path / "proc" if _isdir(sys_path / "proc") else None
            explicit_proc = proc_root is not None
        sys_path = sys_path / "sys"
        check_readable(sys_path, "the sysfs root", "--sysfs-root")
    proc: Path | None
    if _is_live(sys_path):
        proc = Path(proc_root) if proc_root is not None else LIVE_PROCFS
    elif explicit_proc and proc_root is not None:
        proc = Path(proc_root)
    else:
        sibling = sys_path.parent / "proc"
        proc = sibling if sys_path.name == "sys" and _isdir(sibling) else None
    if proc is not None and not _isdir(proc):
        raise FabricError(
            f"procfs root {proc} does not exist" if not os.path.lexists(proc)
            else f"procfs root {proc} is not a directory",
            "pass --proc-root pointing at /proc or a captured copy of it, or leave it out",
        )
    if proc is not None:
        check_readable(proc, "the procfs root", "--proc-root")
    return sys_path, proc


def probe(
    sysfs_root: str | os.PathLike[str] = "/sys",
    proc_root: str | os.PathLike[str] | None = "/proc",
    *,
    rendezvous: str | None = None,
    hostname: str | None = None,
    pyverbs: bool | None = None,
    nvml: bool | None = None,
    software: bool | None = None,
) -> HostTopology:
    """Reads this host's (or a captured tree's) fabric.

    ``pyverbs``, ``nvml`` and ``software`` (torch/CUDA/NCCL versions) default to
    on for the live ``/sys`` and off for a captured tree, since they describe the
    machine the probe runs on. ``rendezvous`` records which interface reaches that
    address. Unreadable or garbage files become ``topology.warnings``; a missing root
    raises :class:`FabricError`.
    """
    from aitrain.fabric.probe import gpu as gpu_reader
    from aitrain.fabric.probe import infiniband, net, pci, routes, system, verbs

    sys_path, proc_path = resolve_roots(sysfs_root, proc_root)
    live = _is_live(sys_path)
    warnings: list[ProbeWarning] = []
    sys = Root(sys_path, warnings)
    proc = Root(proc_path if proc_path is not None else _NO_ROOT, warnings, max_bytes=MAX_TABLE_BYTES)
    if not sys.is_dir("class"):
        sys.warn(sys_path, "has no class/ directory: is this a sysfs tree?", "unreadable-file")

    topo = HostTopology(warnings=warnings)
    topo.sources = {"sysfs_root": str(sys_path), "proc_root": str(proc_path) if proc_path else "none"}

    state = routes.read_net_state(proc)
    topo.routes, topo.routes_known = state.routes, state.routes_known
    topo.nics = net.read_nics(sys, state)
    if live and proc_path == LIVE_PROCFS:
        # /sys/class/net belongs to the namespace that mounted sysfs (nsenter --net
        # keeps the root's): take this namespace's interfaces from the kernel.
        from aitrain.fabric.probe.netns import reconcile_nics

        topo.nics, topo.sources["net"] = reconcile_nics(topo.nics, sys, state.ipv4, state.ipv6)
    topo.rdma_devices = infiniband.read_rdma_devices(sys, topo.nics)

    if pyverbs if pyverbs is not None else live:
        result = verbs.read_verbs_devices()
        warnings.extend(result.warnings)
        topo.rdma_devices = verbs.merge(topo.rdma_devices, result.devices, warnings)
        topo.sources["pyverbs"] = result.status
    else:
        topo.sources["pyverbs"] = "not-used"

    nvml_result = None
    if nvml if nvml is not None else live:
        nvml_result = gpu_reader.read_nvml_gpus(sys, warnings)
    if nvml_result is not None:
        topo.gpus = nvml_result[0]
        topo.sources["gpus"] = "nvml"
    else:
        topo.gpus = gpu_reader.read_sysfs_gpus(sys)
        topo.sources["gpus"] = "sysfs"

    targets: dict[str, str] = {}
    for nic in topo.nics:
        if nic.pci_address and not nic.virtual:
            targets[nic.pci_address] = "nic"
    for dev in topo.rdma_devices:
        if dev.pci_address:
            targets[dev.pci_address] = "nic"
    for g in topo.gpus:
        if g.pci_address:
            targets[g.pci_address] = "gpu"
    topo.pci_devices = pci.read_pci_devices(sys, targets)
    for g in topo.gpus:
        if g.numa_node is None and (p := topo.pci(g.pci_address)) is not None:
            g.numa_node = p.numa_node

    topo.host = system.read_host_info(sys, proc, software=software if software is not None else live)
    if nvml_result is not None and nvml_result[1] and not topo.host.driver_version:
        topo.host.driver_version = nvml_result[1]
    topo.hostname = hostname or _hostname(proc, topo, sys_path, live)

    if rendezvous:
        address = routes.resolve_address(rendezvous) if live else rendezvous
        lookup = topo.route_to(address or rendezvous)
        if live and address:
            lookup = routes.ip_route_get(address) or lookup
        lookup.address = rendezvous
        topo.rendezvous = lookup
    return topo


def _hostname(proc: Root, topo: HostTopology, sys_path: Path, live: bool) -> str:
    from aitrain.fabric.probe.system import read_hostname

    name = read_hostname(proc)
    if name:
        return name
    if live:
        return socket.gethostname()
    # IB node descriptions start with the host name ("node1720 HCA-1")
    for dev in topo.rdma_devices:
        if dev.node_desc and dev.node_desc.split():
            return dev.node_desc.split()[0]
    base = sys_path.parent if sys_path.name == "sys" else sys_path
    return base.name or str(base)


__all__ = ["check_readable", "probe", "resolve_roots"]
