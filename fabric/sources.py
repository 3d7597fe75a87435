"""Turning what a user points at into host topologies.

Accepted, per path:

- a sysfs tree (a directory holding ``class/``), with an optional procfs root;
- a host tree (a directory holding ``sys/`` and optionally ``proc/``);
- a directory of host trees (or of sysfs trees, path maps, probe JSON files): one host each;
- a path-map JSON (``{"/sys/...": "content"}``, as health-check tools capture hosts);
- probe JSON (``aitrain fabric probe --json`` output: ``{"hosts": [...]}``).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from aitrain.errors import FabricError
from aitrain.fabric.probe.fs import FileTooLargeError, NotRegularFileError, read_regular
from aitrain.fabric.topology import HostTopology, loads_topologies

_HINT = (
    "pass /sys, a captured sysfs tree (a directory containing class/), a host tree "
    "(containing sys/ and proc/), a directory of host trees, a path-map JSON or "
    "`aitrain fabric probe --json` output"
)


# The biggest input file read whole: probe JSON of a few thousand hosts.
MAX_INPUT_BYTES = 256 << 20


def _is_sysfs(path: Path) -> bool:
    # os.path.isdir, not Path.is_dir: that raises PermissionError below an untraversable dir
    return os.path.isdir(path / "class")


def _is_host_tree(path: Path) -> bool:
    return os.path.isdir(path / "sys") and not _is_sysfs(path)


def load_hosts(
    paths: Sequence[str | os.PathLike[str]],
    proc_roots: Sequence[str | os.PathLike[str]] = (),
    *,
    rendezvous: str | None = None,
) -> list[HostTopology]:
    """Probes (or loads) every host the paths name, in order. Anything they name that
    cannot be read raises :class:`FabricError` saying which path and why."""
    if proc_roots and len(proc_roots) != len(paths):
        raise FabricError(
            f"{len(proc_roots)} --proc-root for {len(paths)} --sysfs-root",
            "give one --proc-root per --sysfs-root (in the same order), or use host trees "
            "holding sys/ and proc/ side by side",
        )
    hosts: list[HostTopology] = []
    for i, path in enumerate(paths):
        proc = proc_roots[i] if proc_roots else None
        hosts.extend(_load_one(Path(path), proc, rendezvous, top=True))
    return hosts


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        if os.path.islink(path):
            raise FabricError(f"{path} is a symlink to nowhere (or a symlink loop): {e.strerror}", _HINT) from e
        if isinstance(e, FileNotFoundError):
            raise FabricError(f"{path} does not exist", _HINT) from e
        raise FabricError(f"cannot read {path}: {e.strerror or e}",
                          f"make it readable by this user, or run as one who can read it. {_HINT}") from e


def _load_one(path: Path, proc: str | os.PathLike[str] | None, rendezvous: str | None,
              *, top: bool) -> list[HostTopology]:
    from aitrain.fabric.probe import check_readable, probe

    if not stat.S_ISDIR(_stat(path).st_mode):
        return _load_file(path, rendezvous)
    check_readable(path)
    if _is_sysfs(path) or _is_host_tree(path):
        return [probe(path, proc if proc is not None else "/proc", rendezvous=rendezvous)]
    if not top:
        return []
    try:
        children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise FabricError(f"cannot list {path}: {e.strerror or e}",
                          f"make it readable by this user, or run as one who can read it. {_HINT}") from e
    hosts: list[HostTopology] = []
    for child in children:
        if os.path.isdir(child) and (_is_sysfs(child) or _is_host_tree(child)):
            hosts.append(probe(child, "/proc", rendezvous=rendezvous, hostname=None))
        elif child.suffix == ".json" and os.path.isfile(child):  # never a FIFO found by listing
            hosts.extend(_load_file(child, rendezvous))
    if not hosts:
        raise FabricError(f"{path} is neither a sysfs tree nor a directory of host trees", _HINT)
    return hosts


def _read_input(path: Path) -> bytes:
    """The bytes of a file the user named: a regular file, or a pipe they pass on purpose
    (``--from-json <(ssh node aitrain fabric probe --json)``, ``/dev/stdin``), which is
    read like ``cat`` would. Sockets and block devices are refused unopened."""
    mode = _stat(path).st_mode
    if stat.S_ISREG(mode):
        return read_regular(path, MAX_INPUT_BYTES)
    if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        raise NotRegularFileError(path, mode)
    with open(path, "rb") as fh:
        data = fh.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise FileTooLargeError(path, MAX_INPUT_BYTES)
    return data


def _load_file(path: Path, rendezvous: str | None) -> list[HostTopology]:
    from aitrain.fabric.probe import probe
    from aitrain.fabric.probe.pathmap import looks_like_path_map, materialize, path_map_contents

    try:
        raw = _read_input(path)
    except OSError as e:
        raise FabricError(f"cannot read {path}: {e.strerror or e}", _HINT) from e
    try:
        text = raw.decode("utf-8")
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise FabricError(f"{path} is not JSON: {_clip_error(e)}", _HINT) from e
    if looks_like_path_map(data):
        with tempfile.TemporaryDirectory(prefix="aitrain-pathmap-") as tmp:
            materialize(path_map_contents(data, path), tmp)
            topo = probe(tmp, rendezvous=rendezvous)
        # the temporary tree is gone: name the host and the source after the file
        if topo.hostname == Path(tmp).name:
            topo.hostname = path.stem
        topo.sources["sysfs_root"] = str(path)
        for w in topo.warnings:
            w.path = w.path.replace(tmp, f"{path}:")
        return [topo]
    try:
        return loads_topologies(text)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise FabricError(f"{path} is not probe JSON or a path map: {_clip_error(e)}", _HINT) from e


def _clip_error(e: BaseException, limit: int = 200) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def resolve_rendezvous(name: str, hosts: Sequence[HostTopology]) -> str:
    """The rendezvous as an IP address: a literal stays; the name of a probed host
    becomes that host's first global address on a physical NIC; otherwise DNS. A name
    nothing resolves is returned as is (the check reports ``rendezvous-unresolved``)."""
    import ipaddress

    from aitrain.fabric.probe.routes import resolve_address

    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    for host in hosts:
        if host.hostname == name or host.hostname.split(".")[0] == name.split(".")[0]:
            for nic in sorted(host.nics, key=lambda n: (n.virtual, n.name)):
                for iface in nic.addresses():
                    if not (iface.ip.is_loopback or iface.ip.is_link_local):
                        return str(iface.ip)
    return resolve_address(name) or name
