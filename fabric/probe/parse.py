"""Pure parsers for sysfs/procfs attribute text.

Each takes the text of one attribute and returns a value, or raises ``ValueError``
saying what was wrong; the caller (``Root.parse``) turns that into a warning naming
the file. They accept every spelling the kernel and the rdma-core tools print for
the same thing (``4: ACTIVE``, ``Active (4)``, ``PORT_ACTIVE (4)``, ``Active``).
"""

from __future__ import annotations

import ipaddress
import re

from aitrain.errors import FabricError
from aitrain.fabric.host import cpus as host_cpus
from aitrain.fabric.topology import (
    GID_TYPE_IB_ROCE_V1,
    GID_TYPE_ROCE_V2,
    LINK_LAYER_ETHERNET,
    LINK_LAYER_IB,
    Limit,
)

# drivers/infiniband/core/sysfs.c
PORT_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
PHYS_STATES = {
    0: "<unknown>",
    1: "Sleep",
    2: "Polling",
    3: "Disabled",
    4: "PortConfigurationTraining",
    5: "LinkUp",
    6: "LinkErrorRecovery",
    7: "Phy Test",
}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_STATE_BY_SQUASHED = {_squash(v): v for v in PORT_STATES.values()}
_STATE_BY_SQUASHED.update({"portactive": "ACTIVE", "portdown": "DOWN", "portinit": "INIT",
                           "portarmed": "ARMED", "portactivedefer": "ACTIVE_DEFER", "portnop": "NOP"})
_PHYS_BY_SQUASHED = {_squash(v): v for v in PHYS_STATES.values()}
_PHYS_BY_SQUASHED.update({"training": "PortConfigurationTraining", "linkuptraining": "PortConfigurationTraining",
                          "phytest": "Phy Test", "unknown": "<unknown>", "nop": "<unknown>"})

_CODE_PREFIX = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$")  # "4: ACTIVE"
_CODE_SUFFIX = re.compile(r"^\s*(.*?)\s*\(\s*(\d+)\s*\)\s*$")  # "Active (4)"


def _split_code(text: str) -> tuple[int | None, str]:
    m = _CODE_PREFIX.match(text)
    if m:
        return int(m.group(1)), m.group(2)
    m = _CODE_SUFFIX.match(text)
    if m:
        return int(m.group(2)), m.group(1)
    return None, text.strip()


def _enum_state(text: str, table: dict[int, str], by_name: dict[str, str], what: str) -> tuple[str, str | None]:
    """(canonical name, note). The numeric code wins over the name when they disagree,
    because the kernel prints the name from the code: a mismatch means an edited file."""
    code, name = _split_code(text)
    named = by_name.get(_squash(name)) if name else None
    if code is not None:
        if code not in table:
            raise ValueError(f"unknown {what} code {code} (expected 0-{max(table)})")
        canonical = table[code]
        if name and named != canonical:
            return canonical, (
                f"{what} {text.strip()!r}: the name does not match code {code} "
                f"({canonical}); using the code"
            )
        return canonical, None
    if named is None:
        raise ValueError(f"unknown {what} {name!r} (expected one of {', '.join(table.values())})")
    return named, None


def parse_port_state(text: str) -> tuple[str, str | None]:
    return _enum_state(text, PORT_STATES, _STATE_BY_SQUASHED, "port state")


def parse_phys_state(text: str) -> tuple[str, str | None]:
    return _enum_state(text, PHYS_STATES, _PHYS_BY_SQUASHED, "phys_state")


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:gb/sec|gbps|gb/s|gbit/s)?\b", re.IGNORECASE)


def parse_rate_gbps(text: str) -> float:
    """``400 Gb/sec (4X NDR)``, ``2.5 Gb/sec (1X SDR)``, ``Rate: 400`` -> Gb/s."""
    m = _RATE.match(text)
    if not m:
        raise ValueError("expected '<n> Gb/sec (<width>X <speed>)'")
    rate = float(m.group(1))
    if not 0 <= rate <= 100_000:
        raise ValueError(f"rate {rate} Gb/s is out of range")
    return rate


def parse_link_layer(text: str) -> str:
    s = _squash(text)
    if s in ("infiniband", "ib"):
        return LINK_LAYER_IB
    if s in ("ethernet", "eth", "roce"):
        return LINK_LAYER_ETHERNET
    raise ValueError("expected 'InfiniBand' or 'Ethernet'")


def parse_gid(text: str) -> str:
    """A GID in canonical (exploded IPv6) form."""
    try:
        return ipaddress.IPv6Address(text.strip()).exploded
    except ValueError as e:
        raise ValueError(f"not a GID: {e}") from None


def parse_gid_type(text: str) -> str:
    s = _squash(text)
    if s in ("ibrocev1", "rocev1", "ib", "v1"):
        return GID_TYPE_IB_ROCE_V1
    if s in ("rocev2", "v2"):
        return GID_TYPE_ROCE_V2
    raise ValueError("expected 'IB/RoCE v1' or 'RoCE v2'")


def parse_int(text: str) -> int:
    text = text.strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ValueError("expected a decimal integer")
    return int(text)


def parse_hex(text: str) -> int:
    text = text.strip()
    if not re.fullmatch(r"(0[xX])?[0-9a-fA-F]+", text):
        raise ValueError("expected a hexadecimal integer")
    return int(text, 16)


def parse_numa_node(text: str) -> int | None:
    node = parse_int(text)
    if node < -1 or node > 4096:
        raise ValueError(f"NUMA node {node} is out of range")
    return None if node == -1 else node


def parse_mtu(text: str) -> int:
    mtu = parse_int(text)
    if not 0 <= mtu <= 1 << 20:
        raise ValueError(f"MTU {mtu} is out of range")
    return mtu


def parse_speed_mbps(text: str) -> int | None:
    """``/sys/class/net/X/speed``: Mb/s, -1 (or 0xffffffff) when unknown."""
    speed = parse_int(text)
    if speed in (-1, 4294967295) or speed == 0:
        return None
    if speed < 0 or speed > 10_000_000:
        raise ValueError(f"speed {speed} Mb/s is out of range")
    return speed


_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2})+$")


def parse_mac(text: str) -> str:
    text = text.strip().lower()
    if not _MAC.match(text):
        raise ValueError("expected colon-separated hex bytes")
    return text


_PCI_SPEED = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*GT/s", re.IGNORECASE)


def parse_pci_speed(text: str) -> float | None:
    """``16.0 GT/s PCIe``, ``8 GT/s``; ``Unknown`` (VFs, some bridges) is None."""
    if text.strip().lower().startswith("unknown"):
        return None
    m = _PCI_SPEED.match(text)
    if not m:
        raise ValueError("expected '<n> GT/s'")
    speed = float(m.group(1))
    if not 0 < speed <= 1000:
        raise ValueError(f"PCIe speed {speed} GT/s is out of range")
    return speed


def parse_pci_width(text: str) -> int | None:
    text = text.strip().lower().lstrip("x")
    width = parse_int(text)
    if width == 0 or width == 255:  # unknown / not negotiated
        return None
    if width not in (1, 2, 4, 8, 12, 16, 32):
        raise ValueError(f"PCIe width x{width} does not exist")
    return width


def parse_cpulist(text: str) -> list[int]:
    """``0-3,8-11`` -> [0, 1, 2, 3, 8, 9, 10, 11]; empty -> [].

    :func:`aitrain.fabric.host.cpus.parse_cpulist`, raising ``ValueError`` (what
    ``Root.parse`` turns into a warning) where that raises :class:`FabricError`."""
    try:
        return host_cpus.parse_cpulist(text)
    except FabricError as e:
        raise ValueError(e.message) from None


def parse_bdf(text: str) -> str:
    """A PCI address, normalized to ``dddd:bb:dd.f`` lowercase (``00000000:0C:00.0`` too)."""
    m = re.fullmatch(r"(?:([0-9a-fA-F]{4,8}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])", text.strip())
    if not m:
        raise ValueError("expected a PCI address dddd:bb:dd.f")
    domain = int(m.group(1) or "0", 16)
    if domain > 0xFFFF:
        raise ValueError("PCI domain out of range")
    return f"{domain:04x}:{m.group(2).lower()}:{m.group(3).lower()}.{m.group(4)}"


BDF_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


def is_bdf(name: str) -> bool:
    return bool(BDF_RE.match(name))


# --------------------------------------------------------------------------- procfs files


def parse_limits(text: str) -> dict[str, Limit]:
    """``/proc/<pid>/limits`` -> {"Max locked memory": Limit(soft, hard)}; None = unlimited."""
    out: dict[str, Limit] = {}
    lines = text.splitlines()
    if not lines or not lines[0].startswith("Limit"):
        raise ValueError("expected a header line starting with 'Limit'")
    for line in lines[1:]:
        m = re.match(r"^(Max [A-Za-z ]+?)\s{2,}(\S+)\s+(\S+)", line)
        if not m:
            continue
        try:
            out[m.group(1)] = Limit(soft=_limit(m.group(2)), hard=_limit(m.group(3)))
        except ValueError:
            continue
    return out


def _limit(text: str) -> int | None:
    if text == "unlimited":
        return None
    value = parse_int(text)
    if value < 0:
        raise ValueError("negative limit")
    return value


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` (or a node's ``meminfo``) -> {"MemTotal": kib}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^(?:Node \d+ )?([A-Za-z0-9_()]+):\s+(\d+)(?:\s+kB)?\s*$", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


_SIZE_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """tmpfs ``size=`` values: ``65536k``, ``32g``, ``1048576``."""
    m = re.fullmatch(r"(\d+)([kKmMgGtT]?)", text.strip())
    if not m:
        raise ValueError("expected a size like 64g")
    return int(m.group(1)) * _SIZE_SUFFIX[m.group(2).lower()]


def parse_shm_size(mounts: str) -> int | None:
    """The ``size=`` of the tmpfs on /dev/shm in ``/proc/mounts``; None if not given."""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "/dev/shm":
            for opt in parts[3].split(","):
                if opt.startswith("size="):
                    try:
                        return parse_size(opt[5:])
                    except ValueError:
                        return None
    return None


def parse_modules(text: str) -> set[str]:
    """``/proc/modules`` -> loaded module names."""
    names = set()
    for line in text.splitlines():
        parts = line.split()
        if parts and re.fullmatch(r"[A-Za-z0-9_\-]+", parts[0]):
            names.add(parts[0].replace("-", "_"))
    return names


def parse_nvidia_driver(text: str) -> tuple[str, bool]:
    """``/proc/driver/nvidia/version`` -> (version, is the open kernel module)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", first)
    if not m:
        raise ValueError("expected 'NVRM version: NVIDIA UNIX ... Kernel Module <version>'")
    return m.group(1), "Open Kernel Module" in first


def parse_kernel_version(text: str) -> tuple[int, int]:
    m = re.match(r"^\s*(\d+)\.(\d+)", text)
    if not m:
        raise ValueError("expected a kernel release like 6.1.0-18-amd64")
    return int(m.group(1)), int(m.group(2))


def cpuinfo_has_hypervisor_flag(text: str) -> bool:
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return "hypervisor" in line.split(":", 1)[1].split()
    return False


_HYPERVISOR_VENDORS = {
    "qemu": "kvm",
    "kvm": "kvm",
    "vmware": "vmware",
    "virtualbox": "virtualbox",
    "innotek": "virtualbox",
    "xen": "xen",
    "amazon ec2": "kvm",
    "google compute engine": "kvm",
    "microsoft corporation": "hyperv",
    "openstack": "kvm",
    "bochs": "kvm",
}


def hypervisor_from_dmi(sys_vendor: str | None, product_name: str | None) -> str | None:
    text = f"{sys_vendor or ''} {product_name or ''}".lower()
    for needle, name in _HYPERVISOR_VENDORS.items():
        if needle in text:
            # Hyper-V hosts and bare-metal Surface machines share the vendor string;
            # only "Virtual Machine" products are VMs.
            if name == "hyperv" and "virtual" not in text:
                continue
            return name
    return None
