"""``tune(cluster) -> {hostname: TunedEnv}``: NCCL/Gloo/torch env derived per host from
the probed topology, every value with the reason it was set.

Pure: topology and options in, env out; nothing here reads the machine or imports
torch. The rules, each a small named function:

- socket interface (``NCCL_SOCKET_IFNAME``/``GLOO_SOCKET_IFNAME``): on the rendezvous
  host (node 0) the best interface every peer reaches and routes back through
  (physical before virtual, then speed, then MTU); every other host takes the
  interface its kernel routes to that address. Never ``lo`` for a multi-host job.
- ``NCCL_IB_HCA``: ``=dev:port,...`` of the usable ACTIVE ports of the main fabric;
  ``NCCL_IB_DISABLE=1`` only when RDMA devices exist but none is usable.
- ``NCCL_IB_GID_INDEX``: for NCCL < 2.21 only, the RoCE v2 GID with a routable IPv4.
- ``NCCL_IB_TC``/``NCCL_IB_SL`` from options; ``NCCL_CROSS_NIC=0`` on rail-aligned
  hosts; ``NCCL_NET_GDR_LEVEL`` from the GPU↔NIC distance when peer memory works.
- ``NCCL_IB_TIMEOUT``/``NCCL_IB_RETRY_CNT`` fitted inside the collective timeout;
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING``, flight-recorder dump on timeout.
- ``OMP_NUM_THREADS`` from the CPUs each rank gets.

Debug-only knobs (``NCCL_ALGO``, ``NCCL_PROTO``...) are never set. Whatever the user
set (shell env or ``fabric.env``) wins and is reported as user-set.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aitrain.errors import FabricError
from aitrain.fabric.topology import (
    GID_TYPE_ROCE_V2,
    PCI_SAME_ROOT_COMPLEX,
    PCI_SAME_SWITCH,
    Cluster,
    HostTopology,
    Nic,
    PciDevice,
    RdmaDevice,
    RdmaPort,
    distance_rank,
    pci_distance,
)

# NCCL selects the RoCE GID itself from this version on (NCCL 2.21 release notes).
NCCL_AUTO_GID_VERSION = (2, 21)
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0  # torch's default process-group timeout for NCCL
IB_TIMEOUT_DEFAULT = 20  # NCCL's default (4.096 us * 2^20 = 4.3 s per try)
IB_RETRY_CNT_DEFAULT = 7

# Knobs that only exist for debugging; tuning (and a stored profile) never sets them.
DEBUG_ONLY = frozenset({
    "NCCL_ALGO", "NCCL_PROTO", "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_P2P_DISABLE",
    "NCCL_SHM_DISABLE", "NCCL_NET", "NCCL_CHECKS_DISABLE", "NCCL_LAUNCH_MODE",
})
# Variables from the shell that count as the user's choice (and are reported as such).
USER_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_GLOO_", "UCX_")
USER_NAMES = frozenset({"OMP_NUM_THREADS", "AITRAIN_COLLECTIVE_TIMEOUT_S"})

_VIRTUAL_RANK = {"physical": 0, "ipoib": 0, "bond": 0, "vlan": 0,
                 "bridge": 1, "veth": 1, "virtual": 1, "tun": 1, "docker": 2, "loopback": 3}


# --------------------------------------------------------------------------- results


@dataclass
class TuneOptions:
    """What the user configured (``fabric.*``, ``nproc_per_node``...)."""

    interface: str | None = None
    """Force the socket interface on every host (``fabric.interface``)."""
    nproc_per_node: int = 1
    multi_host: bool | None = None
    """None: more than one host, or a rendezvous that is not this host."""
    backend: str = "auto"
    """auto (nccl where GPUs are, else gloo) | nccl | gloo."""
    ib_tc: int | None = None
    ib_sl: int | None = None
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    trace_dir: str | None = None
    """Where ranks dump the NCCL flight recorder on a timeout (default: torch's /tmp)."""

    @classmethod
    def from_config(cls, fabric: Any, *, nproc_per_node: int = 1, dist_backend: str = "auto",
                    multi_host: bool | None = None, trace_dir: str | None = None) -> TuneOptions:
        """From a ``FabricConfig`` (read by attribute: fabric never imports launcher)."""
        return cls(
            interface=getattr(fabric, "interface", None),
            nproc_per_node=nproc_per_node,
            multi_host=multi_host,
            backend=dist_backend,
            ib_tc=getattr(fabric, "ib_tc", None),
            ib_sl=getattr(fabric, "ib_sl", None),
            collective_timeout_s=float(getattr(fabric, "collective_timeout_s", None)
                                       or DEFAULT_COLLECTIVE_TIMEOUT_S),
            trace_dir=trace_dir,
        )


@dataclass
class TunedEnv:
    """The env of one host's ranks, with why each value is what it is."""

    hostname: str
    env: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    user_set: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    """Variables deliberately left unset (or worth a look), and why."""
    interface: str | None = None
    """The socket interface chosen for this host."""
    address: str | None = None
    """This host's address on that interface (what peers connect to)."""
    nccl_version: str | None = None
    """The NCCL version the rules assumed for this host (probed, else fabric.nccl_version)."""

    def set(self, key: str, value: Any, reason: str) -> None:
        self.env[key] = str(value)
        self.reasons[key] = reason
        self.notes.pop(key, None)

    def note(self, key: str, why: str) -> None:
        self.notes[key] = why

    def to_dict(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "env": dict(self.env), "reasons": dict(self.reasons),
                "user_set": list(self.user_set), "notes": dict(self.notes),
                "interface": self.interface, "address": self.address, "nccl_version": self.nccl_version}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TunedEnv:
        return cls(hostname=d.get("hostname", ""), env=dict(d.get("env", {})),
                   reasons=dict(d.get("reasons", {})), user_set=list(d.get("user_set", [])),
                   notes=dict(d.get("notes", {})), interface=d.get("interface"),
                   address=d.get("address"), nccl_version=d.get("nccl_version"))


# --------------------------------------------------------------------------- versions


def parse_version(text: Any) -> tuple[int, ...] | None:
    """``2.21.5`` / ``(2, 21, 5)`` / ``22105`` (NCCL_VERSION_CODE) -> (2, 21, 5)."""
    if text is None or text == "":
        return None
    if isinstance(text, (tuple, list)):
        return tuple(int(x) for x in text)
    if isinstance(text, int) or (isinstance(text, str) and text.isdigit() and len(text) >= 4):
        code = int(text)
        if code >= 10000:  # NCCL >= 2.9 encodes X*10000 + Y*100 + Z
            return (code // 10000, (code // 100) % 100, code % 100)
        return (code // 1000, (code // 100) % 10, code % 100)
    m = re.match(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
    if not m:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


def fmt_version(v: tuple[int, ...] | None) -> str:
    return ".".join(map(str, v)) if v else "unknown"


# --------------------------------------------------------------------------- socket interface


def interface_key(nic: Nic) -> tuple[int, int, int]:
    """Sort key, best first: physical before virtual, then speed, then MTU."""
    return (_VIRTUAL_RANK.get(nic.kind, 1), -(nic.speed_mbps or 0), -(nic.mtu or 0))


def describe_nic(nic: Nic) -> str:
    speed = f"{nic.speed_mbps / 1000:g} Gb/s" if nic.speed_mbps else "speed unknown"
    return f"{nic.name} ({nic.kind}, {speed}, MTU {nic.mtu or '?'})"


def primary_address(nic: Nic) -> str | None:
    """The address peers would connect to: first global IPv4, else global IPv6."""
    v6 = None
    for iface in nic.addresses():
        ip = iface.ip
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
            continue
        if ip.version == 4:
            return str(ip)
        v6 = v6 or str(ip)
    return v6


def usable_socket_nics(host: HostTopology) -> list[Nic]:
    """Up, not loopback, with an address peers can connect to; best first."""
    nics = [n for n in host.nics
            if n.is_up and n.kind != "loopback" and n.name != "lo" and primary_address(n)]
    return sorted(nics, key=lambda n: (*interface_key(n), n.name))


def kernel_route(host: HostTopology, address: str) -> str | None:
    """The interface ``host``'s kernel sends ``address`` through (None: local or no route)."""
    lk = host.route_to(address)
    if lk.local or lk.interface in (None, "lo"):
        return None
    return lk.interface


def select_rendezvous_host(cluster: Cluster, rendezvous: str | None) -> int:
    """Index of node 0: the host owning the rendezvous address or name, else the first."""
    if rendezvous:
        try:
            ip = ipaddress.ip_address(rendezvous)
        except ValueError:
            ip = None
        for i, host in enumerate(cluster.hosts):
            if ip is not None and not ip.is_loopback and ip in host.local_addresses():
                return i
            if ip is None and host.hostname.split(".")[0] == rendezvous.split(".")[0]:
                return i
    return 0


@dataclass
class SocketChoice:
    interface: str | None
    address: str | None
    reason: str


def peer_interface(peer: HostTopology, target: str, node0: HostTopology, node0_if: str) -> Nic | None:
    """The interface ``peer`` reaches ``target`` through, if node 0 routes back over
    ``node0_if``; None when the pair does not connect over that network."""
    name = kernel_route(peer, target)
    nic = peer.nic(name)
    if nic is None or not nic.is_up or nic.kind == "loopback":
        return None
    back = primary_address(nic)
    if back is None or kernel_route(node0, back) != node0_if:
        return None
    return nic


def select_socket_interfaces(
    cluster: Cluster, rendezvous: str | None, *, multi_host: bool
) -> list[SocketChoice]:
    """One socket interface per host (same order as ``cluster.hosts``)."""
    hosts = cluster.hosts
    if not multi_host:
        return [SocketChoice("lo", "127.0.0.1",
                             "single-host job: every rank is on this host, loopback keeps "
                             "bootstrap traffic off the network and off a hostname that may "
                             "resolve to an unreachable address") for _ in hosts]
    rdv_ip = _as_ip(rendezvous)
    if rdv_ip is not None and rdv_ip.is_loopback:
        rendezvous = None  # "hostname -> 127.0.0.1": never a multi-host rendezvous
    i0 = select_rendezvous_host(cluster, rendezvous)
    node0 = hosts[i0]
    peers = [h for i, h in enumerate(hosts) if i != i0]
    candidates = usable_socket_nics(node0)

    if not peers:
        return [_single_view_choice(node0, candidates, rendezvous)]

    scored: list[tuple[tuple[int, int, int, int, str], Nic, str, list[Nic]]] = []
    for nic in candidates:
        target = primary_address(nic)
        assert target is not None
        reached = [peer_interface(p, target, node0, nic.name) for p in peers]
        chosen = [c for c in reached if c is not None]
        if len(chosen) < len(reached):
            continue
        every = [nic, *chosen]
        key = (max(_VIRTUAL_RANK.get(n.kind, 1) for n in every),
               -min(n.speed_mbps or 0 for n in every),
               -min(n.mtu or 0 for n in every),
               0 if rdv_ip is not None and rdv_ip in {i.ip for i in nic.addresses()} else 1,
               nic.name)
        scored.append((key, nic, target, chosen))
    if not scored:
        first = candidates[0] if candidates else None
        out: list[SocketChoice] = []
        for h in hosts:
            pick = first if h is node0 else next(iter(usable_socket_nics(h)), None)
            out.append(SocketChoice(pick.name if pick else None, primary_address(pick) if pick else None,
                                    "no interface of node 0 is reached (and routed back) by every "
                                    "peer: best-ranked usable interface, unverified"))
        return out
    scored.sort(key=lambda s: s[0])
    _, nic, target, chosen = scored[0]
    others = [s[1].name for s in scored[1:]]
    alt = f"; also reach every peer: {', '.join(others)}" if others else ""
    out = []
    peer_iter = iter(chosen)
    for i, h in enumerate(hosts):
        if i == i0:
            out.append(SocketChoice(nic.name, target,
                                    f"node 0 ({node0.hostname}): {describe_nic(nic)} reaches every peer and "
                                    f"is the best-ranked network (physical > virtual, then speed, then MTU){alt}"))
            continue
        p = next(peer_iter)
        out.append(SocketChoice(p.name, primary_address(p),
                                f"{describe_nic(p)} is the interface {h.hostname} routes to node 0's "
                                f"{target} ({node0.hostname}/{nic.name})"))
    return out


def _single_view_choice(host: HostTopology, candidates: list[Nic], rendezvous: str | None) -> SocketChoice:
    """Only this host was probed: follow the route to the rendezvous address."""
    if rendezvous:
        lk = host.route_to(rendezvous)
        nic = host.nic(lk.interface)
        if nic is not None and nic.kind != "loopback" and nic.is_up:
            how = "holds" if lk.local else "routes to"
            return SocketChoice(nic.name, primary_address(nic),
                                f"{describe_nic(nic)} {how} the rendezvous address {rendezvous} "
                                f"(only this host was probed: probe every host to compare networks)")
    if candidates:
        nic = candidates[0]
        return SocketChoice(nic.name, primary_address(nic),
                            f"{describe_nic(nic)} is the best-ranked usable interface (no rendezvous "
                            f"route known: pass --rendezvous, or probe every host)")
    return SocketChoice(None, None, "no usable interface (up, not loopback, with an address)")


def _as_ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text) if text else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- RDMA


def usable_port(port: RdmaPort, *, multi_host: bool) -> tuple[bool, str]:
    """(usable, why not)."""
    if not port.is_active:
        return False, f"state {port.state}"
    if port.phys_state not in ("LinkUp", "unknown"):
        return False, f"phys_state {port.phys_state}"
    if port.is_roce and port.gids_known and multi_host:
        if not any(g.type == GID_TYPE_ROCE_V2 and g.is_routable for g in port.gids):
            return False, "no routable RoCE v2 GID (only link-local ones)"
    return True, ""


def select_hca_ports(host: HostTopology, *, multi_host: bool = True
                     ) -> tuple[list[tuple[RdmaDevice, RdmaPort]], list[str]]:
    """(ports to use, why each other port is left out). Only the main fabric: the link
    layer with the most bandwidth, and no port below half its fastest rate."""
    usable: list[tuple[RdmaDevice, RdmaPort]] = []
    skipped: list[str] = []
    for dev, port in host.rdma_ports():
        ok, why = usable_port(port, multi_host=multi_host)
        if ok:
            usable.append((dev, port))
        else:
            skipped.append(f"{dev.name}:{port.port} ({why})")
    if not usable:
        return [], skipped
    layers: dict[str, float] = {}
    for _, port in usable:
        layers[port.link_layer] = layers.get(port.link_layer, 0.0) + (port.rate_gbps or 1.0)
    main = max(layers, key=lambda k: layers[k])
    fastest = max((p.rate_gbps or 0.0) for _, p in usable if p.link_layer == main)
    chosen = []
    for dev, port in usable:
        if port.link_layer != main:
            skipped.append(f"{dev.name}:{port.port} ({port.link_layer}, not the main {main} fabric)")
        elif fastest and port.rate_gbps is not None and port.rate_gbps < fastest / 2:
            skipped.append(f"{dev.name}:{port.port} ({port.rate_gbps:g} Gb/s, below half of {fastest:g})")
        else:
            chosen.append((dev, port))
    return chosen, skipped


def select_gid_index(ports: Iterable[RdmaPort]) -> tuple[int | None, str]:
    """The one GID index (NCCL takes one for all ports) that is a RoCE v2 GID with a
    routable IPv4 address on the most ports; link-local GIDs never qualify."""
    ports = [p for p in ports if p.is_roce]
    if not ports:
        return None, "no RoCE ports"
    if not all(p.gids_known for p in ports):
        return None, "the GID table of a RoCE port could not be read"
    votes: dict[int, int] = {}
    v6: dict[int, int] = {}
    for p in ports:
        for g in p.gids:
            if g.type != GID_TYPE_ROCE_V2 or not g.is_routable:
                continue
            (votes if g.ipv4 else v6)[g.index] = (votes if g.ipv4 else v6).get(g.index, 0) + 1
    pool, kind = (votes, "routable IPv4") if votes else (v6, "routable IPv6")
    if not pool:
        return None, "no RoCE v2 GID with a routable address (only link-local or v1 GIDs)"
    index = max(sorted(pool), key=lambda i: pool[i])
    on = pool[index]
    extra = "" if on == len(ports) else f" ({len(ports) - on} port(s) lack it there)"
    return index, f"the RoCE v2 GID with a {kind} address on {on} port(s){extra}"


def rail_aligned(host: HostTopology, devices: list[RdmaDevice]) -> bool:
    """Each GPU has its own NIC behind the same PCIe switch (rail-optimized layout)."""
    if len(host.gpus) < 2 or len(devices) < 2:
        return False
    nearest: list[str] = []
    for gpu in host.gpus:
        gpci = host.pci(gpu.pci_address) or PciDevice(address=gpu.pci_address or "", numa_node=gpu.numa_node)
        best = None
        for dev in devices:
            npci = host.pci(dev.pci_address) or PciDevice(address=dev.pci_address or "", numa_node=dev.numa_node)
            if pci_distance(gpci, npci) == PCI_SAME_SWITCH:
                best = dev.name
                break
        if best is None:
            return False
        nearest.append(best)
    return len(set(nearest)) == len(nearest) or len(set(nearest)) == len(devices)


def worst_gpu_nic_distance(host: HostTopology, devices: list[RdmaDevice]) -> str | None:
    """Over all GPUs, the distance to the nearest used NIC; the worst of those."""
    if not host.gpus or not devices:
        return None
    worst = None
    for gpu in host.gpus:
        gpci = host.pci(gpu.pci_address) or PciDevice(address=gpu.pci_address or "", numa_node=gpu.numa_node)
        near = min((pci_distance(gpci, host.pci(d.pci_address) or
                                 PciDevice(address=d.pci_address or "", numa_node=d.numa_node))
                    for d in devices), key=distance_rank)
        if worst is None or distance_rank(near) > distance_rank(worst):
            worst = near
    return worst


def ib_transport_seconds(timeout: int, retry_cnt: int) -> float:
    """How long the IB transport retries before it reports a broken link."""
    return 4.096e-6 * (2 ** timeout) * (retry_cnt + 1)


def fit_ib_timeout(collective_timeout_s: float, retry_cnt: int = IB_RETRY_CNT_DEFAULT) -> int:
    """The largest NCCL_IB_TIMEOUT (<= NCCL's default) whose retries end within a
    quarter of the collective timeout."""
    budget = max(collective_timeout_s, 1.0) / 4
    t = int(math.floor(math.log2(budget / (4.096e-6 * (retry_cnt + 1)))))
    return max(8, min(IB_TIMEOUT_DEFAULT, t))


# --------------------------------------------------------------------------- per-host rules


def _host_cpus(host: HostTopology) -> int | None:
    if host.host.cpulist:
        from aitrain.fabric.probe.parse import parse_cpulist

        try:
            return len(parse_cpulist(host.host.cpulist)) or host.host.cpus
        except ValueError:
            pass
    return host.host.cpus


def uses_nccl(host: HostTopology, backend: str) -> bool:
    return backend == "nccl" or (backend == "auto" and bool(host.gpus))


def _rdma_rules(out: TunedEnv, host: HostTopology, opts: TuneOptions, nccl: tuple[int, ...] | None,
                multi_host: bool) -> None:
    if opts.backend == "gloo":
        return
    if not host.rdma_devices:
        out.note("NCCL_IB_HCA", "no RDMA devices: NCCL uses TCP sockets on its own")
        return
    ports, skipped = select_hca_ports(host, multi_host=multi_host)
    left_out = f"; left out: {', '.join(skipped)}" if skipped else ""
    if not ports:
        out.set("NCCL_IB_DISABLE", 1, "RDMA devices exist but no port is usable"
                f"{left_out}: NCCL would try them and fail or hang, so it uses TCP sockets")
        return
    hca = ",".join(f"{d.name}:{p.port}" for d, p in ports)
    out.set("NCCL_IB_HCA", f"={hca}",
            f"the ACTIVE ports of the {ports[0][1].link_layer} fabric, exact match "
            f"('=' so mlx5_1 does not also select mlx5_10..mlx5_19){left_out}")
    memlock = host.host.memlock
    if memlock is not None and memlock.soft is not None and memlock.soft < (64 << 20):
        out.note("memlock", f"RLIMIT_MEMLOCK is {memlock.soft} bytes: RDMA memory registration "
                            f"will fail; raise it (ulimit -l unlimited / LimitMEMLOCK=infinity)")
    roce = [p for _, p in ports if p.is_roce]
    if roce:
        if nccl is not None and nccl >= NCCL_AUTO_GID_VERSION:
            out.note("NCCL_IB_GID_INDEX", f"NCCL {fmt_version(nccl)} >= 2.21 selects the RoCE GID itself")
        else:
            index, why = select_gid_index(roce)
            which = (f"NCCL {fmt_version(nccl)} < 2.21 does not pick the GID itself" if nccl
                     else "NCCL version unknown (pass --nccl-version / fabric.nccl_version)")
            if index is None:
                out.note("NCCL_IB_GID_INDEX", f"{which}, but none fits: {why}")
            else:
                out.set("NCCL_IB_GID_INDEX", index, f"{which}: index {index} is {why}; never a "
                                                    f"link-local GID (not routed between hosts)")
    for key, value, name in (("NCCL_IB_TC", opts.ib_tc, "fabric.ib_tc"),
                             ("NCCL_IB_SL", opts.ib_sl, "fabric.ib_sl")):
        if value is not None:
            out.set(key, value, f"{name}: the traffic class / service level the fabric's QoS expects")
    devices = _unique_devices(ports)
    if rail_aligned(host, devices):
        out.set("NCCL_CROSS_NIC", 0, f"rail-aligned host: each of the {len(host.gpus)} GPUs has its "
                                     f"own NIC behind the same PCIe switch, so rings stay on one rail")
    elif len(devices) > 1:
        out.note("NCCL_CROSS_NIC", "NICs are not one per GPU behind a shared switch: left at NCCL's "
                                   "default (same NIC when it can, cross when better)")
    if host.gpus:
        peermem = bool(host.host.nvidia_peermem) or bool(host.host.dmabuf)
        worst = worst_gpu_nic_distance(host, devices)
        if not peermem:
            out.note("NCCL_NET_GDR_LEVEL", "no nvidia_peermem and no dma-buf: GPUDirect RDMA is "
                                           "unavailable, NCCL stages through host memory")
        elif worst == PCI_SAME_SWITCH:
            out.set("NCCL_NET_GDR_LEVEL", "PXB", "every GPU shares a PCIe switch with a used NIC and "
                                                 "peer memory is available: GPUDirect RDMA through the switch")
        elif worst == PCI_SAME_ROOT_COMPLEX:
            out.set("NCCL_NET_GDR_LEVEL", "PHB", "some GPU reaches its nearest NIC only through the "
                                                 "CPU root complex: allow GPUDirect RDMA across it")
        else:
            out.note("NCCL_NET_GDR_LEVEL", f"nearest NIC of some GPU is {worst or 'unknown'}: "
                                           f"GPUDirect RDMA across sockets is slower; left to NCCL")
    timeout = fit_ib_timeout(opts.collective_timeout_s)
    secs = ib_transport_seconds(timeout, IB_RETRY_CNT_DEFAULT)
    why = (f"the IB transport gives up after 4.096 us x 2^{timeout} x ({IB_RETRY_CNT_DEFAULT}+1) = "
           f"{secs:.0f} s, inside the {opts.collective_timeout_s:g} s collective timeout: a dead link "
           f"is reported as an NCCL error instead of a watchdog timeout")
    out.set("NCCL_IB_TIMEOUT", timeout, why)
    out.set("NCCL_IB_RETRY_CNT", IB_RETRY_CNT_DEFAULT, why)


def _unique_devices(ports: list[tuple[RdmaDevice, RdmaPort]]) -> list[RdmaDevice]:
    seen: dict[str, RdmaDevice] = {}
    for d, _ in ports:
        seen.setdefault(d.name, d)
    return list(seen.values())


def _torch_rules(out: TunedEnv, host: HostTopology, opts: TuneOptions) -> None:
    out.set("AITRAIN_COLLECTIVE_TIMEOUT_S", f"{opts.collective_timeout_s:g}",
            "the process-group timeout aitrain's rank programs pass to init_process_group; "
            "transport timeouts are fitted inside it")
    if not uses_nccl(host, opts.backend):
        return
    out.set("TORCH_NCCL_ASYNC_ERROR_HANDLING", 1,
            "a failed or timed-out collective aborts the communicator and the rank instead of "
            "hanging the job")
    out.set("TORCH_NCCL_TRACE_BUFFER_SIZE", 2000,
            "keep the last 2000 collectives in torch's NCCL flight recorder")
    out.set("TORCH_NCCL_DUMP_ON_TIMEOUT", 1,
            "dump the flight recorder when a collective times out (which rank stopped where)")
    if opts.trace_dir:
        out.set("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", f"{opts.trace_dir.rstrip('/')}/nccl_trace_rank_",
                "flight-recorder dumps go to the run directory, one file per rank")


def _omp_rule(out: TunedEnv, host: HostTopology, opts: TuneOptions) -> None:
    cpus = _host_cpus(host)
    if not cpus:
        out.note("OMP_NUM_THREADS", "CPU count unknown")
        return
    ranks = max(1, opts.nproc_per_node)
    if ranks == 1:  # as torchrun: one rank keeps torch's own default (a thread per core)
        out.note("OMP_NUM_THREADS", "one rank per host: torch's default, as under torchrun")
        return
    n = max(1, cpus // ranks)
    out.set("OMP_NUM_THREADS", n, f"{cpus} CPUs / {ranks} rank(s) on this host: one thread per core, "
                                  f"no oversubscription")


def _socket_rule(out: TunedEnv, choice: SocketChoice, host: HostTopology, opts: TuneOptions) -> None:
    if opts.interface:
        name, reason = opts.interface, "fabric.interface"
        if host.nic(name) is None:
            out.note("fabric.interface", f"{name} was not found on {host.hostname}")
        nic = host.nic(name)
        out.interface, out.address = name, primary_address(nic) if nic else None
    elif choice.interface is None:
        out.note("NCCL_SOCKET_IFNAME", choice.reason)
        return
    else:
        name, reason = choice.interface, choice.reason
        out.interface, out.address = choice.interface, choice.address
    out.set("NCCL_SOCKET_IFNAME", f"={name}", f"{reason}; '=' makes NCCL match the name exactly")
    out.set("GLOO_SOCKET_IFNAME", name, f"{reason}; without it gloo binds to what the hostname "
                                        f"resolves to (often 127.0.0.1)")


# --------------------------------------------------------------------------- user env, profile


def user_env_from(shell: Mapping[str, str] | None = None,
                  fabric_env: Mapping[str, Any] | None = None) -> dict[str, tuple[str, str]]:
    """{name: (value, where)} of what the user set: relevant shell variables, then
    ``fabric.env`` (which wins over the shell)."""
    out: dict[str, tuple[str, str]] = {}
    for k, v in (shell or {}).items():
        if k.startswith(USER_PREFIXES) or k in USER_NAMES:
            out[k] = (str(v), "shell env")
    for k, v in (fabric_env or {}).items():
        out[str(k)] = (str(v), "fabric.env")
    return out


def _apply_profile(out: TunedEnv, host: HostTopology, profile: Any) -> None:
    env = dict(getattr(profile, "env", {}) or {})
    label = f"profile {getattr(profile, 'fingerprint', '?')[:12]}"
    metric = getattr(profile, "summary", "")
    iface = getattr(profile, "interface", None)
    if iface and host.nic(iface) is not None:
        nic = host.nic(iface)
        out.set("NCCL_SOCKET_IFNAME", f"={iface}", f"{label}: measured fastest by `fabric tune --search` {metric}")
        out.set("GLOO_SOCKET_IFNAME", iface, f"{label}: measured fastest by `fabric tune --search` {metric}")
        out.interface, out.address = iface, primary_address(nic) if nic else None
    for k, v in env.items():
        if k in DEBUG_ONLY:
            out.note(k, f"{label} holds debug-only {k}; ignored")
            continue
        out.set(k, v, f"{label}: measured best by `fabric tune --search` {metric}".rstrip())


def _load_profile(path: str) -> Any:
    import json

    from aitrain.fabric.profiles import Profile

    try:
        with open(path) as fh:
            return Profile.from_dict(json.load(fh))
    except (OSError, ValueError, TypeError) as e:
        raise FabricError(f"cannot read the tuning profile {path}: {e}",
                          "use fabric.profile=auto (the stored winner for this cluster), none, "
                          "or the path of a profile `aitrain fabric tune --search` wrote") from e


def _apply_user(out: TunedEnv, user: Mapping[str, tuple[str, str]]) -> None:
    for k, (v, where) in user.items():
        derived = out.env.get(k)
        out.env[k] = v
        out.reasons[k] = f"user-set ({where})" + (f"; tuning would set {derived}" if derived not in (None, v) else "")
        out.notes.pop(k, None)
        if k not in out.user_set:
            out.user_set.append(k)
    # One socket variable set by the user: the other follows it (they must agree).
    for mine, theirs in (("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"), ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")):
        if theirs in user and mine not in user:
            names = _plain_ifnames(user[theirs][0])
            if names is None:
                out.env.pop(mine, None)
                out.reasons.pop(mine, None)
                out.note(mine, f"left unset: the user-set {theirs}={user[theirs][0]} is a pattern")
            else:
                value = ("=" + ",".join(names)) if mine.startswith("NCCL") else ",".join(names)
                out.set(mine, value, f"follows the user-set {theirs}")
            out.interface = names[0] if names else None


def _plain_ifnames(value: str) -> list[str] | None:
    """Interface names in a NCCL/Gloo list, or None when it is a prefix/exclude pattern."""
    if value.startswith("^"):
        return None
    names = [n.strip() for n in value.lstrip("=").split(",") if n.strip()]
    return names or None


# --------------------------------------------------------------------------- entry point


def tune_from_config(
    cluster: Cluster | HostTopology | Iterable[HostTopology],
    fabric: Any,
    *,
    nproc_per_node: int,
    multi_host: bool | None,
    dist_backend: str = "auto",
    trace_dir: str | None = None,
) -> dict[str, TunedEnv]:
    """:func:`tune` as a launch does it: options, NCCL version, ``fabric.env`` (user-set) and
    profile from a ``FabricConfig`` (or None), the launching shell's env as user-set too."""
    import os

    options = TuneOptions.from_config(fabric, nproc_per_node=nproc_per_node, multi_host=multi_host,
                                      dist_backend=dist_backend, trace_dir=trace_dir)
    return tune(cluster, nccl_version=getattr(fabric, "nccl_version", None),
                user_env=dict(getattr(fabric, "env", {}) or {}), shell_env=os.environ, options=options,
                profile=getattr(fabric, "profile", "auto"))


def tune(
    cluster: Cluster | HostTopology | Iterable[HostTopology],
    *,
    rendezvous: str | None = None,
    nccl_version: Any = None,
    user_env: Mapping[str, str] | None = None,
    shell_env: Mapping[str, str] | None = None,
    options: TuneOptions | None = None,
    profile: Any = None,
) -> dict[str, TunedEnv]:
    """Env per host (keyed by hostname, in cluster order).

    ``rendezvous``: the rendezvous (MASTER_ADDR) address or a probed host's name.
    ``nccl_version``: used when a host's probe did not find one (torch without NCCL).
    ``user_env``: ``fabric.env``; ``shell_env``: the launching shell's environment
    (only NCCL_/GLOO_/TORCH_NCCL_/... variables count). Both win over tuning.
    ``profile``: a stored search winner (:class:`aitrain.fabric.profiles.Profile`), or
    ``"auto"``: the stored profile whose fingerprint matches this cluster, if any.
    """
    cluster = Cluster.of(cluster)
    opts = options or TuneOptions()
    if profile == "auto":
        from aitrain.fabric.profiles import ProfileStore

        profile = ProfileStore().find(cluster)
    elif isinstance(profile, str):
        profile = None if profile in ("", "none") else _load_profile(profile)
    if not cluster.hosts:
        raise FabricError("no hosts to tune", "probe at least one host (aitrain fabric probe)")
    names = [h.hostname for h in cluster.hosts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FabricError(f"two or more probed hosts are named {', '.join(dupes)}: tuned env is per host",
                          "probe each host with its own name (probe(hostname=...)), e.g. network "
                          "namespaces sharing one UTS namespace")
    if rendezvous:
        from aitrain.fabric.sources import resolve_rendezvous

        rendezvous = resolve_rendezvous(rendezvous, cluster.hosts)
    multi_host = opts.multi_host
    if multi_host is None:
        # Several hosts, or a rendezvous on a real network (a single-host job needs none).
        rdv = _as_ip(rendezvous)
        multi_host = len(cluster) > 1 or (rdv is not None and not rdv.is_loopback)
    choices = select_socket_interfaces(cluster, rendezvous, multi_host=multi_host)
    user = user_env_from(shell_env, user_env)
    result: dict[str, TunedEnv] = {}
    for host, choice in zip(cluster.hosts, choices, strict=True):
        nccl = parse_version(host.host.nccl_version) or parse_version(nccl_version)
        out = TunedEnv(hostname=host.hostname, nccl_version=fmt_version(nccl) if nccl else None)
        _socket_rule(out, choice, host, opts)
        _rdma_rules(out, host, opts, nccl, multi_host)
        _torch_rules(out, host, opts)
        _omp_rule(out, host, opts)
        if profile is not None:
            _apply_profile(out, host, profile)
        _apply_user(out, user)
        for k in DEBUG_ONLY & set(out.env) - set(out.user_set):  # belt and braces
            del out.env[k]
            out.reasons.pop(k, None)
        result[host.hostname] = out
    return result


__all__ = [
    "DEBUG_ONLY", "SocketChoice", "TuneOptions", "TunedEnv", "fit_ib_timeout", "interface_key",
    "parse_version", "primary_address", "rail_aligned", "select_gid_index", "select_hca_ports",
    "select_rendezvous_host", "select_socket_interfaces", "tune", "usable_socket_nics", "user_env_from",
]
