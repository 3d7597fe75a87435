"""PCIe functions of NICs, HCAs and GPUs, and the bridges above them.

Per function: current vs maximum link speed/width, NUMA node, driver, and the chain
of bridges up to the root complex (from the real path of ``bus/pci/devices/<bdf>``).
For bridges, the ACS Control register is read from config space when it is readable
(the extended space past 256 bytes needs root).
"""

from __future__ import annotations

import re

from aitrain.fabric.probe import parse
from aitrain.fabric.probe.fs import Root
from aitrain.fabric.topology import PciDevice

PCI_EXT_CAP_START = 0x100
PCI_EXT_CAP_ID_ACS = 0x000D

_ROOT_COMPLEX = re.compile(r"^pci[0-9a-f]{4}:[0-9a-f]{2}$")

ACS_SV = 0x01
ACS_TB = 0x02
ACS_RR = 0x04  # P2P Request Redirect
ACS_CR = 0x08  # P2P Completion Redirect
ACS_UF = 0x10
ACS_EC = 0x20  # P2P Egress Control
ACS_DT = 0x40
ACS_P2P_REDIRECT = ACS_RR | ACS_CR | ACS_EC
"""The bits that send peer-to-peer traffic up to the root complex."""


def parse_acs_ctrl(config: bytes) -> int | None:
    """The ACS Control register from a config space dump, or None (no ACS capability,
    or the extended config space is not in the dump)."""
    if len(config) < PCI_EXT_CAP_START + 8:
        return None
    offset = PCI_EXT_CAP_START
    seen: set[int] = set()
    while offset >= PCI_EXT_CAP_START and offset + 8 <= len(config) and offset not in seen:
        seen.add(offset)
        header = int.from_bytes(config[offset:offset + 4], "little")
        if header in (0, 0xFFFFFFFF):
            return None
        if header & 0xFFFF == PCI_EXT_CAP_ID_ACS:
            return int.from_bytes(config[offset + 6:offset + 8], "little")
        offset = (header >> 20) & 0xFFC
    return None


def _locate(sys: Root, bdf: str) -> tuple[str, str | None, list[str]]:
    """(sysfs-relative dir, root complex, upstream bridges) of a PCI function."""
    rel = f"bus/pci/devices/{bdf}"
    real = sys.resolve(rel)
    if real is None:
        return rel, None, []
    parts = sys.relative_parts(real)
    root = next((p for p in parts if _ROOT_COMPLEX.match(p)), None)
    if root is None:
        return rel, None, []
    after = parts[parts.index(root) + 1:]
    upstream = [p for p in after[:-1] if parse.is_bdf(p)]
    return "/".join(parts), root, upstream


def read_function(sys: Root, rel: str, address: str, role: str) -> PciDevice:
    dev = PciDevice(address=address, role=role)
    dev.vendor_id = sys.read_value(f"{rel}/vendor", quiet=True)
    dev.device_id = sys.read_value(f"{rel}/device", quiet=True) if sys.is_file(f"{rel}/device") else None
    dev.class_code = sys.read_value(f"{rel}/class", quiet=True)
    dev.driver = sys.link_target_name(f"{rel}/driver")
    dev.numa_node = sys.parse(f"{rel}/numa_node", parse.parse_numa_node)
    dev.current_speed_gts = sys.parse(f"{rel}/current_link_speed", parse.parse_pci_speed)
    dev.current_width = sys.parse(f"{rel}/current_link_width", parse.parse_pci_width)
    dev.max_speed_gts = sys.parse(f"{rel}/max_link_speed", parse.parse_pci_speed)
    dev.max_width = sys.parse(f"{rel}/max_link_width", parse.parse_pci_width)
    if role == "bridge":
        config = sys.read_bytes(f"{rel}/config", quiet=True)
        dev.acs_ctrl = parse_acs_ctrl(config) if config else None
    return dev


def read_pci_devices(sys: Root, targets: dict[str, str]) -> list[PciDevice]:
    """``targets`` maps a PCI address to its role (``nic``, ``gpu``); bridges above
    them are added with role ``bridge``."""
    out: dict[str, PciDevice] = {}
    bridges: dict[str, str] = {}
    for address, role in sorted(targets.items()):
        rel, root, upstream = _locate(sys, address)
        if not sys.is_dir(rel):
            continue
        dev = read_function(sys, rel, address, role)
        dev.root, dev.upstream = root, upstream
        out[address] = dev
        prefix = rel.rsplit("/", 1)[0]
        # bridge dirs are the ancestors of rel, deepest last
        segments = prefix.split("/")
        for i, seg in enumerate(segments):
            if parse.is_bdf(seg) and seg not in bridges:
                bridges[seg] = "/".join(segments[: i + 1])
    for address, rel in bridges.items():
        if address in out:
            continue
        dev = read_function(sys, rel, address, "bridge")
        _, dev.root, dev.upstream = _locate_rel(sys, rel)
        out[address] = dev
    return sorted(out.values(), key=lambda d: d.address)


def _locate_rel(sys: Root, rel: str) -> tuple[str, str | None, list[str]]:
    parts = rel.split("/")
    root = next((p for p in parts if _ROOT_COMPLEX.match(p)), None)
    if root is None:
        return rel, None, []
    after = parts[parts.index(root) + 1:]
    return rel, root, [p for p in after[:-1] if parse.is_bdf(p)]


def effective_max(dev: PciDevice, parent: PciDevice | None) -> tuple[float | None, int | None]:
    """The best link this function can train to: its own maximum, capped by the
    downstream port above it (a Gen5 NIC in a Gen4 slot tops out at Gen4)."""
    speed, width = dev.max_speed_gts, dev.max_width
    if parent is not None:
        if speed is not None and parent.max_speed_gts is not None:
            speed = min(speed, parent.max_speed_gts)
        if width is not None and parent.max_width is not None:
            width = min(width, parent.max_width)
    return speed, width
