"""The live probe inside a network namespace entered with nsenter --net: /sys/class/net
still shows the root namespace, so NICs must come from the namespace's own view."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aitrain.fabric.probe.fs import Root
from aitrain.fabric.probe.net import read_nics
from aitrain.fabric.probe.netns import IFF_RUNNING, IFF_UP, KernelLink, read_kernel_links, reconcile_nics

import hostbuilder

UP = IFF_UP | IFF_RUNNING


def test_reconcile_keeps_same_devices_and_replaces_foreign_ones(tmp_path):
    root = hostbuilder.write_host(hostbuilder.cpu_host("c1"), tmp_path / "c1")
    sys_root = Root(root / "sys", [])
    nics = read_nics(sys_root)
    eno1 = next(n for n in nics if n.name == "eno1")
    ifindex = int((root / "sys/class/net/eno1/ifindex").read_text())
    links = [
        KernelLink("lo", 1, flags=UP, mtu=65536, link_type=772),
        KernelLink("eno1", ifindex, flags=UP, mtu=1500, mac=eno1.mac, link_type=1),
        KernelLink("fab0", 3, flags=UP, mtu=9000, mac="d6:73:ca:41:97:27", link_type=1, driver="veth",
                   speed_mbps=10000),
    ]
    out, source = reconcile_nics(nics, sys_root, {"fab0": ["10.1.2.3/24"]}, {}, links)
    by = {n.name: n for n in out}
    assert set(by) == {"lo", "eno1", "fab0"}
    assert by["eno1"] is eno1  # sysfs describes this very device: keep its details
    assert by["fab0"].kind == "veth" and by["fab0"].virtual and by["fab0"].mtu == 9000
    assert by["fab0"].ipv4 == ["10.1.2.3/24"] and by["fab0"].speed_mbps == 10000
    assert source == "sysfs"  # every sysfs name we kept is ours; fab0 is simply new


def test_reconcile_drops_a_same_named_device_of_another_namespace(tmp_path):
    root = hostbuilder.write_host(hostbuilder.cpu_host("c1"), tmp_path / "c1")
    sys_root = Root(root / "sys", [])
    nics = read_nics(sys_root)
    links = [KernelLink("eno1", 77, flags=IFF_UP, mtu=1500, mac="ba:d5:e5:4a:c8:10", link_type=1,
                        driver="veth")]
    out, source = reconcile_nics(nics, sys_root, {}, {}, links)
    assert [(n.name, n.kind, n.operstate) for n in out] == [("eno1", "veth", "down")]
    assert source.startswith("kernel")


def test_kernel_links_of_this_namespace():
    links = read_kernel_links()
    assert links is not None
    lo = next(lk for lk in links if lk.name == "lo")
    assert lo.ifindex == 1 and lo.link_type == 772 and lo.flags & IFF_UP


@pytest.mark.netns
def test_probe_inside_a_rig_namespace_sees_its_own_nics(rig):
    h = rig.hosts[0]
    code = ("import json; from aitrain.fabric import probe; "
            "t = probe(pyverbs=False, nvml=False, software=False); "
            "print(json.dumps([[n.name, n.kind, n.mtu, n.ipv4, n.operstate] for n in t.nics]))")
    out = subprocess.run([*h.nsenter(), sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    nics = {n[0]: n for n in json.loads(out.stdout)}
    assert set(nics) == {"lo", "eth0", "fab0"}
    assert nics["fab0"][1:] == ["veth", 9000, [f"{h.fabric_ip}/24"], "up"]
    assert nics["eth0"][1:] == ["veth", 1500, [f"{h.mgmt_ip}/24"], "up"]
