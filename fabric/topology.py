"""The fabric data model: what a probe found on one host, and a cluster of hosts.

Plain dataclasses with a lossless JSON round-trip (``to_dict`` / ``from_dict``), so a
topology probed on a node can be shipped to the launcher, cached, diffed and checked
anywhere. Unknown keys in ``from_dict`` are ignored and missing ones take their
defaults, so an older or newer probe still loads.

Nothing here reads the machine: see ``aitrain.fabric.probe`` for the readers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import json
import socket
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

SCHEMA_VERSION = 1

# GID types, spelled as sysfs spells them (``ports/N/gid_attrs/types/I``).
GID_TYPE_IB_ROCE_V1 = "IB/RoCE v1"
GID_TYPE_ROCE_V2 = "RoCE v2"

LINK_LAYER_IB = "InfiniBand"
LINK_LAYER_ETHERNET = "Ethernet"

T = TypeVar("T")


# --------------------------------------------------------------------------- serialization


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    return value


_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


def _from_jsonable(tp: Any, value: Any) -> Any:
    """Builds a value of type ``tp`` from JSON data, or raises ValueError saying why."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_jsonable(args[0], value) if len(args) == 1 else value
    if value is None:
        raise ValueError("must not be null")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {type(value).__name__}")
        return [_from_jsonable(item, v) for v in value]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {type(value).__name__}")
        return {str(k): _from_jsonable(item, v) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_from_dict(tp, value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and (type(value) is not tp):
        raise ValueError(f"expected {tp.__name__}, got {type(value).__name__} {value!r:.40}")
    if tp is float:
        raise ValueError(f"expected a number, got {type(value).__name__} {value!r:.40}")
    return value


def _dataclass_from_dict(cls: type[T], data: Any) -> T:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            try:
                kwargs[f.name] = _from_jsonable(hints[f.name], data[f.name])
            except ValueError as e:
                raise ValueError(f"{cls.__name__}.{f.name}: {e}") from None
    return cls(**kwargs)


class _Serializable:
    """Mixin: ``to_dict`` / ``from_dict`` over dataclass fields."""

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return _dataclass_from_dict(cls, data)


# --------------------------------------------------------------------------- RDMA


@dataclass
class Gid(_Serializable):
    """One populated entry of a port's GID table."""

    index: int = 0
    gid: str = ""
    type: str | None = None
    """``IB/RoCE v1`` or ``RoCE v2`` (None when the kernel did not say)."""
    netdev: str | None = None
    """The net device a RoCE GID is bound to (None on InfiniBand)."""

    @property
    def address(self) -> ipaddress.IPv6Address | None:
        try:
            return ipaddress.IPv6Address(self.gid)
        except ValueError:
            return None

    @property
    def is_link_local(self) -> bool:
        a = self.address
        return a is not None and a.is_link_local

    @property
    def ipv4(self) -> str | None:
        """The IPv4 address of an IPv4-mapped RoCE GID (``::ffff:a.b.c.d``)."""
        a = self.address
        return str(a.ipv4_mapped) if a is not None and a.ipv4_mapped is not None else None

    @property
    def is_zero(self) -> bool:
        a = self.address
        return a is None or int(a) == 0

    @property
    def is_routable(self) -> bool:
        """A GID that can carry traffic across an L3 hop (not link-local, not empty)."""
        return not self.is_zero and not self.is_link_local


@dataclass
class RdmaPort(_Serializable):
    """One port of an RDMA device, as ``/sys/class/infiniband/<dev>/ports/<n>`` shows it."""

    port: int = 1
    state: str = "UNKNOWN"
    """``DOWN``, ``INIT``, ``ARMED``, ``ACTIVE``, ``ACTIVE_DEFER`` (the kernel's names)."""
    phys_state: str = "unknown"
    """``Sleep``, ``Polling``, ``Disabled``, ``PortConfigurationTraining``, ``LinkUp``,
    ``LinkErrorRecovery``, ``Phy Test``."""
    rate_gbps: float | None = None
    rate_text: str | None = None
    """The rate as the kernel printed it, e.g. ``400 Gb/sec (4X NDR)``."""
    link_layer: str = "unknown"
    """``InfiniBand`` or ``Ethernet`` (RoCE)."""
    active_mtu: int | None = None
    """Active IB MTU in bytes. sysfs has none for InfiniBand; for RoCE it is derived from
    the netdev MTU the way the kernel does, and pyverbs reports it directly."""
    max_mtu: int | None = None
    netdev: str | None = None
    lid: str | None = None
    gids: list[Gid] = field(default_factory=list)
    gids_known: bool = False
    """False when the GID table could not be read (captured trees often lack it)."""

    @property
    def is_active(self) -> bool:
        return self.state in ("ACTIVE", "ACTIVE_DEFER")

    @property
    def is_link_up(self) -> bool:
        return self.phys_state == "LinkUp"

    @property
    def is_roce(self) -> bool:
        return self.link_layer == LINK_LAYER_ETHERNET


@dataclass
class RdmaDevice(_Serializable):
    """An RDMA device (HCA) and its ports."""

    name: str = ""
    hca_type: str | None = None
    fw_ver: str | None = None
    node_guid: str | None = None
    board_id: str | None = None
    node_type: str | None = None
    node_desc: str | None = None
    pci_address: str | None = None
    numa_node: int | None = None
    netdevs: list[str] = field(default_factory=list)
    ports: list[RdmaPort] = field(default_factory=list)
    source: str = "sysfs"
    """Which reader produced it: ``sysfs``, ``pyverbs`` or ``sysfs+pyverbs``."""

    def port(self, number: int) -> RdmaPort | None:
        return next((p for p in self.ports if p.port == number), None)

    @property
    def active_ports(self) -> list[RdmaPort]:
        return [p for p in self.ports if p.is_active]


# --------------------------------------------------------------------------- NICs, routes


@dataclass
class Nic(_Serializable):
    """A network interface from ``/sys/class/net``."""

    name: str = ""
    kind: str = "physical"
    """``physical``, ``ipoib``, ``loopback``, ``bridge``, ``docker``, ``veth``, ``bond``,
    ``vlan``, ``tun`` or ``virtual``."""
    virtual: bool = False
    """True when no hardware backs it (no ``device`` link in sysfs)."""
    operstate: str = "unknown"
    mtu: int | None = None
    speed_mbps: int | None = None
    mac: str | None = None
    ipv4: list[str] = field(default_factory=list)
    """Addresses in CIDR form, ``10.0.0.5/24``."""
    ipv6: list[str] = field(default_factory=list)
    driver: str | None = None
    pci_address: str | None = None
    numa_node: int | None = None
    link_type: int | None = None
    """ARPHRD type: 1 Ethernet, 32 InfiniBand, 772 loopback."""

    @property
    def is_up(self) -> bool:
        # "unknown" is what many virtual and some physical drivers report while working.
        return self.operstate in ("up", "unknown")

    def addresses(self) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        out: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
        for text in [*self.ipv4, *self.ipv6]:
            try:
                out.append(ipaddress.ip_interface(text))
            except ValueError:
                continue
        return out


@dataclass
class Route(_Serializable):
    """One entry of the main routing table (``/proc/net/route``, ``/proc/net/ipv6_route``)."""

    destination: str = "0.0.0.0/0"
    interface: str = ""
    gateway: str | None = None
    metric: int = 0

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        try:
            return ipaddress.ip_network(self.destination, strict=False)
        except ValueError:
            return None


@dataclass
class RouteLookup(_Serializable):
    """Which interface a host uses to reach one address."""

    address: str = ""
    interface: str | None = None
    gateway: str | None = None
    source: str | None = None
    local: bool = False
    """The address is one of the host's own."""
    method: str = "procfs"
    """``procfs`` (longest prefix match on the main table), ``ip-route`` or ``none``."""


# --------------------------------------------------------------------------- PCI, GPUs


@dataclass
class PciDevice(_Serializable):
    """A PCI function the fabric cares about (NIC, HCA, GPU) or a bridge above one."""

    address: str = ""
    role: str = "other"
    """``nic``, ``gpu``, ``bridge`` or ``other``."""
    vendor_id: str | None = None
    device_id: str | None = None
    class_code: str | None = None
    driver: str | None = None
    numa_node: int | None = None
    current_speed_gts: float | None = None
    current_width: int | None = None
    max_speed_gts: float | None = None
    max_width: int | None = None
    root: str | None = None
    """The root complex (host bridge), ``pci0000:00``."""
    upstream: list[str] = field(default_factory=list)
    """Bridges from the root port down to this device's parent."""
    acs_ctrl: int | None = None
    """The ACS Control register, for bridges whose config space is readable."""


@dataclass
class Gpu(_Serializable):
    index: int = 0
    name: str | None = None
    vendor: str | None = None
    """``nvidia`` or ``amd``."""
    pci_address: str | None = None
    uuid: str | None = None
    numa_node: int | None = None
    memory_mib: int | None = None
    source: str = "sysfs"
    """``nvml`` or ``sysfs`` (PCI class only)."""


# --------------------------------------------------------------------------- host


@dataclass
class Limit(_Serializable):
    """A resource limit; ``None`` means unlimited."""

    soft: int | None = None
    hard: int | None = None


@dataclass
class NumaNode(_Serializable):
    id: int = 0
    cpulist: str = ""
    cpus: int = 0
    memory_kib: int | None = None


@dataclass
class HostInfo(_Serializable):
    """Host facts from procfs/sysfs and the Python environment."""

    kernel: str | None = None
    boot_id: str | None = None
    cpus: int | None = None
    cpulist: str | None = None
    numa_nodes: list[NumaNode] = field(default_factory=list)
    mem_total_kib: int | None = None
    memlock: Limit | None = None
    """RLIMIT_MEMLOCK in bytes (of the probing process)."""
    nofile: Limit | None = None
    shm_bytes: int | None = None
    hypervisor: str | None = None
    """None when unknown, ``none`` on bare metal, else a name (``kvm``, ``vmware``...)."""
    kernel_modules: list[str] | None = None
    """Fabric-relevant loaded modules (None when ``/proc/modules`` was not readable)."""
    nvidia_peermem: bool | None = None
    dmabuf: bool | None = None
    """GPU memory can be registered via dma-buf (kernel >= 5.12 and NVIDIA open module)."""
    driver_version: str | None = None
    torch_version: str | None = None
    cuda_version: str | None = None
    nccl_version: str | None = None
    python_version: str | None = None

    @property
    def bare_metal(self) -> bool | None:
        return None if self.hypervisor is None else self.hypervisor == "none"


@dataclass
class ProbeWarning(_Serializable):
    """Something the probe could not read or understand; the probe goes on without it."""

    path: str = ""
    message: str = ""
    kind: str = "bad-file-content"
    """``unreadable-file``, ``bad-file-content``, ``sysfs-verbs-mismatch``, ``tool-failed``."""


@dataclass
class HostTopology(_Serializable):
    """Everything one probe found on one host."""

    hostname: str = ""
    host: HostInfo = field(default_factory=HostInfo)
    nics: list[Nic] = field(default_factory=list)
    rdma_devices: list[RdmaDevice] = field(default_factory=list)
    gpus: list[Gpu] = field(default_factory=list)
    pci_devices: list[PciDevice] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    routes_known: bool = False
    rendezvous: RouteLookup | None = None
    warnings: list[ProbeWarning] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    """Where each part came from (``sysfs_root``, ``proc_root``, ``pyverbs``, ``gpus``)."""
    schema: int = SCHEMA_VERSION

    # -- lookups ---------------------------------------------------------------------

    def nic(self, name: str | None) -> Nic | None:
        return next((n for n in self.nics if n.name == name), None) if name else None

    def pci(self, address: str | None) -> PciDevice | None:
        return next((p for p in self.pci_devices if p.address == address), None) if address else None

    def rdma_ports(self) -> Iterator[tuple[RdmaDevice, RdmaPort]]:
        for dev in self.rdma_devices:
            for port in dev.ports:
                yield dev, port

    def active_rdma_devices(self) -> list[RdmaDevice]:
        return [d for d in self.rdma_devices if d.active_ports]

    def local_addresses(self) -> dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
        return {iface.ip: nic.name for nic in self.nics for iface in nic.addresses()}

    def route_to(self, address: str) -> RouteLookup:
        """Which interface reaches ``address``: own address, then longest prefix match.

        Only the main table is consulted (``/proc/net/route``); policy routing rules
        are not visible in procfs. Returns ``interface=None`` when nothing matches.
        """
        if self.rendezvous is not None and self.rendezvous.address == address:
            return self.rendezvous
        return lookup_route(address, self.routes, nics=self.nics)

    def fingerprint(self) -> str:
        """A stable hash of what was found (not of when, or of probe warnings)."""
        d = self.to_dict()
        for volatile in ("warnings", "sources"):
            d.pop(volatile, None)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=1 << 16)
def _parse_ip(text: str) -> tuple[int, int] | None:
    """(family, integer) of an address, or None. Cached: clusters repeat addresses."""
    for family, width in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        try:
            return width, int.from_bytes(socket.inet_pton(family, text), "big")
        except (OSError, ValueError):
            continue
    return None


@functools.lru_cache(maxsize=1 << 16)
def _parse_prefix(text: str) -> tuple[int, int, int] | None:
    """(family, network integer, prefix length) of ``a.b.c.d/len``, or None."""
    addr, _, plen = text.partition("/")
    parsed = _parse_ip(addr)
    if parsed is None:
        return None
    family, value = parsed
    bits = 32 if family == 4 else 128
    try:
        length = int(plen) if plen else bits
    except ValueError:
        return None
    if not 0 <= length <= bits:
        return None
    return family, value >> (bits - length) if length else 0, length


def _contains(prefix: tuple[int, int, int], family: int, value: int) -> bool:
    pfamily, net, length = prefix
    if pfamily != family:
        return False
    bits = 32 if family == 4 else 128
    return (value >> (bits - length) if length else 0) == net


def lookup_route(
    address: str,
    routes: Iterable[Route],
    local: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] | None = None,
    *,
    nics: Iterable[Nic] | None = None,
) -> RouteLookup:
    """Longest-prefix match of ``address`` over ``routes``, lowest metric first.

    Own addresses come from ``local`` (address -> interface) or from ``nics``; an own
    address is reached locally."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return RouteLookup(address=address, method="none")
    family, value = (4 if ip.version == 4 else 6), int(ip)
    own: list[tuple[str, str, int]] = []  # (interface, address text, family)
    if local:
        own = [(name, str(a), 4 if a.version == 4 else 6) for a, name in local.items()]
        if ip in local:
            return RouteLookup(address=address, interface=local[ip], local=True, source=str(ip))
    for nic in nics or ():
        for cidr in (*nic.ipv4, *nic.ipv6):
            text = cidr.partition("/")[0]
            parsed = _parse_ip(text)
            if parsed is None:
                continue
            if parsed == (family, value):
                return RouteLookup(address=address, interface=nic.name, local=True, source=str(ip))
            own.append((nic.name, text, parsed[0]))
    if ip.is_loopback:
        return RouteLookup(address=address, interface="lo", local=True)
    best: Route | None = None
    best_key = (-1, 0)
    for route in routes:
        prefix = _parse_prefix(route.destination)
        if prefix is None or not _contains(prefix, family, value):
            continue
        key = (prefix[2], -route.metric)
        if key > best_key:
            best, best_key = route, key
    if best is None:
        return RouteLookup(address=address, method="procfs")
    source = next((text for name, text, fam in own
                   if name == best.interface and fam == family and not text.lower().startswith("fe80")), None)
    return RouteLookup(address=address, interface=best.interface, gateway=best.gateway, source=source)


# --------------------------------------------------------------------------- PCI distance

PCI_SAME_SWITCH = "same-switch"
PCI_SAME_ROOT_COMPLEX = "same-root-complex"
PCI_SAME_NUMA = "same-numa-node"
PCI_CROSS_SOCKET = "cross-socket"
PCI_UNKNOWN = "unknown"

_DISTANCE_RANK = {
    PCI_SAME_SWITCH: 0,
    PCI_SAME_ROOT_COMPLEX: 1,
    PCI_SAME_NUMA: 2,
    PCI_CROSS_SOCKET: 3,
    PCI_UNKNOWN: 4,
}


def distance_rank(distance: str) -> int:
    return _DISTANCE_RANK.get(distance, 4)


def pci_distance(a: PciDevice | None, b: PciDevice | None) -> str:
    """How far apart two PCI functions are, in nvidia-smi ``topo -m`` terms.

    ``same-switch`` (PIX/PXB: a common bridge below the root port), ``same-root-complex``
    (PHB), ``same-numa-node`` (NODE), ``cross-socket`` (SYS), or ``unknown``.
    """
    if a is None or b is None:
        return PCI_UNKNOWN
    if a.root and a.root == b.root:
        # upstream[0] is the root port; a common bridge below it means a shared switch.
        common = 0
        for x, y in zip(a.upstream, b.upstream, strict=False):
            if x != y:
                break
            common += 1
        return PCI_SAME_SWITCH if common >= 2 else PCI_SAME_ROOT_COMPLEX
    if a.numa_node is not None and b.numa_node is not None:
        return PCI_SAME_NUMA if a.numa_node == b.numa_node else PCI_CROSS_SOCKET
    return PCI_UNKNOWN


@dataclass
class GpuNicDistance(_Serializable):
    gpu: int = 0
    nic: str = ""
    distance: str = PCI_UNKNOWN


def gpu_nic_distances(topo: HostTopology) -> list[GpuNicDistance]:
    """The distance from every GPU to every RDMA device (or physical NIC if none)."""
    nics: list[tuple[str, str | None, int | None]] = [
        (d.name, d.pci_address, d.numa_node) for d in topo.rdma_devices
    ] or [(n.name, n.pci_address, n.numa_node) for n in topo.nics if not n.virtual]
    out = []
    for gpu in topo.gpus:
        gpci = topo.pci(gpu.pci_address) or PciDevice(
            address=gpu.pci_address or "", numa_node=gpu.numa_node
        )
        for name, address, numa in nics:
            npci = topo.pci(address) or PciDevice(address=address or "", numa_node=numa)
            out.append(GpuNicDistance(gpu=gpu.index, nic=name, distance=pci_distance(gpci, npci)))
    return out


# --------------------------------------------------------------------------- cluster


@dataclass
class Cluster(_Serializable):
    """The hosts of one job."""

    hosts: list[HostTopology] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[HostTopology]:
        return iter(self.hosts)

    @classmethod
    def of(cls, hosts: Cluster | HostTopology | Iterable[HostTopology]) -> Cluster:
        if isinstance(hosts, Cluster):
            return hosts
        if isinstance(hosts, HostTopology):
            return cls(hosts=[hosts])
        return cls(hosts=list(hosts))


def loads_topologies(text: str) -> list[HostTopology]:
    """Reads ``aitrain fabric probe --json`` output: ``{"hosts": [...]}`` or one host."""
    data = json.loads(text)
    if isinstance(data, dict) and isinstance(data.get("hosts"), list):
        return [HostTopology.from_dict(h) for h in data["hosts"]]
    if isinstance(data, dict) and "hostname" in data:
        return [HostTopology.from_dict(data)]
    if isinstance(data, list):
        return [HostTopology.from_dict(h) for h in data]
    raise ValueError('expected {"hosts": [...]}, a list of hosts or one host object')
