"""The rules ``aitrain.fabric.check`` runs, one module per area.

A host rule is ``(view: HostView, opts: CheckOptions) -> Iterable[Finding]``; a cluster
rule is ``(views: list[HostView], opts) -> Iterable[Finding]`` and must stay linear in
the number of hosts (``bench/fabric_scale.py`` checks 4096 hosts in under 2 s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aitrain.fabric.findings import Finding, Severity
from aitrain.fabric.topology import HostTopology, Nic, PciDevice, RdmaDevice, RouteLookup

MIB = 1 << 20


@dataclass
class CheckOptions:
    """What ``check`` compares against (``fabric.*`` in the job config)."""

    expected_rate_gbps: float | None = None
    """Every port of the host's main fabric must run at least this fast."""
    rendezvous: str | None = None
    """The address every host must reach (MASTER_ADDR / the rendezvous endpoint)."""
    min_memlock_bytes: int = 64 * MIB
    """Below this the memlock limit is an error for RDMA; any finite value is a warning."""
    include_probe_warnings: bool = True
    """Turn probe warnings (unreadable or garbage files) into findings."""


@dataclass
class HostView:
    """One host's topology with the lookups rules need, built once per check."""

    topo: HostTopology
    host: str = ""
    pci: dict[str, PciDevice] = field(default_factory=dict)
    nics: dict[str, Nic] = field(default_factory=dict)
    names_by_pci: dict[str, str] = field(default_factory=dict)
    routes: dict[str, RouteLookup] = field(default_factory=dict)

    @classmethod
    def of(cls, topo: HostTopology) -> HostView:
        view = cls(topo=topo, host=topo.hostname or "?")
        view.pci = {p.address: p for p in topo.pci_devices}
        view.nics = {n.name: n for n in topo.nics}
        for n in topo.nics:
            if n.pci_address and not n.virtual:
                view.names_by_pci.setdefault(n.pci_address, n.name)
        for d in topo.rdma_devices:
            if d.pci_address:
                view.names_by_pci[d.pci_address] = d.name
        for g in topo.gpus:
            if g.pci_address:
                view.names_by_pci[g.pci_address] = f"gpu{g.index}"
        return view

    def route_to(self, address: str) -> RouteLookup:
        """``topo.route_to``, once per address per check (several rules ask)."""
        if address not in self.routes:
            self.routes[address] = self.topo.route_to(address)
        return self.routes[address]

    def finding(
        self,
        id: str,
        severity: Severity,
        subject: str,
        message: str,
        hint: str = "",
        **data: Any,
    ) -> Finding:
        return Finding(id=id, severity=severity, host=self.host, subject=subject,
                       message=message, hint=hint, data=data)

    def active_rdma(self) -> list[tuple[RdmaDevice, list]]:
        return [(d, d.active_ports) for d in self.topo.rdma_devices if d.active_ports]


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "?"
    return f"{rate:g} Gb/s"
