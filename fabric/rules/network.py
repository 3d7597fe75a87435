"""Reaching the rendezvous host, and over which interface."""

from __future__ import annotations

from collections.abc import Iterable

from aitrain.fabric.findings import Finding, Severity
from aitrain.fabric.rules import CheckOptions, HostView
from aitrain.fabric.topology import lookup_route

E, W, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO

VIRTUAL_KINDS = ("docker", "veth", "tun")


def rendezvous(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    address = opts.rendezvous
    if not address:
        return
    topo = view.topo
    lookup = view.route_to(address)
    if lookup.local:
        return
    if lookup.method == "none":
        yield view.finding(
            "rendezvous-unresolved", E, address,
            f"the rendezvous address {address!r} is not an IP address this check can route",
            "pass an IP address (--rendezvous 10.0.0.1 / MASTER_ADDR), or a name every host resolves",
        )
        return
    if lookup.interface is None:
        if not topo.routes_known and lookup.method == "procfs":
            yield view.finding(
                "rendezvous-route-unknown", INFO, address,
                f"no routing table for {view.host} (no /proc/net/route in the probe), so "
                f"reaching {address} was not checked",
                "probe with --proc-root pointing at the host's /proc to check routes",
            )
            return
        yield view.finding(
            "rendezvous-unreachable", E, address,
            f"no interface on {view.host} routes to the rendezvous address {address}: no connected "
            f"subnet contains it and there is no default route",
            f"add a route (`ip route add {address} via <gateway>`), or use a rendezvous address on "
            f"a network every host shares (MASTER_ADDR / rendezvous endpoint)",
        )
        return
    nic = view.nics.get(lookup.interface)
    if nic is not None and nic.operstate == "down":
        yield view.finding(
            "rendezvous-interface-down", E, nic.name,
            f"{view.host} would reach the rendezvous address {address} over {nic.name}, which is down",
            f"`ip link set {nic.name} up`, or fix the routes so another interface reaches {address}",
        )
    elif nic is not None and nic.kind in VIRTUAL_KINDS:
        yield view.finding(
            "rendezvous-via-virtual-interface", W, nic.name,
            f"{view.host} reaches the rendezvous address {address} over {nic.name}, a {nic.kind} "
            f"interface: traffic between hosts normally leaves through a physical NIC",
            f"check the routes (`ip route get {address}`) and set fabric.interface / "
            f"NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME to the physical NIC",
        )
    if nic is not None:
        yield from _numa_remote(view, nic.name, address)


def _numa_remote(view: HostView, iface: str, address: str) -> Iterable[Finding]:
    """The socket interface sits on a NUMA node without GPUs while a NIC on a GPU's node
    reaches the same address."""
    topo = view.topo
    gpu_nodes = {g.numa_node for g in topo.gpus if g.numa_node is not None}
    nic = view.nics[iface]
    if not gpu_nodes or nic.numa_node is None or nic.numa_node in gpu_nodes:
        return
    for other in topo.nics:
        if other.name == iface or other.virtual or not other.is_up or other.numa_node not in gpu_nodes:
            continue
        if not other.addresses():
            continue
        own = [r for r in topo.routes if r.interface == other.name]
        if lookup_route(address, own).interface == other.name:
            yield view.finding(
                "socket-nic-numa-remote", W, iface,
                f"traffic to {address} leaves through {iface} on NUMA node {nic.numa_node}, which "
                f"has no GPUs; {other.name} on NUMA node {other.numa_node} (with the GPUs) also "
                f"reaches it",
                f"set fabric.interface={other.name} (NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME) to keep "
                f"socket traffic on the GPUs' node",
                closer=other.name, numa_node=nic.numa_node,
            )
            return


RULES = (rendezvous,)
