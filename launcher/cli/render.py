"""Human renderings of topologies and findings: aligned tables, colour on a terminal.

Pure functions returning strings; the CLI decides where they go. Colour follows
``--color`` (``auto``: only on a TTY, never with ``NO_COLOR``; ``FORCE_COLOR`` forces it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import IO

from aitrain.fabric.findings import Finding, Severity
from aitrain.fabric.topology import HostTopology, distance_rank, gpu_nic_distances

RESET = "\033[0m"
COLORS = {
    "red": "\033[31m",
    "green": "\033[32m",
    "yellow": "\033[33m",
    "blue": "\033[34m",
    "bold": "\033[1m",
    "dim": "\033[2m",
}
SEVERITY_COLOR = {Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "blue"}


def use_color(stream: IO[str], mode: str = "auto") -> bool:
    if mode == "always":
        return True
    if mode == "never" or os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


class Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, color: str | None) -> str:
        if not self.color or not color:
            return text
        return f"{COLORS[color]}{text}{RESET}"


def _visible_len(text: str) -> int:
    out, i = 0, 0
    while i < len(text):
        if text[i] == "\033":
            j = text.find("m", i)
            i = j + 1 if j != -1 else len(text)
            continue
        out += 1
        i += 1
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], style: Style, indent: str = "") -> str:
    """Left-aligned columns separated by two spaces; cells may carry colour codes."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], _visible_len(cell))
    lines = [indent + "  ".join(style(h.ljust(w), "bold") for h, w in zip(headers, widths, strict=False)).rstrip()]
    for row in rows:
        cells = [cell + " " * (w - _visible_len(cell)) for cell, w in zip(row, widths, strict=False)]
        lines.append(indent + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _opt(value: object, fmt: str = "{}") -> str:
    return "-" if value is None or value == "" else fmt.format(value)


def _size_kib(kib: int | None) -> str:
    if kib is None:
        return "?"
    for unit, size in (("TiB", 1 << 30), ("GiB", 1 << 20), ("MiB", 1 << 10)):
        if kib >= size:
            return f"{kib / size:.1f} {unit}"
    return f"{kib} KiB"


def _limit(limit: object, bytes_: bool = False) -> str:
    if limit is None:
        return "?"
    soft = getattr(limit, "soft", None)
    if soft is None:
        return "unlimited"
    if bytes_ and soft >= 1 << 10:
        return _size_kib(soft // 1024)
    return str(soft)


# --------------------------------------------------------------------------- probe


def render_topology(topo: HostTopology, style: Style) -> str:
    h = topo.host
    out: list[str] = []
    numa = f" ({len(h.numa_nodes)} NUMA node{'s' if len(h.numa_nodes) != 1 else ''})" if h.numa_nodes else ""
    out.append(style(f"host {topo.hostname}", "bold"))
    out.append(
        f"  kernel {_opt(h.kernel)}  cpus {_opt(h.cpus)}{numa}  memory {_size_kib(h.mem_total_kib)}  "
        f"memlock {_limit(h.memlock, bytes_=True)}  nofile {_limit(h.nofile)}  "
        f"/dev/shm {_size_kib(h.shm_bytes // 1024) if h.shm_bytes else '?'}  "
        f"hypervisor {_opt(h.hypervisor)}"
    )
    out.append(
        f"  torch {_opt(h.torch_version)}  CUDA {_opt(h.cuda_version)}  NCCL {_opt(h.nccl_version)}  "
        f"driver {_opt(h.driver_version)}  nvidia_peermem {_yesno(h.nvidia_peermem)}  dma-buf {_yesno(h.dmabuf)}"
    )
    if h.numa_nodes:
        out.append("  numa " + "  ".join(f"node{n.id}: cpus {n.cpulist or '-'} mem {_size_kib(n.memory_kib)}"
                                         for n in h.numa_nodes))
    if topo.rendezvous is not None:
        r = topo.rendezvous
        via = "this host" if r.local else (r.interface or style("no route", "red"))
        out.append(f"  rendezvous {r.address} via {via}" + (f" (gateway {r.gateway})" if r.gateway else "")
                   + f" [{r.method}]")

    out.append("")
    out.append(style("NICs", "bold"))
    rows = []
    for n in topo.nics:
        state_color = "green" if n.operstate == "up" else ("red" if n.operstate == "down" else None)
        rows.append([
            n.name, n.kind, style(n.operstate, state_color), _opt(n.mtu),
            _opt(n.speed_mbps, "{} Mb/s"), ", ".join(n.ipv4 + n.ipv6) or "-",
            _opt(n.driver), _opt(n.pci_address), _opt(n.numa_node),
        ])
    out.append(table(["NAME", "KIND", "STATE", "MTU", "SPEED", "ADDRESSES", "DRIVER", "PCI", "NUMA"], rows,
                     style, "  ") if rows else "  (none)")

    out.append("")
    out.append(style("RDMA", "bold"))
    rows = []
    for dev, port in topo.rdma_ports():
        v2 = [g for g in port.gids if g.type == "RoCE v2"]
        gids = f"{len(port.gids)} ({sum(1 for g in v2 if g.is_routable)} routable v2)" if port.gids_known else "?"
        rows.append([
            f"{dev.name}/{port.port}",
            style(port.state, "green" if port.is_active else "red"),
            style(port.phys_state, "green" if port.is_link_up else "red"),
            _opt(port.rate_gbps, "{:g} Gb/s"), port.link_layer, _opt(port.active_mtu),
            _opt(port.netdev), gids, _opt(dev.hca_type), _opt(dev.fw_ver), _opt(dev.numa_node),
        ])
    out.append(table(["PORT", "STATE", "PHYS", "RATE", "LINK", "MTU", "NETDEV", "GIDS", "HCA", "FW", "NUMA"],
                     rows, style, "  ") if rows else "  (no RDMA devices: TCP sockets)")

    if topo.gpus:
        out.append("")
        out.append(style("GPUs", "bold"))
        nearest: dict[int, tuple[str, str]] = {}
        for d in gpu_nic_distances(topo):
            best = nearest.get(d.gpu)
            if best is None or distance_rank(d.distance) < distance_rank(best[1]):
                nearest[d.gpu] = (d.nic, d.distance)
        rows = []
        for g in topo.gpus:
            nic = nearest.get(g.index)
            rows.append([str(g.index), _opt(g.name or g.vendor), _opt(g.pci_address), _opt(g.numa_node),
                         f"{nic[0]} ({nic[1]})" if nic else "-"])
        out.append(table(["GPU", "NAME", "PCI", "NUMA", "NEAREST NIC"], rows, style, "  "))

    links = [p for p in topo.pci_devices if p.role in ("nic", "gpu")]
    if links:
        out.append("")
        out.append(style("PCIe", "bold"))
        rows = []
        for p in links:
            cur = _link(p.current_speed_gts, p.current_width)
            mx = _link(p.max_speed_gts, p.max_width)
            low = (p.current_width or 0) < (p.max_width or 0) or (p.current_speed_gts or 0) < (p.max_speed_gts or 0)
            rows.append([p.address, p.role, style(cur, "yellow" if low else None), mx, _opt(p.numa_node),
                         _opt(p.root), " > ".join(p.upstream) or "-"])
        out.append(table(["PCI", "ROLE", "LINK", "MAX", "NUMA", "ROOT", "BRIDGES"], rows, style, "  "))

    if topo.warnings:
        out.append("")
        out.append(style(f"probe warnings ({len(topo.warnings)})", "yellow"))
        for w in topo.warnings:
            out.append(f"  {w.path}: {w.message}")
    return "\n".join(out)


def _link(speed: float | None, width: int | None) -> str:
    parts = [f"{speed:g} GT/s" if speed is not None else "", f"x{width}" if width is not None else ""]
    return " ".join(p for p in parts if p) or "-"


def _yesno(value: bool | None) -> str:
    return "?" if value is None else ("yes" if value else "no")


# --------------------------------------------------------------------------- check


def render_findings(findings: Sequence[Finding], hosts: int, style: Style) -> str:
    if not findings:
        return style(f"no findings on {hosts} host(s): the fabric looks good", "green")
    rows = []
    details: list[tuple[str, str]] = []
    for f in findings:
        rows.append([style(f.severity.value.upper(), SEVERITY_COLOR[f.severity]), f.host, f.subject, f.id])
        details.append((f.message, f.hint))
    header = table(["SEVERITY", "HOST", "SUBJECT", "ID"], rows, style).splitlines()
    out = [header[0]]
    for line, (message, hint) in zip(header[1:], details, strict=False):
        out.append(line)
        out.append(f"    {message}")
        if hint:
            out.append(style(f"    hint: {hint}", "dim"))
    out.append("")
    out.append(summary(findings, hosts, style))
    return "\n".join(out)


def summary(findings: Sequence[Finding], hosts: int, style: Style) -> str:
    counts = {s: sum(1 for f in findings if f.severity is s) for s in Severity}
    parts = [
        style(f"{counts[Severity.ERROR]} error(s)", "red" if counts[Severity.ERROR] else None),
        style(f"{counts[Severity.WARNING]} warning(s)", "yellow" if counts[Severity.WARNING] else None),
        f"{counts[Severity.INFO]} info",
    ]
    return ", ".join(parts) + f" on {hosts} host(s)"
