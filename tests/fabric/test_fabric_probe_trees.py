"""Probing the synthetic host trees: what a DGX-like and a RoCE host look like."""

from __future__ import annotations

import pytest

from aitrain.errors import FabricError
from aitrain.fabric import probe
from aitrain.fabric.probe import resolve_roots
from aitrain.fabric.probe.pathmap import materialize
from aitrain.fabric.sources import load_hosts
from aitrain.fabric.topology import gpu_nic_distances

import hostbuilder


def test_dgx_inventory(dgx):
    assert dgx.hostname == "dgx01"
    assert len(dgx.gpus) == 8 and all(g.vendor == "nvidia" and g.source == "sysfs" for g in dgx.gpus)
    assert len(dgx.rdma_devices) == 8
    for dev, port in dgx.rdma_ports():
        assert (port.state, port.phys_state, port.rate_gbps, port.link_layer) == \
            ("ACTIVE", "LinkUp", 400.0, "InfiniBand")
        assert dev.pci_address and dev.numa_node in (0, 1)
        assert port.gids_known and port.gids[0].type == "IB/RoCE v1" and port.gids[0].is_link_local
        assert port.active_mtu is None  # sysfs has no IB active MTU
    assert dgx.warnings == []


def test_dgx_nics_kinds_drivers_and_addresses(dgx):
    nics = {n.name: n for n in dgx.nics}
    assert nics["eno1"].kind == "physical" and nics["eno1"].driver == "igb" and nics["eno1"].ipv4 == ["10.0.0.11/24"]
    assert nics["docker0"].kind == "docker" and nics["docker0"].virtual
    assert nics["lo"].kind == "loopback"
    assert nics["ibp0s0"].kind == "ipoib" and nics["ibp0s0"].ipv4 == ["172.16.0.1/24"]
    assert nics["ibp0s0"].pci_address == dgx.rdma_devices[0].pci_address


def test_dgx_port_netdev_from_pci_function(dgx):
    assert [p.netdev for _, p in dgx.rdma_ports()] == [f"ibp{i}s0" for i in range(8)]


def test_dgx_host_info(dgx):
    h = dgx.host
    assert h.kernel == "6.1.0-18-amd64" and h.cpus == 224 and len(h.numa_nodes) == 2
    assert h.numa_nodes[1].cpulist == "56-111,168-223" and h.numa_nodes[1].cpus == 112
    assert h.memlock.soft is None and h.nofile.soft == 1048576
    assert h.shm_bytes == 1056882000 * 1024
    assert h.hypervisor == "none" and h.bare_metal
    assert h.nvidia_peermem and h.driver_version == "550.54.15" and h.dmabuf is False
    assert "mlx5_ib" in h.kernel_modules
    assert h.torch_version is None  # software versions are not read for a captured tree


def test_dgx_pcie_paths_and_distances(dgx):
    gpu0 = dgx.pci(dgx.gpus[0].pci_address)
    assert gpu0.root == "pci0000:10" and len(gpu0.upstream) == 3
    assert (gpu0.current_speed_gts, gpu0.current_width, gpu0.max_width) == (32.0, 16, 16)
    bridges = [p for p in dgx.pci_devices if p.role == "bridge" and p.acs_ctrl is not None]
    assert len(bridges) == 8 * 4 and all(b.acs_ctrl == 0 for b in bridges)
    nearest = {}
    for d in gpu_nic_distances(dgx):
        if d.distance == "same-switch":
            nearest[d.gpu] = d.nic
    assert nearest == {i: f"mlx5_{i}" for i in range(8)}
    kinds = {d.distance for d in gpu_nic_distances(dgx)}
    assert kinds == {"same-switch", "same-numa-node", "cross-socket"}


def test_dgx_routes_and_rendezvous(hosts_dir):
    topo = probe(hosts_dir / "dgx01", rendezvous="10.0.0.12")
    assert topo.routes_known
    assert (topo.rendezvous.interface, topo.rendezvous.local, topo.rendezvous.method) == ("eno1", False, "procfs")
    assert topo.route_to("172.16.3.9").interface == "ibp3s0"
    assert topo.route_to("8.8.8.8").gateway == "10.0.0.1"
    assert topo.route_to("10.0.0.11").local


def test_roce_host(roce):
    assert len(roce.gpus) == 4 and len(roce.rdma_devices) == 2
    for dev, port in roce.rdma_ports():
        assert port.link_layer == "Ethernet" and port.is_roce
        assert port.netdev == f"ens{dev.ports[0].port + int(dev.name[-1])}f0np0"
        assert port.active_mtu == 4096 and port.max_mtu == 4096  # derived from netdev MTU 9000
        v2 = [g for g in port.gids if g.type == "RoCE v2"]
        assert len(v2) == 2 and any(g.ipv4 and g.ipv4.startswith("192.168.") for g in v2)
        assert all(g.netdev == port.netdev for g in port.gids)


def test_roce_mtu_derivation(write_host):
    spec = hostbuilder.roce_mtu_1500(hostbuilder.roce_host())
    topo = probe(write_host(spec))
    assert {p.active_mtu for _, p in topo.rdma_ports()} == {1024}


def test_cpu_host(hosts_dir):
    topo = probe(hosts_dir / "cpu01")
    assert topo.rdma_devices == [] and topo.gpus == []
    assert topo.host.nvidia_peermem is False and topo.host.driver_version is None


def test_vm_is_not_bare_metal(write_host):
    spec = hostbuilder.dgx_h100()
    spec.hypervisor = True
    topo = probe(write_host(spec))
    assert topo.host.hypervisor == "kvm" and topo.host.bare_metal is False


def test_open_kernel_module_on_a_new_kernel_has_dmabuf(write_host):
    spec = hostbuilder.dgx_h100()
    spec.nvidia_driver = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build"
    assert probe(write_host(spec)).host.dmabuf is True


# --------------------------------------------------------------------------- roots


def test_sysfs_root_host_tree_and_sys_dir_are_the_same_host(hosts_dir):
    a = probe(hosts_dir / "dgx01")
    b = probe(hosts_dir / "dgx01" / "sys")
    c = probe(hosts_dir / "dgx01" / "sys", hosts_dir / "dgx01" / "proc")
    assert a.fingerprint() == b.fingerprint() == c.fingerprint()


def test_a_capture_never_mixes_with_this_hosts_proc(tmp_path, hosts_dir):
    # a bare sysfs tree without a sibling proc/ gets no procfs at all, not the live /proc
    (tmp_path / "capture").mkdir()
    (tmp_path / "capture" / "class").symlink_to(hosts_dir / "dgx01" / "sys" / "class")
    sys_path, proc_path = resolve_roots(tmp_path / "capture", "/proc")
    assert proc_path is None
    topo = probe(tmp_path / "capture")
    assert topo.host.kernel is None and not topo.routes_known
    assert topo.hostname == "dgx01"  # from the IB node description, not this host


def test_missing_sysfs_root_says_so(tmp_path):
    with pytest.raises(FabricError, match="does not exist") as e:
        probe(tmp_path / "nope")
    assert "HINT" in str(e.value)


def test_missing_proc_root_says_so(hosts_dir, tmp_path):
    with pytest.raises(FabricError, match="procfs root"):
        probe(hosts_dir / "dgx01" / "sys", tmp_path / "noproc")


def test_sysfs_root_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FabricError, match="not a directory"):
        probe(tmp_path / "f")


def test_empty_directory_is_a_warning_not_a_crash(tmp_path):
    topo = probe(tmp_path)
    assert topo.rdma_devices == [] and topo.nics == []
    assert any("class/" in w.message for w in topo.warnings)


# --------------------------------------------------------------------------- sources


def test_directory_of_host_trees(hosts_dir):
    hosts = load_hosts([hosts_dir])
    assert [h.hostname for h in hosts] == ["cpu01", "dgx01", "dgx02", "roce01", "roce02"]


def test_sources_pairs_proc_roots(hosts_dir):
    hosts = load_hosts([hosts_dir / "dgx01" / "sys"], [hosts_dir / "dgx01" / "proc"])
    assert hosts[0].host.kernel == "6.1.0-18-amd64"
    with pytest.raises(FabricError, match="--proc-root"):
        load_hosts([hosts_dir / "dgx01" / "sys", hosts_dir / "dgx02" / "sys"], [hosts_dir / "dgx01" / "proc"])


def test_sources_probe_json_and_path_map(tmp_path, dgx):
    import json

    (tmp_path / "dgx.json").write_text(json.dumps({"hosts": [dgx.to_dict()]}))
    (tmp_path / "map.json").write_text(json.dumps({
        "/sys/bus/pci/devices/0000:0c:00.0/infiniband/mlx5_0/ports/1/state": "4: ACTIVE\n",
        "/sys/bus/pci/devices/0000:0c:00.0/infiniband/mlx5_0/ports/1/rate": "200 Gb/sec (4X HDR)\n",
        "/proc/sys/kernel/hostname": "mapped\n",
    }))
    hosts = load_hosts([tmp_path / "dgx.json", tmp_path / "map.json"])
    assert hosts[0] == dgx
    assert hosts[1].hostname == "mapped" and hosts[1].rdma_devices[0].port(1).rate_gbps == 200.0


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"a": 1}', "\x00\x01"])
def test_sources_bad_json_file(tmp_path, content):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(FabricError):
        load_hosts([tmp_path / "bad.json"])


def test_sources_directory_with_nothing_in_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FabricError, match="neither a sysfs tree"):
        load_hosts([tmp_path / "empty"])


def test_materialize_refuses_paths_outside_the_tree(tmp_path):
    materialize({"/sys/../../escape": "x", "/sys/class/net/eth0/mtu": "1500\n"}, tmp_path / "t")
    assert not (tmp_path / "escape").exists()
    assert (tmp_path / "t/sys/class/net/eth0/mtu").read_text() == "1500\n"


def test_live_probe_of_this_machine():
    topo = probe()
    assert topo.hostname and topo.routes_known and topo.host.kernel
    assert any(n.kind == "loopback" for n in topo.nics)
    assert topo.host.torch_version  # software versions are read for the live host
    assert topo.sources["pyverbs"] in ("unavailable", "no-devices", "ok")


def test_materialize_when_the_map_has_a_file_where_a_link_goes(tmp_path):
    # found by hypothesis: a map entry that is a file on the path of an implicit link
    paths = {
        "/sys/bus/pci/devices/0000:00:00.0/infiniband/mlx5_0/ports/1/state": "4: ACTIVE\n",
        "/sys/class/infiniband": "not a directory\n",
        "/sys/bus/pci/devices/0000:00:00.0/net/ib0/device": "a file, not a link\n",
        "/sys/bus/pci/devices/0000:00:00.0/net/ib0/mtu": "2044\n",
    }
    root = materialize(paths, tmp_path / "t")
    topo = probe(root)
    assert topo.rdma_devices == [] and any("class/infiniband" in w.path for w in topo.warnings)
