"""The attribute parsers: every spelling the kernel and the rdma-core tools print."""

from __future__ import annotations

import pytest

from aitrain.fabric.probe import parse
from aitrain.fabric.topology import Limit


@pytest.mark.parametrize("text, expected", [
    ("4: ACTIVE", "ACTIVE"),
    ("4: ACTIVE\n", "ACTIVE"),
    ("1: DOWN", "DOWN"),
    ("2: INIT", "INIT"),
    ("3: ARMED", "ARMED"),
    ("5: ACTIVE_DEFER", "ACTIVE_DEFER"),
    ("Active (4)", "ACTIVE"),
    ("PORT_ACTIVE (4)", "ACTIVE"),
    ("PORT_DOWN (1)", "DOWN"),
    ("Active", "ACTIVE"),
    ("Down", "DOWN"),
    ("Initializing", None),
])
def test_port_state_spellings(text, expected):
    if expected is None:
        with pytest.raises(ValueError):
            parse.parse_port_state(text)
    else:
        assert parse.parse_port_state(text) == (expected, None)


@pytest.mark.parametrize("text, expected", [
    ("5: LinkUp", "LinkUp"),
    ("2: Polling", "Polling"),
    ("3: Disabled", "Disabled"),
    ("4: PortConfigurationTraining", "PortConfigurationTraining"),
    ("6: LinkErrorRecovery", "LinkErrorRecovery"),
    ("7: Phy Test", "Phy Test"),
    ("Link up (5)", "LinkUp"),
    ("LINK_UP (5)", "LinkUp"),
    ("LinkUp", "LinkUp"),
    ("Polling", "Polling"),
    ("Disabled", "Disabled"),
    ("4: Training", "PortConfigurationTraining"),  # k8s-test-infra mock spelling
])
def test_phys_state_spellings(text, expected):
    assert parse.parse_phys_state(text)[0] == expected


def test_phys_state_name_that_contradicts_code_trusts_code_and_says_so():
    # procfs fixture: mlx5_0 phys_state "4: ACTIVE" (hand-edited upstream)
    name, note = parse.parse_phys_state("4: ACTIVE")
    assert name == "PortConfigurationTraining"
    assert note and "code 4" in note and "ACTIVE" in note


@pytest.mark.parametrize("text", ["9: ACTIVE", "42: LinkUp", "ACTIVEISH", "", ":"])
def test_state_garbage_raises(text):
    with pytest.raises(ValueError):
        parse.parse_port_state(text)


@pytest.mark.parametrize("text", ["8: LinkUp", "Bogus", "99: x"])
def test_phys_garbage_raises(text):
    with pytest.raises(ValueError):
        parse.parse_phys_state(text)


@pytest.mark.parametrize("text, rate", [
    ("400 Gb/sec (4X NDR)", 400.0),
    ("200 Gb/sec (4X HDR)", 200.0),
    ("200 Gb/sec (2X NDR)", 200.0),
    ("100 Gb/sec (4X EDR)", 100.0),
    ("25 Gb/sec (1X EDR)", 25.0),
    ("40 Gb/sec (4X QDR)", 40.0),
    ("56 Gb/sec (4X FDR)", 56.0),
    ("2.5 Gb/sec (1X SDR)", 2.5),
    ("800 Gb/sec (4X XDR)", 800.0),
    ("400", 400.0),
    ("10 Gb/sec (4X)", 10.0),
])
def test_rate(text, rate):
    assert parse.parse_rate_gbps(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "Gb/sec", "-5 Gb/sec", "999999 Gb/sec"])
def test_rate_garbage(text):
    with pytest.raises(ValueError):
        parse.parse_rate_gbps(text)


@pytest.mark.parametrize("text, expected", [
    ("InfiniBand", "InfiniBand"), ("Ethernet", "Ethernet"), ("IB", "InfiniBand"),
    ("ethernet", "Ethernet"), ("INFINIBAND", "InfiniBand"),
])
def test_link_layer(text, expected):
    assert parse.parse_link_layer(text) == expected


@pytest.mark.parametrize("text", ["Infini", "Omni-Path", "", "Unspecified"])
def test_link_layer_garbage(text):
    with pytest.raises(ValueError):
        parse.parse_link_layer(text)


@pytest.mark.parametrize("text, expected", [
    ("fe80:0000:0000:0000:0ac0:ebff:feda:1cfb", "fe80:0000:0000:0000:0ac0:ebff:feda:1cfb"),
    ("fe80::ac0:ebff:feda:1cfb", "fe80:0000:0000:0000:0ac0:ebff:feda:1cfb"),
    ("::ffff:200.0.209.6", "0000:0000:0000:0000:0000:ffff:c800:d106"),
    ("0000:0000:0000:0000:0000:ffff:0b87:3c08", "0000:0000:0000:0000:0000:ffff:0b87:3c08"),
])
def test_gid_canonical_form(text, expected):
    assert parse.parse_gid(text) == expected


@pytest.mark.parametrize("text", ["fe80::zz", "not-a-gid", "1.2.3.4", ""])
def test_gid_garbage(text):
    with pytest.raises(ValueError):
        parse.parse_gid(text)


@pytest.mark.parametrize("text, expected", [
    ("IB/RoCE v1", "IB/RoCE v1"), ("RoCE v2", "RoCE v2"), ("RoCE v1", "IB/RoCE v1"),
    ("RoCEv2", "RoCE v2"), ("IB", "IB/RoCE v1"),
])
def test_gid_type(text, expected):
    assert parse.parse_gid_type(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("16.0 GT/s PCIe", 16.0), ("16 GT/s", 16.0), ("8.0 GT/s PCIe", 8.0), ("2.5 GT/s PCIe", 2.5),
    ("32.0 GT/s PCIe", 32.0), ("64.0 GT/s PCIe", 64.0), ("Unknown", None), ("Unknown speed", None),
])
def test_pci_speed(text, expected):
    assert parse.parse_pci_speed(text) == expected


@pytest.mark.parametrize("text, expected", [("16", 16), ("4", 4), ("x8", 8), ("0", None), ("255", None)])
def test_pci_width(text, expected):
    assert parse.parse_pci_width(text) == expected


@pytest.mark.parametrize("text", ["3", "17", "wide", "-1"])
def test_pci_width_garbage(text):
    with pytest.raises(ValueError):
        parse.parse_pci_width(text)


@pytest.mark.parametrize("text, expected", [
    ("0-3", [0, 1, 2, 3]), ("0-1,4", [0, 1, 4]), ("", []), ("7", [7]), ("0-3:2/4", [0, 1, 2, 3]),
])
def test_cpulist(text, expected):
    assert parse.parse_cpulist(text) == expected


@pytest.mark.parametrize("text", ["3-1", "a-b", "0-", "1,,2"])
def test_cpulist_garbage(text):
    with pytest.raises(ValueError):
        parse.parse_cpulist(text)


@pytest.mark.parametrize("text, expected", [("-1", None), ("0", 0), ("1", 1), ("7", 7)])
def test_numa_node(text, expected):
    assert parse.parse_numa_node(text) == expected


@pytest.mark.parametrize("text", ["-2", "one", "99999"])
def test_numa_node_garbage(text):
    with pytest.raises(ValueError):
        parse.parse_numa_node(text)


@pytest.mark.parametrize("text, expected", [("-1", None), ("0", None), ("100000", 100000), ("4294967295", None)])
def test_speed(text, expected):
    assert parse.parse_speed_mbps(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("0000:0c:00.0", "0000:0c:00.0"), ("00000000:0C:00.0", "0000:0c:00.0"), ("0c:00.0", "0000:0c:00.0"),
    ("0001:A1:1f.7", "0001:a1:1f.7"),
])
def test_bdf(text, expected):
    assert parse.parse_bdf(text) == expected


@pytest.mark.parametrize("text", ["virtio0", "0000:0c:00", "0000:0c:00.8", "100000000:0c:00.0"])
def test_bdf_garbage(text):
    with pytest.raises(ValueError):
        parse.parse_bdf(text)


@pytest.mark.parametrize("text, ok", [
    ("02:fc:00:00:00:01", True),
    ("80:00:00:48:fe:80:00:00:00:00:00:00:94:6d:ae:03:00:cd:e7:2c", True),  # IPoIB, 20 bytes
    ("address", False),  # gcm redaction placeholder
    ("", False),
])
def test_mac(text, ok):
    if ok:
        assert parse.parse_mac(text) == text.lower()
    else:
        with pytest.raises(ValueError):
            parse.parse_mac(text)


LIMITS = """Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max open files            1024                 1048576              files     
Max locked memory         8388608              unlimited            bytes     
Max address space         unlimited            unlimited            bytes     
"""


def test_limits():
    limits = parse.parse_limits(LIMITS)
    assert limits["Max locked memory"] == Limit(soft=8388608, hard=None)
    assert limits["Max open files"] == Limit(soft=1024, hard=1048576)


def test_limits_without_header_raises():
    with pytest.raises(ValueError):
        parse.parse_limits("Max locked memory 1 1 bytes")


def test_meminfo_host_and_node():
    assert parse.parse_meminfo("MemTotal:       24684084 kB\nMemFree: 1 kB\n")["MemTotal"] == 24684084
    assert parse.parse_meminfo("Node 1 MemTotal:       100 kB\n")["MemTotal"] == 100


@pytest.mark.parametrize("mounts, expected", [
    ("tmpfs /dev/shm tmpfs rw,nosuid,nodev,size=65536k,inode64 0 0\n", 65536 * 1024),
    ("shm /dev/shm tmpfs rw,size=64g 0 0\n", 64 << 30),
    ("tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0\n", None),
    ("tmpfs /run tmpfs rw,size=1g 0 0\n", None),
    ("tmpfs /dev/shm tmpfs rw,size=lots 0 0\n", None),
])
def test_shm_size(mounts, expected):
    assert parse.parse_shm_size(mounts) == expected


def test_modules():
    text = "nvidia_peermem 16384 0 - Live 0x0\nmlx5_ib 458752 0 - Live 0x0\n\n"
    assert parse.parse_modules(text) == {"nvidia_peermem", "mlx5_ib"}


@pytest.mark.parametrize("text, expected", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n",
     ("535.104.05", False)),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build\n", ("550.54.15", True)),
])
def test_nvidia_driver(text, expected):
    assert parse.parse_nvidia_driver(text) == expected


def test_nvidia_driver_garbage():
    with pytest.raises(ValueError):
        parse.parse_nvidia_driver("nothing here")


@pytest.mark.parametrize("text, expected", [("6.1.0-18-amd64", (6, 1)), ("5.15.0-91-generic", (5, 15))])
def test_kernel_version(text, expected):
    assert parse.parse_kernel_version(text) == expected


def test_cpuinfo_hypervisor_flag():
    assert parse.cpuinfo_has_hypervisor_flag("flags\t\t: fpu vme hypervisor lm\n")
    assert not parse.cpuinfo_has_hypervisor_flag("flags\t\t: fpu vme lm\n")


@pytest.mark.parametrize("vendor, product, expected", [
    ("QEMU", "Standard PC (Q35 + ICH9, 2009)", "kvm"),
    ("Amazon EC2", "p5.48xlarge", "kvm"),
    ("Microsoft Corporation", "Virtual Machine", "hyperv"),
    ("Microsoft Corporation", "Surface Laptop", None),
    ("NVIDIA", "DGXH100", None),
    (None, None, None),
])
def test_hypervisor_from_dmi(vendor, product, expected):
    assert parse.hypervisor_from_dmi(vendor, product) == expected


@pytest.mark.parametrize("text, expected", [("65536k", 65536 << 10), ("32G", 32 << 30), ("100", 100)])
def test_size(text, expected):
    assert parse.parse_size(text) == expected
