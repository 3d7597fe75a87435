"""The published captures in ../shared/fixtures/fabric (see its SOURCES.md), quirks and all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aitrain.fabric import check, probe
from aitrain.fabric.probe.pathmap import load_path_map, materialize
from aitrain.fabric.probe.tools import parse_ibstat, parse_ibstatus, parse_ibv_devinfo, parse_pyverbs_port
from aitrain.fabric.sources import load_hosts
from aitrain.fabric.topology import Gid, HostTopology, RdmaDevice, RdmaPort

GCM = ["learn_good", "learn_ib_intf_bad_rate", "learn_ib_intf_bad_version",
       "learn_ib_intf_operstate_down", "learn_ib_misbound_if", "learn_stuck_ib_intf"]


def ids(findings, host=None):
    return sorted({f.id for f in findings if host is None or f.host == host})


# --------------------------------------------------------------------------- procfs ttar tree


@pytest.fixture(scope="module")
def procfs_topo(shared: Path) -> HostTopology:
    return probe(shared / "procfs-sysfs" / "sys")


def test_procfs_tree_devices(procfs_topo):
    devs = {d.name: d for d in procfs_topo.rdma_devices}
    assert sorted(devs) == ["hfi1_0", "mlx4_0", "mlx5_0"]
    assert devs["hfi1_0"].hca_type is None and devs["hfi1_0"].fw_ver == "1.27.0"
    assert devs["mlx4_0"].hca_type == "MT4099" and len(devs["mlx4_0"].ports) == 2
    assert devs["mlx5_0"].hca_type == "MT4118"


def test_procfs_node_guid_without_trailing_newline(procfs_topo):
    mlx5 = next(d for d in procfs_topo.rdma_devices if d.name == "mlx5_0")
    assert mlx5.node_guid == "0a7f:bc12:45ef:d23b"


def test_procfs_two_line_link_layer_is_infiniband_without_warning(procfs_topo):
    mlx4 = next(d for d in procfs_topo.rdma_devices if d.name == "mlx4_0")
    assert mlx4.port(2).link_layer == "InfiniBand"
    assert not [w for w in procfs_topo.warnings if "mlx4_0/ports/2/link_layer" in w.path]


def test_procfs_rates(procfs_topo):
    rates = {(d.name, p.port): p.rate_gbps for d, p in procfs_topo.rdma_ports()}
    assert rates == {("hfi1_0", 1): 100.0, ("mlx4_0", 1): 40.0, ("mlx4_0", 2): 40.0, ("mlx5_0", 1): 25.0}


def test_procfs_hand_edited_phys_state_is_a_warning_naming_the_file(procfs_topo):
    mlx5 = next(d for d in procfs_topo.rdma_devices if d.name == "mlx5_0")
    assert mlx5.port(1).state == "ACTIVE"
    assert mlx5.port(1).phys_state == "PortConfigurationTraining"
    (w,) = [w for w in procfs_topo.warnings if w.path.endswith("mlx5_0/ports/1/phys_state")]
    assert "4: ACTIVE" in w.message


def test_procfs_check_flags_the_not_linkup_port(procfs_topo):
    findings = check(procfs_topo)
    (f,) = [f for f in findings if f.id == "rdma-port-not-linkup"]
    assert f.subject == "mlx5_0/1" and f.severity.value == "error"
    assert "probe-bad-file-content" in ids(findings)
    # hfi1 (Omni-Path) and mlx4 are different models: no rate comparison between them
    assert "rdma-rate-below-peers" not in ids(findings)


# --------------------------------------------------------------------------- gcm path maps


@pytest.fixture(scope="module")
def gcm(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, HostTopology]:
    out = {}
    for name in GCM:
        root = tmp_path_factory.mktemp(name)
        materialize(load_path_map(shared / "gcm" / f"{name}.json"), root)
        out[name] = probe(root, hostname=name)
    return out


def test_gcm_good_host(gcm):
    topo = gcm["learn_good"]
    assert len(topo.rdma_devices) == 8
    for dev, port in topo.rdma_ports():
        assert (port.state, port.phys_state, port.rate_gbps, port.link_layer) == \
            ("ACTIVE", "LinkUp", 200.0, "InfiniBand")
        assert dev.fw_ver == "20.31.2354"
        assert dev.pci_address and port.netdev and port.netdev.startswith("ib")
    assert {n.name for n in topo.nics} == {f"ib{i}" for i in range(8)}
    assert all(n.kind == "ipoib" and n.mtu == 2044 for n in topo.nics)


def test_gcm_pci_bus_link_speed_lands_on_the_hca(gcm):
    pci = gcm["learn_good"].pci("0000:0c:00.0")
    assert pci is not None and (pci.current_speed_gts, pci.current_width) == (16.0, 16)


def test_gcm_good_host_has_no_errors(gcm):
    findings = check(gcm["learn_good"], expected_rate_gbps=200)
    assert not [f for f in findings if f.severity.value == "error"], findings


def test_gcm_redacted_placeholders_are_warnings_not_values(gcm):
    topo = gcm["learn_good"]
    assert all(n.mac is None for n in topo.nics)  # "address" placeholder
    assert any(w.path.endswith("node_guid") for w in topo.warnings)


@pytest.mark.parametrize("name", ["learn_ib_intf_bad_rate", "learn_ib_intf_bad_version"])
def test_gcm_bad_rate(gcm, name):
    findings = check(gcm[name], expected_rate_gbps=200)
    bad = [f for f in findings if f.id == "rdma-rate-below-expected"]
    assert len(bad) == 8


def test_gcm_bad_version_is_a_firmware_mismatch_across_hosts(gcm):
    findings = check([gcm["learn_good"], gcm["learn_stuck_ib_intf"], gcm["learn_ib_intf_bad_version"]])
    assert "hosts-firmware-mismatch" in ids(findings, "learn_ib_intf_bad_version")


def test_gcm_operstate_down(gcm):
    findings = check(gcm["learn_ib_intf_operstate_down"])
    (f,) = [f for f in findings if f.id == "rdma-netdev-down"]
    assert f.subject == "mlx5_6/1" and "ib4" in f.message


def test_gcm_misbound_interfaces_keep_their_pci_pairing(gcm):
    topo = gcm["learn_ib_misbound_if"]
    by_pci = {d.pci_address: d.name for d in topo.rdma_devices}
    assert by_pci["0000:0c:00.0"] == "mlx5_1"
    assert by_pci["0000:12:00.0"] == "mlx5_0"
    assert by_pci["0000:4b:00.0"] == "mlx5_12"


def test_gcm_stuck_ports(gcm):
    findings = check(gcm["learn_stuck_ib_intf"])
    stuck = sorted(f.subject for f in findings if f.id == "rdma-port-not-active")
    assert stuck == ["mlx5_6/1", "mlx5_8/1"]
    hint = next(f.hint for f in findings if f.id == "rdma-port-not-active")
    assert "subnet manager" in hint


def test_gcm_stuck_host_differs_from_the_good_ones(gcm):
    findings = check([gcm["learn_good"], gcm["learn_ib_intf_operstate_down"], gcm["learn_stuck_ib_intf"]])
    (f,) = [f for f in findings if f.id == "hosts-active-hca-count-mismatch"]
    assert f.host == "learn_stuck_ib_intf" and f.data == {"active": 6, "expected": 8}


def test_gcm_hostname_from_node_desc(shared):
    (topo,) = load_hosts([shared / "gcm" / "learn_stuck_ib_intf.json"])
    assert topo.hostname == "node1661"
    assert all(":" in w.path and "learn_stuck_ib_intf.json" in w.path for w in topo.warnings)


def test_gcm_manifest_is_not_a_path_map(shared):
    from aitrain.errors import FabricError

    with pytest.raises(FabricError):
        load_path_map(shared / "gcm" / "DGX_A100.json")


# --------------------------------------------------------------------------- gpud sysfs tree


@pytest.fixture(scope="module")
def gpud_topo(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> HostTopology:
    root = tmp_path_factory.mktemp("gpud") / "sys"
    (root / "class").mkdir(parents=True)
    (root / "class" / "infiniband").symlink_to(shared / "gpud" / "sysfs" / "sys-class-infiniband-h100.0")
    return probe(root, hostname="h100")


def test_gpud_tree_without_any_trailing_newline(gpud_topo):
    devs = {d.name: d for d in gpud_topo.rdma_devices}
    assert len(devs) == 9
    for name in ("mlx5_0", "mlx5_1", "mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7", "mlx5_8", "mlx5_9"):
        port = devs[name].port(1)
        assert (devs[name].hca_type, port.rate_gbps, port.link_layer) == ("MT4129", 400.0, "InfiniBand")
    bond = devs["mlx5_bond_0"]
    assert (bond.hca_type, bond.fw_ver, bond.port(1).link_layer, bond.port(1).rate_gbps) == \
        ("MT41692", "32.38.3056", "Ethernet", 200.0)
    assert gpud_topo.warnings == []


def test_gpud_check_mixed_fabric_is_not_a_slow_port(gpud_topo):
    findings = check(gpud_topo, expected_rate_gbps=400)
    assert ids(findings) == ["roce-gid-table-unknown"]  # the BlueField bond has no gids/ in the capture


def test_gpud_sysfs_agrees_with_ibstat_of_the_same_host(gpud_topo, shared):
    tool = {d.name: d for d in parse_ibstat((shared / "gpud/ibstat/ibstat.47.0.h100.all.active.2").read_text())}
    sysfs = {d.name: d for d in gpud_topo.rdma_devices}
    assert tool.keys() == sysfs.keys()
    for name, dev in sysfs.items():
        assert (dev.hca_type, dev.fw_ver) == (tool[name].hca_type, tool[name].fw_ver)
        a, b = dev.port(1), tool[name].port(1)
        assert (a.state, a.phys_state, a.rate_gbps, a.link_layer) == (b.state, b.phys_state, b.rate_gbps, b.link_layer)


# --------------------------------------------------------------------------- tool printouts


IBSTAT = sorted(p.name for p in (Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures"
                                  / "fabric" / "gpud" / "ibstat").glob("ibstat.*"))


@pytest.mark.parametrize("name", IBSTAT or ["missing"])
def test_every_ibstat_capture_parses(shared, name):
    devices = parse_ibstat((shared / "gpud" / "ibstat" / name).read_text())
    assert len(devices) >= 8
    for dev in devices:
        assert dev.ports and dev.hca_type and dev.hca_type.startswith("MT")
        assert all(p.link_layer in ("InfiniBand", "Ethernet") for p in dev.ports)


def test_ibstat_some_down(shared):
    devices = parse_ibstat((shared / "gpud/ibstat/ibstat.47.0.h100.some.down.0").read_text())
    down = {d.name for d in devices if not d.ports[0].is_active}
    assert down == {"mlx5_2", "mlx5_7", "mlx5_8"}
    topo = HostTopology(hostname="h", rdma_devices=devices)
    found = {(f.id, f.subject) for f in check(topo)}
    assert ("rdma-port-disabled", "mlx5_2/1") in found


def test_ibstat_polling_is_an_error_not_a_disabled_port(shared):
    devices = parse_ibstat((shared / "gpud/ibstat/ibstat.47.0.h100.some.down.with.polling.1").read_text())
    topo = HostTopology(hostname="h", rdma_devices=devices)
    found = {(f.id, f.subject) for f in check(topo)}
    assert ("rdma-port-not-active", "mlx5_11/1") in found
    assert ("rdma-port-disabled", "mlx5_5/1") in found


def test_ibstat_cut_short_by_ibpanic(shared):
    devices = parse_ibstat((shared / "gpud/ibstat/ibstat.39.0.a100.failed.ibpanic.exit-255.0").read_text())
    assert [d.name for d in devices] == [f"mlx5_{i}" for i in range(8)]


def test_ibstat_roce_host_mixed_models(shared):
    devices = parse_ibstat((shared / "gpud/ibstat/ibstat.47.0.h100.all.active.0").read_text())
    topo = HostTopology(hostname="h", rdma_devices=devices)
    # 8 x 400G ConnectX-7 and 4 x 100G ConnectX-6 Dx: different models, so not "slow ports"
    assert "rdma-rate-below-peers" not in ids(check(topo, expected_rate_gbps=400))


def test_ibstatus(shared):
    devices = parse_ibstatus((shared / "gpud/ibstatus/ibstatus.39.0.a100.all.active.0").read_text())
    assert len(devices) == 9
    eth = next(d for d in devices if d.name == "mlx5_8")
    assert eth.ports[0].link_layer == "Ethernet" and eth.ports[0].gids == []  # "default gid: unknown"
    ib = devices[0].ports[0]
    assert ib.gids[0].gid == "fe80:0000:0000:0000:0015:5dff:fd34:11eb" and ib.rate_gbps == 200.0


def test_stelline_ibv_devinfo(shared):
    (dev,) = parse_ibv_devinfo((shared / "stelline/ibv_devinfo.txt").read_text())
    assert (dev.name, dev.fw_ver, dev.hca_type, dev.node_guid) == \
        ("mlx5_1", "28.43.2566", "MT4129", "b8e9:2403:004e:de81")
    (port,) = dev.ports
    assert (port.state, port.active_mtu, port.max_mtu, port.link_layer) == ("ACTIVE", 4096, 4096, "Ethernet")


def test_pyverbs_port_printout(shared):
    port = parse_pyverbs_port((shared / "rdma-core/pyverbs_query_port.txt").read_text())
    assert (port.state, port.phys_state, port.link_layer) == ("ACTIVE", "LinkUp", "Ethernet")
    assert (port.active_mtu, port.max_mtu, port.rate_gbps) == (1024, 4096, 100.0)


def test_pyverbs_port_printout_active_mtu_1024_with_jumbo_netdev_is_flagged(shared):
    port = parse_pyverbs_port((shared / "rdma-core/pyverbs_query_port.txt").read_text())
    port.netdev = "ens1f0np0"
    port.gids = [Gid(index=3, gid="0000:0000:0000:0000:0000:ffff:0b87:3c08", type="RoCE v2")]
    port.gids_known = True
    from aitrain.fabric.topology import Nic

    topo = HostTopology(hostname="h", rdma_devices=[RdmaDevice(name="mlx5_0", ports=[port])],
                        nics=[Nic(name="ens1f0np0", mtu=9000, operstate="up")])
    assert "roce-mtu-below-4096" in ids(check(topo))
    topo.nics[0].mtu = 1500
    assert "roce-mtu-limited-by-netdev" in ids(check(topo))


def test_pyverbs_query_gid_printout_is_an_ipv4_mapped_gid(shared):
    text = (shared / "rdma-core/pyverbs_query_gid.txt").read_text().strip()
    assert Gid(index=3, gid=text).ipv4 == "11.135.60.8"


# --------------------------------------------------------------------------- nccl#769 GID table


def _port_with(gids):
    port = RdmaPort(port=1, state="ACTIVE", phys_state="LinkUp", link_layer="Ethernet", rate_gbps=200.0,
                    gids=[Gid(index=g["index"], gid=g["gid"], type=g["type"]) for g in gids], gids_known=True)
    from aitrain.fabric.probe.parse import parse_gid, parse_gid_type

    for g in port.gids:
        g.gid, g.type = parse_gid(g.gid), parse_gid_type(g.type)
    return HostTopology(hostname="a100", rdma_devices=[RdmaDevice(name="mlx5_bond_0", ports=[port])])


def test_nccl_769_gid_table_has_a_routable_v2_gid(shared):
    facts = json.loads((shared / "nccl-issue-769/gid_table.facts.json").read_text())
    topo = _port_with(facts["port"]["gids"])
    assert [g.type for g in topo.rdma_devices[0].ports[0].gids] == ["IB/RoCE v1", "RoCE v2", "IB/RoCE v1", "RoCE v2"]
    assert not {"roce-no-v2-gid", "roce-only-link-local-gid"} & set(ids(check(topo)))


def test_nccl_769_without_the_ipv4_entries_is_the_timeout_of_the_issue(shared):
    facts = json.loads((shared / "nccl-issue-769/gid_table.facts.json").read_text())
    topo = _port_with([g for g in facts["port"]["gids"] if g["index"] < 2])
    (f,) = [f for f in check(topo) if f.id == "roce-only-link-local-gid"]
    assert "ibv_modify_qp" in f.message and "NCCL_IB_GID_INDEX" in f.hint
