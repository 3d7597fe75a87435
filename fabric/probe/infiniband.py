"""RDMA devices from ``<sysfs>/class/infiniband`` (InfiniBand, RoCE, Omni-Path).

Per port: ``state``, ``phys_state``, ``rate``, ``link_layer``, ``lid`` and the GID
table (``gids/I``, ``gid_attrs/types/I``, ``gid_attrs/ndevs/I``). sysfs has no active
MTU; for RoCE it is derived from the netdev MTU the way the kernel derives it.
"""

from __future__ import annotations

import re

from aitrain.fabric.probe import parse
from aitrain.fabric.probe.fs import Root, clip
from aitrain.fabric.topology import Gid, Nic, RdmaDevice, RdmaPort

IB_MTUS = (4096, 2048, 1024, 512, 256)
# GRH + UDP + BTH + XRC ext + AtomicETH + ICRC, include/rdma/ib_verbs.h iboe_get_mtu()
ROCE_HEADER_BYTES = 40 + 8 + 12 + 4 + 28 + 4

_GUID = re.compile(r"^[0-9a-f]{4}(:[0-9a-f]{4}){3}$")
_FW = re.compile(r"^\d+(\.\d+)+")


def roce_mtu_for_netdev(netdev_mtu: int | None) -> int | None:
    """The active IB MTU a RoCE port gets over a netdev with this MTU (1500 -> 1024)."""
    if netdev_mtu is None:
        return None
    payload = netdev_mtu - ROCE_HEADER_BYTES
    for mtu in IB_MTUS:
        if payload >= mtu:
            return mtu
    return None


def netdev_mtu_for_roce(ib_mtu: int = 4096) -> int:
    """The smallest netdev MTU that lets RoCE run at ``ib_mtu``."""
    return ib_mtu + ROCE_HEADER_BYTES


def _checked(sys: Root, rel: str, pattern: re.Pattern[str], what: str) -> str | None:
    """A free-text attribute kept as read, with a warning if it does not look right
    (captured trees replace values with placeholders like ``node_guid``)."""
    value = sys.read_value(rel)
    if value is not None and not pattern.match(value):
        sys.warn(sys.join(rel), f"unexpected content {clip(value)}: not a {what}")
    return value


def read_rdma_devices(sys: Root, nics: list[Nic] | None = None) -> list[RdmaDevice]:
    nic_by_name = {n.name: n for n in nics or []}
    devices = []
    for name in sys.listdir("class/infiniband"):
        base = f"class/infiniband/{name}"
        if not sys.is_dir(base):
            continue
        devices.append(_read_device(sys, name, base, nic_by_name))
    return devices


def _read_device(sys: Root, name: str, base: str, nic_by_name: dict[str, Nic]) -> RdmaDevice:
    node_type = sys.read_value(f"{base}/node_type")
    if node_type and ":" in node_type:
        node_type = node_type.split(":", 1)[1].strip()
    node_desc = sys.read_value(f"{base}/node_desc", quiet=True)
    dev = RdmaDevice(
        name=name,
        hca_type=sys.read_value(f"{base}/hca_type"),
        fw_ver=_checked(sys, f"{base}/fw_ver", _FW, "firmware version"),
        node_guid=_checked(sys, f"{base}/node_guid", _GUID, "GUID (xxxx:xxxx:xxxx:xxxx)"),
        board_id=sys.read_value(f"{base}/board_id"),
        node_type=node_type,
        node_desc=node_desc,
    )
    device = sys.resolve(f"{base}/device")
    if device is not None:
        try:
            dev.pci_address = parse.parse_bdf(device.name)
        except ValueError:
            dev.pci_address = None
        dev.numa_node = sys.parse(f"{base}/device/numa_node", parse.parse_numa_node)
        dev.netdevs = [n for n in sys.listdir(f"{base}/device/net")]
    for entry in sys.listdir(f"{base}/ports"):
        if not entry.isdigit():
            sys.warn(sys.join(f"{base}/ports/{entry}"), "port directory name is not a number")
            continue
        dev.ports.append(_read_port(sys, f"{base}/ports/{entry}", int(entry), dev, nic_by_name))
    dev.ports.sort(key=lambda p: p.port)
    return dev


def _read_port(sys: Root, base: str, number: int, dev: RdmaDevice, nic_by_name: dict[str, Nic]) -> RdmaPort:
    port = RdmaPort(port=number)
    state = sys.parse(f"{base}/state", parse.parse_port_state, quiet_missing=False)
    if state is not None:
        port.state, note = state
        if note:
            sys.warn(sys.join(f"{base}/state"), note)
    phys = sys.parse(f"{base}/phys_state", parse.parse_phys_state, quiet_missing=False)
    if phys is not None:
        port.phys_state, note = phys
        if note:
            sys.warn(sys.join(f"{base}/phys_state"), note)
    port.rate_text = sys.read_value(f"{base}/rate")
    if port.rate_text is not None:
        try:
            port.rate_gbps = parse.parse_rate_gbps(port.rate_text)
        except ValueError as e:
            sys.warn(sys.join(f"{base}/rate"), f"unexpected content {clip(port.rate_text)}: {e}")
    port.link_layer = sys.parse(f"{base}/link_layer", parse.parse_link_layer) or "unknown"
    port.lid = sys.read_value(f"{base}/lid", quiet=True)
    port.gids, port.gids_known = _read_gids(sys, base)
    port.netdev = _port_netdev(sys, port, dev)
    if port.is_roce and port.netdev in nic_by_name:
        port.active_mtu = roce_mtu_for_netdev(nic_by_name[port.netdev].mtu)
        port.max_mtu = 4096
    return port


def _read_gids(sys: Root, base: str) -> tuple[list[Gid], bool]:
    entries = sys.listdir(f"{base}/gids")
    if not entries:
        return [], False
    gids: list[Gid] = []
    for entry in entries:
        if not entry.isdigit():
            continue
        gid = sys.parse(f"{base}/gids/{entry}", parse.parse_gid)
        if gid is None or int(gid.replace(":", ""), 16) == 0:
            continue  # empty slot: its type/ndev read EINVAL
        gtype = sys.parse(f"{base}/gid_attrs/types/{entry}", parse.parse_gid_type, quiet=True)
        ndev = sys.read_value(f"{base}/gid_attrs/ndevs/{entry}", quiet=True)
        gids.append(Gid(index=int(entry), gid=gid, type=gtype, netdev=ndev))
    gids.sort(key=lambda g: g.index)
    return gids, True


def _port_netdev(sys: Root, port: RdmaPort, dev: RdmaDevice) -> str | None:
    """The port's net device: the GID table's netdev (RoCE), else the PCI function's
    netdev whose ``dev_port`` matches (IPoIB, or RoCE without a readable GID table)."""
    for gid in port.gids:
        if gid.netdev:
            return gid.netdev
    if not dev.netdevs:
        return None
    if len(dev.netdevs) == 1:
        return dev.netdevs[0]
    for name in dev.netdevs:
        dev_port = sys.parse(f"class/net/{name}/dev_port", parse.parse_int, quiet=True)
        if dev_port is not None and dev_port + 1 == port.port:
            return name
    return None
