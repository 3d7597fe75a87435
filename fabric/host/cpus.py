"""Online CPUs, NUMA nodes and the CPU set each local rank should run on.

``cpu_sets_for_ranks`` is pure: the launcher reads the topology once with
``read_cpu_topology`` and hands the lists to it, so binding is testable on any
machine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aitrain.errors import FabricError
from aitrain.fabric.host.readers import read_text

BindMode = Literal["numa", "core", "none"]
BIND_MODES: tuple[str, ...] = ("numa", "core", "none")


# One element of a cpulist: N or N-M, maybe with the kernel's ":used/group" stride suffix.
_CPULIST_ELEMENT = re.compile(r"(\d+)(?:-(\d+))?(?::\d+/\d+)?")
# Far above any machine's CPU count; bounds the work a garbage range can cause.
_CPULIST_MAX_SPAN = 1 << 16


def parse_cpulist(text: str) -> list[int]:
    """``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]`` (the kernel's cpulist format); empty -> [].

    The one cpulist parser of aitrain (the probe's readers use it through
    ``aitrain.fabric.probe.parse.parse_cpulist``, which raises ``ValueError`` instead).
    The result is sorted, without repeats. A ``:used/group`` stride suffix (``0-3:2/4``)
    is accepted and ignored: sysfs never prints one. An element that is not ``N`` or
    ``N-M`` with ``M >= N`` (an empty one included), or a list naming more than
    131072 CPUs in all (repeats counted: the work stays linear in the text), raises
    :class:`FabricError`.
    """
    cpus: set[int] = set()
    stripped = text.strip()
    if not stripped:
        return []
    listed = 0  # CPUs named so far, repeats included: bounds the work of any text
    for part in stripped.split(","):
        part = part.strip()
        m = _CPULIST_ELEMENT.fullmatch(part)
        named = repr(part if len(part) <= 40 else part[:40] + "...")
        try:
            lo = int(m.group(1)) if m else None
            hi = int(m.group(2)) if m and m.group(2) else lo
        except ValueError:  # more digits than int() converts
            lo = hi = None
        if lo is None or hi is None:
            problem = f"{named} is not N or N-M"
        elif hi < lo:
            problem = f"{named} is a range that runs backwards"
        elif hi - lo > _CPULIST_MAX_SPAN:
            problem = f"{named} spans more than {_CPULIST_MAX_SPAN} CPUs"
        elif listed + hi - lo + 1 > 2 * _CPULIST_MAX_SPAN:
            problem = f"it names more than {2 * _CPULIST_MAX_SPAN} CPUs"
        else:
            listed += hi - lo + 1
            cpus.update(range(lo, hi + 1))
            continue
        shown = stripped if len(stripped) <= 80 else stripped[:80] + "..."
        raise FabricError(
            f"cannot parse CPU list {shown!r}: {problem}",
            "a cpulist looks like 0-3,8,10-11 (the format of /sys/devices/system/cpu/online)",
        )
    return sorted(cpus)


def format_cpulist(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``"0-3,8"`` (taskset -c / numactl -C / cpuset.cpus format)."""
    out: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def _read_cpulist(path: Path) -> list[int] | None:
    raw = read_text(path)
    if raw is None:
        return None
    try:
        return parse_cpulist(raw)
    except FabricError:
        return None


def read_online_cpus(sysfs_root: Path | str = "/sys") -> list[int]:
    """CPUs in ``<sys>/devices/system/cpu/online``; empty when the file is missing."""
    return _read_cpulist(Path(sysfs_root) / "devices/system/cpu/online") or []


def read_numa_nodes(sysfs_root: Path | str = "/sys") -> dict[int, list[int]]:
    """NUMA node -> its CPUs from ``<sys>/devices/system/node/node*/cpulist``.

    Memory-only nodes (CXL, HBM) have an empty cpulist and are left out; the
    result is empty when the kernel exposes no node directory.
    """
    node_dir = Path(sysfs_root) / "devices/system/node"
    nodes: dict[int, list[int]] = {}
    try:
        entries = list(node_dir.iterdir())
    except OSError:
        return nodes
    for entry in entries:
        m = re.fullmatch(r"node(\d+)", entry.name)
        cpus = _read_cpulist(entry / "cpulist") if m else None
        if m and cpus:
            nodes[int(m.group(1))] = cpus
    return dict(sorted(nodes.items()))


def read_thread_siblings(sysfs_root: Path | str, cpus: Sequence[int]) -> dict[int, list[int]]:
    """cpu -> the hardware threads sharing its core (``topology/thread_siblings_list``)."""
    base = Path(sysfs_root) / "devices/system/cpu"
    out: dict[int, list[int]] = {}
    for cpu in cpus:
        siblings = _read_cpulist(base / f"cpu{cpu}/topology/thread_siblings_list")
        if siblings:
            out[cpu] = siblings
    return out


@dataclass(frozen=True)
class CpuTopology:
    """The CPU facts binding needs, read once per host."""

    online: list[int]
    numa_nodes: dict[int, list[int]] = field(default_factory=dict)
    thread_siblings: dict[int, list[int]] = field(default_factory=dict)


def read_cpu_topology(sysfs_root: Path | str = "/sys") -> CpuTopology:
    online = read_online_cpus(sysfs_root)
    return CpuTopology(online, read_numa_nodes(sysfs_root), read_thread_siblings(sysfs_root, online))


def cpu_sets_for_ranks(
    nranks: int,
    cpus: Sequence[int],
    numa_nodes: dict[int, list[int]] | None = None,
    gpu_numa: Sequence[int | None] | None = None,
    mode: BindMode = "numa",
    *,
    thread_siblings: dict[int, list[int]] | None = None,
) -> list[list[int]]:
    """The CPUs each of ``nranks`` local ranks should be bound to.

    - ``none``: no binding; every rank gets all of ``cpus``.
    - ``core``: disjoint, even split of ``cpus`` in order (hardware threads of one
      core stay together when ``thread_siblings`` is given).
    - ``numa``: disjoint sets, each inside one NUMA node. With ``gpu_numa`` (the
      NUMA node of local rank r's GPU, ``None``/negative when unknown) for every
      rank, ranks share the CPUs of their GPU's node; otherwise (or when a node
      would get more ranks than CPUs) ranks are spread over the nodes in blocks,
      in proportion to each node's CPUs (ranks 0..k-1 on the first node, ...).
      With one node or no node information it is the ``core`` split.

    Raises FabricError when disjoint sets are impossible (more ranks than CPUs).
    """
    if nranks < 1:
        raise FabricError(f"cannot bind {nranks} ranks: need at least one", "pass nranks >= 1")
    if mode not in BIND_MODES:
        raise FabricError(f"unknown CPU binding mode {mode!r}", f"use one of {', '.join(BIND_MODES)}")
    online = sorted(set(cpus))
    if not online:
        raise FabricError("cannot bind ranks: the list of CPUs is empty",
                          "read it with read_online_cpus(sysfs_root) or pass mode='none'")
    if mode == "none":
        return [list(online) for _ in range(nranks)]
    if nranks > len(online):
        raise FabricError(
            f"cannot give {nranks} local ranks disjoint CPU sets: only {len(online)} CPUs "
            f"({format_cpulist(online)})",
            "run fewer ranks per node, or use CPU binding mode 'none'",
        )
    if mode == "numa" and numa_nodes:
        by_node = _numa_split(nranks, online, numa_nodes, gpu_numa, thread_siblings)
        if by_node is not None:
            return by_node
    return _even_split(online, nranks, thread_siblings)


def _numa_split(
    nranks: int,
    online: list[int],
    numa_nodes: dict[int, list[int]],
    gpu_numa: Sequence[int | None] | None,
    siblings: dict[int, list[int]] | None,
) -> list[list[int]] | None:
    allowed = set(online)
    nodes = {n: sorted(set(c) & allowed) for n, c in sorted(numa_nodes.items())}
    nodes = {n: c for n, c in nodes.items() if c}
    if len(nodes) < 2:
        return None
    for assignment in (_ranks_by_gpu(nranks, nodes, gpu_numa), _ranks_in_blocks(nranks, nodes)):
        if assignment is None:
            continue
        ranks_on: dict[int, list[int]] = {}
        for rank, node in enumerate(assignment):
            ranks_on.setdefault(node, []).append(rank)
        if any(len(r) > len(nodes[n]) for n, r in ranks_on.items()):
            continue
        result: list[list[int]] = [[] for _ in range(nranks)]
        for node, ranks in ranks_on.items():
            for rank, share in zip(ranks, _even_split(nodes[node], len(ranks), siblings), strict=True):
                result[rank] = share
        return result
    return None


def _ranks_by_gpu(nranks: int, nodes: dict[int, list[int]],
                  gpu_numa: Sequence[int | None] | None) -> list[int] | None:
    if gpu_numa is None or len(gpu_numa) < nranks:
        return None
    wanted = list(gpu_numa[:nranks])
    if any(n is None or n not in nodes for n in wanted):
        return None
    return [int(n) for n in wanted if n is not None]


def _ranks_in_blocks(nranks: int, nodes: dict[int, list[int]]) -> list[int]:
    """Ranks per node in proportion to its CPUs (largest remainder), in node order.

    With ``nranks`` <= the number of CPUs no node gets more ranks than CPUs.
    """
    total = sum(len(c) for c in nodes.values())
    quota = {n: nranks * len(c) // total for n, c in nodes.items()}
    by_remainder = sorted(nodes, key=lambda n: (-(nranks * len(nodes[n]) % total), n))
    for n in by_remainder[: nranks - sum(quota.values())]:
        quota[n] += 1
    return [n for n in nodes for _ in range(quota[n])]


def _even_split(cpus: list[int], k: int, siblings: dict[int, list[int]] | None) -> list[list[int]]:
    """``k`` contiguous, near-equal chunks; whole cores per chunk when there are enough cores."""
    units = _cores(cpus, siblings) if siblings else [[c] for c in cpus]
    if len(units) < k:
        units = [[c] for c in cpus]
    base, extra = divmod(len(units), k)
    out: list[list[int]] = []
    start = 0
    for i in range(k):
        n = base + (1 if i < extra else 0)
        out.append(sorted(c for unit in units[start:start + n] for c in unit))
        start += n
    return out


def _cores(cpus: list[int], siblings: dict[int, list[int]]) -> list[list[int]]:
    """Group ``cpus`` by physical core, cores ordered by their first CPU."""
    allowed = set(cpus)
    seen: set[int] = set()
    cores: list[list[int]] = []
    for cpu in cpus:
        if cpu in seen:
            continue
        core = sorted((set(siblings.get(cpu, [cpu])) & allowed) | {cpu})
        core = [c for c in core if c not in seen]
        seen.update(core)
        cores.append(core)
    return cores
