"""This network namespace's interfaces, when ``/sys`` may belong to another one.

``/sys/class/net`` lists the interfaces of the network namespace that *mounted*
sysfs, not of the process reading it. A process moved with ``nsenter --net`` (how
slurmd, container runtimes and our test rig start node processes) still sees the
root namespace's NICs there, while ``/proc/net/*`` and the kernel's interface calls
answer for its own namespace. So on the live host the set of interfaces comes from
the kernel (``if_nameindex`` and ``SIOCGIF*`` / ``SIOCETHTOOL`` ioctls on a socket,
all scoped to the caller's namespace), and sysfs only enriches an interface when its
sysfs entry is provably the same device (same ifindex and MAC).
"""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct
from dataclasses import dataclass

from aitrain.fabric.probe import parse
from aitrain.fabric.probe.fs import Root
from aitrain.fabric.topology import Nic

SIOCGIFFLAGS = 0x8913
SIOCGIFMTU = 0x8921
SIOCGIFHWADDR = 0x8927
SIOCETHTOOL = 0x8946
ETHTOOL_GSET = 0x1
ETHTOOL_GDRVINFO = 0x3
IFF_UP = 0x1
IFF_RUNNING = 0x40
_IFREQ = 40  # sizeof(struct ifreq) on 64-bit Linux

_DRIVER_KINDS = {
    "veth": "veth", "bridge": "bridge", "tun": "tun", "bonding": "bond",
    "802.1Q VLAN Support": "vlan", "vxlan": "virtual", "macvlan": "virtual",
    "ipvlan": "virtual", "wireguard": "tun", "dummy": "virtual",
}


@dataclass
class KernelLink:
    """What the kernel says about one interface of the caller's namespace."""

    name: str
    ifindex: int
    flags: int | None = None
    mtu: int | None = None
    mac: str | None = None
    link_type: int | None = None
    driver: str | None = None
    bus_info: str | None = None
    speed_mbps: int | None = None

    @property
    def operstate(self) -> str:
        if self.flags is None:
            return "unknown"
        return "up" if self.flags & IFF_UP and self.flags & IFF_RUNNING else "down"


def _ifreq(name: str, payload: bytes = b"") -> bytearray:
    buf = bytearray(_IFREQ)
    raw = name.encode()[:15]
    buf[: len(raw)] = raw
    buf[16 : 16 + len(payload)] = payload
    return buf


def _ioctl(sock: socket.socket, request: int, name: str) -> bytearray | None:
    buf = _ifreq(name)
    try:
        fcntl.ioctl(sock.fileno(), request, buf, True)
    except OSError:
        return None
    return buf


def _ethtool(sock: socket.socket, name: str, cmd: int, size: int) -> bytes | None:
    data = ctypes.create_string_buffer(struct.pack("I", cmd), size)
    buf = _ifreq(name, struct.pack("P", ctypes.addressof(data)))
    try:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, buf, True)
    except OSError:
        return None
    return data.raw


def _cstr(raw: bytes) -> str | None:
    text = raw.split(b"\0", 1)[0].decode(errors="replace").strip()
    return text or None


def read_kernel_links() -> list[KernelLink] | None:
    """Every interface of the caller's network namespace; None when it cannot be asked."""
    try:
        index = socket.if_nameindex()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return None
    links = []
    with sock:
        for ifindex, name in index:
            link = KernelLink(name=name, ifindex=ifindex)
            if (b := _ioctl(sock, SIOCGIFFLAGS, name)) is not None:
                link.flags = struct.unpack_from("H", b, 16)[0]
            if (b := _ioctl(sock, SIOCGIFMTU, name)) is not None:
                link.mtu = struct.unpack_from("i", b, 16)[0]
            if (b := _ioctl(sock, SIOCGIFHWADDR, name)) is not None:
                link.link_type = struct.unpack_from("H", b, 16)[0]
                if link.link_type == 1:  # Ethernet: the 6-byte MAC fits sa_data
                    link.mac = ":".join(f"{x:02x}" for x in b[18:24])
            if (raw := _ethtool(sock, name, ETHTOOL_GDRVINFO, 196)) is not None:
                link.driver = _cstr(raw[4:36])
                link.bus_info = _cstr(raw[100:132])
            if (raw := _ethtool(sock, name, ETHTOOL_GSET, 44)) is not None:
                speed = struct.unpack_from("H", raw, 12)[0] | (struct.unpack_from("H", raw, 28)[0] << 16)
                link.speed_mbps = speed if 0 < speed < 0xFFFF else None
            links.append(link)
    return links


def _kind(link: KernelLink, pci: str | None) -> str:
    if link.name == "lo" or link.link_type == 772:
        return "loopback"
    if link.name.startswith(("docker", "br-")):
        return "docker"
    if link.driver in _DRIVER_KINDS:
        return _DRIVER_KINDS[link.driver]
    if pci is not None:
        return "ipoib" if link.link_type == 32 else "physical"
    return "virtual"


def nic_from_kernel(link: KernelLink, sys: Root) -> Nic:
    """A Nic for an interface sysfs cannot describe (it lives in another namespace)."""
    pci = link.bus_info.lower() if link.bus_info and parse.is_bdf(link.bus_info.lower()) else None
    numa = sys.parse(f"bus/pci/devices/{pci}/numa_node", parse.parse_numa_node, quiet=True) if pci else None
    return Nic(
        name=link.name, kind=_kind(link, pci), virtual=pci is None, operstate=link.operstate,
        mtu=link.mtu, speed_mbps=link.speed_mbps, mac=link.mac,
        driver=link.driver if pci else None, pci_address=pci, numa_node=numa,
        link_type=link.link_type,
    )


def _same_device(nic: Nic, link: KernelLink, sys: Root) -> bool:
    ifindex = sys.parse(f"class/net/{nic.name}/ifindex", parse.parse_int, quiet=True)
    if ifindex != link.ifindex:
        return False
    return link.mac is None or nic.mac is None or nic.mac.lower() == link.mac


def reconcile_nics(
    nics: list[Nic],
    sys: Root,
    ipv4: dict[str, list[str]],
    ipv6: dict[str, list[str]],
    links: list[KernelLink] | None = None,
) -> tuple[list[Nic], str]:
    """(the NICs of the caller's namespace, where they came from): sysfs entries that
    are the same device, kernel-described ones for the rest. Sysfs-only names (another
    namespace's devices) are dropped. ``links`` defaults to :func:`read_kernel_links`."""
    links = read_kernel_links() if links is None else links
    if links is None:
        return nics, "sysfs"
    by_name = {n.name: n for n in nics}
    out: list[Nic] = []
    foreign = 0
    for link in sorted(links, key=lambda lk: lk.name):
        nic = by_name.get(link.name)
        if nic is not None and _same_device(nic, link, sys):
            out.append(nic)
            continue
        foreign += nic is not None
        nic = nic_from_kernel(link, sys)
        nic.ipv4 = list(ipv4.get(link.name, []))
        nic.ipv6 = list(ipv6.get(link.name, []))
        out.append(nic)
    foreign += len(set(by_name) - {lk.name for lk in links})
    if foreign:
        return out, f"kernel (sysfs shows another network namespace: {foreign} interface(s) not ours)"
    return out, "sysfs"
