"""Network interfaces from ``<sysfs>/class/net``."""

from __future__ import annotations

from pathlib import Path

from aitrain.fabric.probe import parse
from aitrain.fabric.probe.fs import Root
from aitrain.fabric.probe.routes import NetState
from aitrain.fabric.topology import Nic

ARPHRD_ETHER = 1
ARPHRD_INFINIBAND = 32
ARPHRD_LOOPBACK = 772

_VIRTUAL_PREFIXES = (
    ("docker", "docker"),
    ("br-", "docker"),
    ("veth", "veth"),
    ("virbr", "bridge"),
    ("cni", "bridge"),
    ("flannel", "virtual"),
    ("cali", "veth"),
    ("vxlan", "virtual"),
    ("tun", "tun"),
    ("tap", "tun"),
)

_DEVTYPES = {"bridge": "bridge", "vlan": "vlan", "bond": "bond", "vxlan": "virtual", "wireguard": "tun"}


def _uevent(sys: Root, rel: str) -> dict[str, str]:
    text = sys.read_text(rel, quiet=True) or ""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def classify(sys: Root, base: str, name: str, link_type: int | None, has_device: bool) -> str:
    """What kind of interface this is, from sysfs structure first, the name last."""
    if name == "lo" or link_type == ARPHRD_LOOPBACK:
        return "loopback"
    devtype = _uevent(sys, f"{base}/uevent").get("DEVTYPE")
    if name.startswith("docker") or name.startswith("br-"):
        return "docker"
    if devtype in _DEVTYPES:
        return _DEVTYPES[devtype]
    if sys.is_dir(f"{base}/bridge"):
        return "bridge"
    if sys.is_dir(f"{base}/bonding"):
        return "bond"
    if sys.is_file(f"{base}/tun_flags"):
        return "tun"
    if has_device:
        return "ipoib" if link_type == ARPHRD_INFINIBAND else "physical"
    for prefix, kind in _VIRTUAL_PREFIXES:
        if name.startswith(prefix):
            return kind
    return "virtual"


def _pci_address(device: Path | None) -> str | None:
    """The PCI function behind a net device; virtio NICs sit one level below it."""
    for candidate in (device, device.parent if device is not None else None):
        if candidate is not None and parse.is_bdf(candidate.name.lower()):
            return candidate.name.lower()
    return None


def read_nics(sys: Root, net: NetState | None = None) -> list[Nic]:
    nics: list[Nic] = []
    for name in sys.listdir("class/net"):
        base = f"class/net/{name}"
        if not sys.is_dir(base):
            continue
        link_type = sys.parse(f"{base}/type", parse.parse_int)
        device = sys.resolve(f"{base}/device")
        has_device = device is not None
        kind = classify(sys, base, name, link_type, has_device)
        pci = _pci_address(device)
        operstate = (sys.read_value(f"{base}/operstate") or "unknown").lower()
        nic = Nic(
            name=name,
            kind=kind,
            virtual=not has_device,
            operstate=operstate,
            mtu=sys.parse(f"{base}/mtu", parse.parse_mtu),
            # speed is EINVAL or -1 on a down link: not worth a warning
            speed_mbps=sys.parse(f"{base}/speed", parse.parse_speed_mbps, quiet=operstate != "up"),
            mac=sys.parse(f"{base}/address", parse.parse_mac),
            driver=sys.link_target_name(f"{base}/device/driver") if has_device else None,
            pci_address=pci,
            numa_node=sys.parse(f"{base}/device/numa_node", parse.parse_numa_node) if has_device else None,
            link_type=link_type,
        )
        if net is not None:
            nic.ipv4 = list(net.ipv4.get(name, []))
            nic.ipv6 = list(net.ipv6.get(name, []))
        nics.append(nic)
    return nics
