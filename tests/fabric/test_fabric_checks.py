"""The rules, host by host and across hosts, on synthetic trees and hand-made topologies."""

from __future__ import annotations

import re

import pytest

from aitrain.fabric import FINDING_IDS, check, probe
from aitrain.fabric.findings import Severity
from aitrain.fabric.topology import (
    Gpu,
    HostInfo,
    HostTopology,
    Limit,
    Nic,
    RdmaDevice,
    RdmaPort,
    Route,
)

import hostbuilder


def ids(findings, severity=None):
    return sorted({f.id for f in findings if severity is None or f.severity.value == severity})


def test_good_hosts_have_no_errors_or_warnings(hosts_dir):
    from aitrain.fabric.sources import load_hosts

    for group in (["dgx01", "dgx02"], ["roce01", "roce02"]):
        hosts = load_hosts([hosts_dir / g for g in group], rendezvous="10.0.0.11")
        findings = check(hosts, rendezvous="10.0.0.11")
        assert [f for f in findings if f.severity is not Severity.INFO] == [], findings


def test_dgx_meets_its_expected_rate(dgx):
    assert ids(check(dgx, expected_rate_gbps=400)) == []
    assert ids(check(dgx, expected_rate_gbps=800)) == ["rdma-rate-below-expected"]


def test_cpu_host_is_a_fact_not_an_error(hosts_dir):
    findings = check(probe(hosts_dir / "cpu01"))
    assert [(f.id, f.severity) for f in findings] == [("rdma-none", Severity.INFO)]
    assert "TCP sockets" in findings[0].message


EXPECTED = {
    "port-init": ({"rdma-port-not-active"}, "mlx5_6/1"),
    "port-polling": ({"rdma-port-not-active"}, "mlx5_7/1"),
    "rate-degraded": ({"rdma-rate-below-peers", "rdma-rate-below-expected"}, "mlx5_3/1"),
    "pcie-narrow": ({"pcie-link-width-degraded"}, "mlx5_2"),
    "acs-on": ({"pcie-acs-enabled"}, None),
    "no-peermem": ({"gpudirect-rdma-unavailable"}, "nvidia_peermem"),
    "low-memlock": ({"memlock-limit-low"}, "RLIMIT_MEMLOCK"),
    "roce-no-ip": ({"roce-only-link-local-gid"}, ("mlx5_0/1", "mlx5_1/1")),
    "roce-v1-only": ({"roce-no-v2-gid"}, ("mlx5_0/1", "mlx5_1/1")),
    "roce-mtu-1500": ({"roce-mtu-limited-by-netdev"}, ("mlx5_0/1", "mlx5_1/1")),
    "no-default-route": ({"rendezvous-unreachable"}, "10.9.0.1"),
}


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_each_broken_variant_is_caught(broken_dir, variant):
    expected_ids, subject = EXPECTED[variant]
    topo = probe(broken_dir / variant)
    rate = 100 if variant.startswith("roce") else 400
    findings = check(topo, expected_rate_gbps=rate, rendezvous="10.9.0.1" if variant == "no-default-route" else None)
    assert set(ids(findings)) - {"rdma-none"} == expected_ids
    if subject:
        subjects = subject if isinstance(subject, tuple) else (subject,)
        assert sorted({f.subject for f in findings if f.id in expected_ids}) == sorted(subjects)
    for f in findings:
        assert f.host == f"{variant}01"
        assert f.message and f.hint


def test_severities_of_broken_variants(broken_dir):
    def sev(variant, id_):
        return next(f.severity for f in check(probe(broken_dir / variant), expected_rate_gbps=400) if f.id == id_)

    assert sev("port-init", "rdma-port-not-active") is Severity.ERROR
    assert sev("rate-degraded", "rdma-rate-below-peers") is Severity.ERROR
    assert sev("low-memlock", "memlock-limit-low") is Severity.ERROR
    assert sev("pcie-narrow", "pcie-link-width-degraded") is Severity.WARNING
    assert sev("acs-on", "pcie-acs-enabled") is Severity.WARNING
    assert sev("no-peermem", "gpudirect-rdma-unavailable") is Severity.WARNING


def test_stuck_port_hint_points_at_the_subnet_manager(broken_dir):
    (f,) = [f for f in check(probe(broken_dir / "port-init")) if f.id == "rdma-port-not-active"]
    assert "INIT" in f.message and "subnet manager" in f.hint
    (f,) = [f for f in check(probe(broken_dir / "port-polling")) if f.id == "rdma-port-not-active"]
    assert "Polling" in f.message and "cable" in f.hint


def test_acs_is_fine_in_a_vm(write_host):
    spec = hostbuilder.acs_on(hostbuilder.dgx_h100())
    spec.hypervisor = True
    assert "pcie-acs-enabled" not in ids(check(probe(write_host(spec))))


def test_acs_finding_names_the_bridge_and_the_fix(broken_dir):
    findings = [f for f in check(probe(broken_dir / "acs-on")) if f.id == "pcie-acs-enabled"]
    assert {f.subject for f in findings} >= {"0000:10:01.0", "0000:11:00.0"}
    assert all("setpci" in f.hint and ("gpu0" in f.message or "mlx5_0" in f.message) for f in findings)
    assert any("gpu0" in f.message and "mlx5_0" in f.message for f in findings)  # the shared switch


def test_pcie_speed_downgrade_of_a_gpu_is_only_info(write_host):
    spec = hostbuilder.dgx_h100()
    spec.pairs[0].gpu.link.speed = "2.5 GT/s PCIe"  # idle GPUs drop their link speed
    findings = check(probe(write_host(spec)))
    (f,) = [f for f in findings if f.id == "pcie-link-speed-degraded"]
    assert f.severity is Severity.INFO and f.subject == "gpu0"


def test_pcie_max_is_capped_by_the_slot(write_host):
    # a Gen5 NIC in a Gen4 slot runs at Gen4 and that is all it can do
    spec = hostbuilder.dgx_h100()
    spec.pairs[1].hca.link = hostbuilder.Link("16.0 GT/s PCIe", 16, "32.0 GT/s PCIe", 16)
    root = write_host(spec)
    slot = next(root.glob("sys/devices/pci0000:20/*/*/0000:22:01.0/max_link_speed"))
    slot.write_text("16.0 GT/s PCIe\n")
    assert "pcie-link-speed-degraded" not in ids(check(probe(root)))


def test_gpus_without_a_local_nic(write_host):
    spec = hostbuilder.dgx_h100()
    for pair in spec.pairs[4:]:
        pair.hca.numa = 0  # every HCA on socket 0; GPUs 4-7 on socket 1
    (f,) = [f for f in check(probe(write_host(spec))) if f.id == "gpu-nic-cross-socket"]
    assert f.subject == "numa1" and f.data["gpus"] == [4, 5, 6, 7]


def test_garbage_files_give_warnings_naming_them_and_no_crash(broken_dir):
    topo = probe(broken_dir / "garbage-files")
    findings = check(topo, include_probe_warnings=True)
    named = {f.subject.split("garbage-files/", 1)[1] for f in findings if f.id.startswith("probe-")}
    assert {"sys/class/infiniband/mlx5_0/ports/1/rate", "sys/class/net/eno1/mtu",
            "proc/self/limits", "proc/net/route"} <= named
    # an unreadable value is not turned into a confident error about it
    assert not any(f.id == "rdma-port-not-linkup" and f.subject == "mlx5_2/1" for f in findings)
    assert not [f for f in check(topo, include_probe_warnings=False) if f.id.startswith("probe-")]


# --------------------------------------------------------------------------- hand-made topologies


def _roce_port(**kw):
    base = dict(port=1, state="ACTIVE", phys_state="LinkUp", rate_gbps=100.0, link_layer="Ethernet",
                netdev="eth2", gids_known=True)
    base.update(kw)
    return RdmaPort(**base)


def _host(name="h1", *, devices=(), nics=(), gpus=(), routes=(), **info):
    return HostTopology(hostname=name, rdma_devices=list(devices), nics=list(nics), gpus=list(gpus),
                        routes=list(routes), routes_known=bool(routes), host=HostInfo(**info))


def test_disabled_port_is_a_warning():
    topo = _host(devices=[RdmaDevice(name="mlx5_9", ports=[RdmaPort(port=1, state="DOWN", phys_state="Disabled")])])
    (f,) = [f for f in check(topo) if f.id.startswith("rdma-port")]
    assert (f.id, f.severity) == ("rdma-port-disabled", Severity.WARNING)


def test_unknown_state_is_not_an_error():
    topo = _host(devices=[RdmaDevice(name="x", ports=[RdmaPort(port=1)])])
    assert not [f for f in check(topo) if f.severity is Severity.ERROR]


def test_active_port_in_link_error_recovery():
    port = RdmaPort(port=1, state="ACTIVE", phys_state="LinkErrorRecovery")
    topo = _host(devices=[RdmaDevice(name="mlx5_0", ports=[port])])
    assert "rdma-port-not-linkup" in ids(check(topo), "error")


def test_rate_is_compared_only_within_a_model_and_link_layer():
    fast = [RdmaDevice(name=f"mlx5_{i}", hca_type="MT4129", ports=[RdmaPort(port=1, state="ACTIVE", phys_state="LinkUp",
                                                                             rate_gbps=400.0, link_layer="InfiniBand")])
            for i in range(4)]
    front = RdmaDevice(name="mlx5_9", hca_type="MT4125", ports=[_roce_port(rate_gbps=100.0, gids_known=False)])
    slow = RdmaDevice(name="mlx5_5", hca_type="MT4129", ports=[RdmaPort(port=1, state="ACTIVE", phys_state="LinkUp",
                                                                         rate_gbps=200.0, link_layer="InfiniBand")])
    findings = check(_host(devices=[*fast, front, slow]), expected_rate_gbps=400)
    below_peers = [f.subject for f in findings if f.id == "rdma-rate-below-peers"]
    below_expected = [f.subject for f in findings if f.id == "rdma-rate-below-expected"]
    assert below_peers == ["mlx5_5/1"] and below_expected == ["mlx5_5/1"]  # the front-end NIC is left alone


def test_roce_gid_rules_on_hand_made_tables():
    from aitrain.fabric.topology import Gid

    ll = "fe80:0000:0000:0000:0ac0:ebff:feda:1cfb"
    v4 = "0000:0000:0000:0000:0000:ffff:c0a8:0101"
    cases = {
        (("IB/RoCE v1", ll),): "roce-no-v2-gid",
        (("IB/RoCE v1", ll), ("RoCE v2", ll)): "roce-only-link-local-gid",
        (("IB/RoCE v1", ll), ("RoCE v2", ll), ("RoCE v2", v4)): None,
        (): "roce-no-v2-gid",
    }
    for gids, expected in cases.items():
        port = _roce_port(gids=[Gid(index=i, gid=g, type=t) for i, (t, g) in enumerate(gids)])
        got = {f.id for f in check(_host(devices=[RdmaDevice(name="m", ports=[port])])) if f.id.startswith("roce-")}
        assert got == ({expected} if expected else set()), gids


def test_roce_gid_table_unknown_is_info():
    topo = _host(devices=[RdmaDevice(name="m", ports=[_roce_port(gids_known=False)])])
    (f,) = check(topo)
    assert (f.id, f.severity) == ("roce-gid-table-unknown", Severity.INFO)


@pytest.mark.parametrize("soft, severity",
                         [(64 * 1024, "error"), (8 << 20, "error"), (1 << 30, "warning"), (None, None)])
def test_memlock_thresholds(soft, severity):
    dev = RdmaDevice(name="m", ports=[RdmaPort(port=1, state="ACTIVE", phys_state="LinkUp",
                                               link_layer="InfiniBand")])
    topo = _host(devices=[dev], memlock=Limit(soft=soft, hard=soft))
    findings = [f for f in check(topo) if f.id == "memlock-limit-low"]
    assert [f.severity.value for f in findings] == ([severity] if severity else [])


def test_memlock_without_rdma_is_not_checked():
    assert "memlock-limit-low" not in ids(check(_host(memlock=Limit(soft=1024, hard=1024))))


def test_gpudirect_unknown_modules_are_not_guessed():
    dev = RdmaDevice(name="m", ports=[RdmaPort(port=1, state="ACTIVE", phys_state="LinkUp", link_layer="InfiniBand")])
    topo = _host(devices=[dev], gpus=[Gpu(index=0, vendor="nvidia")], nvidia_peermem=None)
    assert "gpudirect-rdma-unavailable" not in ids(check(topo))
    topo.host.nvidia_peermem, topo.host.dmabuf = False, True
    assert "gpudirect-rdma-unavailable" not in ids(check(topo))
    topo.host.dmabuf = False
    assert "gpudirect-rdma-unavailable" in ids(check(topo))


# --------------------------------------------------------------------------- rendezvous


def _net_host(name, iface="eth0", cidr="10.0.0.5/24", operstate="up", kind="physical", default=True, **kw):
    routes = [Route(destination=str(__import__("ipaddress").ip_interface(cidr).network), interface=iface)]
    if default:
        routes.append(Route(destination="0.0.0.0/0", interface=iface, gateway="10.0.0.1"))
    nic = Nic(name=iface, kind=kind, virtual=kind != "physical", operstate=operstate, ipv4=[cidr], mtu=1500, **kw)
    return _host(name, nics=[nic], routes=routes)


def test_rendezvous_reachable_unreachable_down_virtual():
    assert "rendezvous-unreachable" not in ids(check(_net_host("a"), rendezvous="192.0.2.1"))
    assert "rendezvous-unreachable" in ids(check(_net_host("a", default=False), rendezvous="192.0.2.1"))
    assert "rendezvous-interface-down" in ids(check(_net_host("a", operstate="down"), rendezvous="10.0.0.9"))
    assert "rendezvous-via-virtual-interface" in ids(check(_net_host("a", iface="docker0", kind="docker"),
                                                          rendezvous="10.0.0.9"))
    assert ids(check(_net_host("a"), rendezvous="10.0.0.5")) == ["rdma-none"]  # its own address


def test_rendezvous_without_routes_is_unknown_not_unreachable():
    findings = check(_host("a"), rendezvous="10.0.0.1")
    assert "rendezvous-route-unknown" in ids(findings, "info")


def test_rendezvous_that_is_a_name():
    assert "rendezvous-unresolved" in ids(check(_net_host("a"), rendezvous="node-7"))


def test_socket_interface_on_the_far_socket():
    far = Nic(name="eth1", operstate="up", ipv4=["10.0.0.5/24"], numa_node=1, mtu=1500)
    near = Nic(name="eth0", operstate="up", ipv4=["10.0.0.6/24"], numa_node=0, mtu=1500)
    routes = [Route("10.0.0.0/24", "eth1", metric=0), Route("10.0.0.0/24", "eth0", metric=100)]
    topo = _host("a", nics=[far, near], routes=routes, gpus=[Gpu(index=i, numa_node=0) for i in range(4)])
    (f,) = [f for f in check(topo, rendezvous="10.0.0.1") if f.id == "socket-nic-numa-remote"]
    assert f.subject == "eth1" and "fabric.interface=eth0" in f.hint


# --------------------------------------------------------------------------- across hosts


def _ib_host(name, n_active=8, rate=400.0, layer="InfiniBand", mtu=None, **info):
    devs = [RdmaDevice(name=f"mlx5_{i}", hca_type="MT4129", fw_ver="28.39.1002",
                       ports=[RdmaPort(port=1, state="ACTIVE" if i < n_active else "DOWN",
                                       phys_state="LinkUp" if i < n_active else "Disabled",
                                       rate_gbps=rate, link_layer=layer, active_mtu=mtu, gids_known=True,
                                       gids=[__import__("aitrain.fabric.topology", fromlist=["Gid"]).Gid(
                                           index=0, gid="0000:0000:0000:0000:0000:ffff:0a00:0001", type="RoCE v2")])])
            for i in range(8)]
    return _host(name, devices=devs, **info)


def test_cross_host_count_mismatch_names_the_odd_host():
    hosts = [_ib_host(f"n{i}") for i in range(5)] + [_ib_host("n5", n_active=7)]
    (f,) = [f for f in check(hosts) if f.id == "hosts-active-hca-count-mismatch"]
    assert f.host == "n5" and "5 of 6 hosts" in f.message and "have 8" in f.message


def test_cross_host_link_layer_mismatch():
    hosts = [_ib_host("a"), _ib_host("b"), _ib_host("c", layer="Ethernet")]
    (f,) = [f for f in check(hosts) if f.id == "hosts-link-layer-mismatch"]
    assert f.host == "c" and f.severity is Severity.ERROR


def test_cross_host_mtu_mismatch():
    hosts = [_ib_host("a", mtu=4096), _ib_host("b", mtu=4096), _ib_host("c", mtu=2048)]
    (f,) = [f for f in check(hosts) if f.id == "hosts-mtu-mismatch"]
    assert f.host == "c" and f.data["mtu"] == 2048 and f.data["expected"] == 4096


def test_cross_host_roce_netdev_mtu_mismatch_is_an_error(hosts_dir, write_host):
    from aitrain.fabric.sources import load_hosts

    odd = hostbuilder.roce_mtu_1500(hostbuilder.roce_host("roce03", 3))
    hosts = load_hosts([hosts_dir / "roce01", hosts_dir / "roce02", write_host(odd)])
    mismatches = [f for f in check(hosts) if f.id == "hosts-mtu-mismatch"]
    assert {(f.host, f.subject, f.severity) for f in mismatches} >= {("roce03", "roce-netdev", Severity.ERROR)}


@pytest.mark.parametrize("field, id_, severity", [
    ("torch_version", "hosts-torch-version-mismatch", Severity.ERROR),
    ("nccl_version", "hosts-nccl-version-mismatch", Severity.ERROR),
    ("driver_version", "hosts-driver-version-mismatch", Severity.WARNING),
])
def test_cross_host_version_mismatch(field, id_, severity):
    hosts = [_host(f"n{i}", **{field: "2.4.0"}) for i in range(3)] + [_host("odd", **{field: "2.3.1"})]
    (f,) = [f for f in check(hosts) if f.id == id_]
    assert (f.host, f.severity, f.data["version"], f.data["expected"]) == ("odd", severity, "2.3.1", "2.4.0")


def test_unknown_versions_are_not_mismatches():
    hosts = [_host("a", torch_version="2.4.0"), _host("b", torch_version=None)]
    assert "hosts-torch-version-mismatch" not in ids(check(hosts))


def test_cross_host_rendezvous_reachability():
    hosts = [_net_host("a"), _net_host("b"), _net_host("c", cidr="10.1.0.5/24", default=False)]
    (f,) = [f for f in check(hosts, rendezvous="10.0.0.5") if f.id == "rendezvous-unreachable"]
    assert f.host == "c"


def test_duplicate_hostnames():
    assert "hosts-duplicate-hostname" in ids(check([_host("a"), _host("a")]))


def test_single_host_has_no_cross_host_findings(dgx):
    assert not [f for f in check(dgx) if f.id.startswith("hosts-")]


# --------------------------------------------------------------------------- the finding catalogue


def test_every_id_is_kebab_case_and_catalogued():
    for id_ in FINDING_IDS:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)+", id_), id_


def test_every_emitted_id_is_in_the_catalogue(broken_dir, hosts_dir):
    from aitrain.fabric.sources import load_hosts

    hosts = load_hosts([broken_dir, hosts_dir], rendezvous="10.9.0.1")
    findings = check(hosts, expected_rate_gbps=400, rendezvous="10.9.0.1")
    assert {f.id for f in findings} <= set(FINDING_IDS)
    assert len({f.id for f in findings}) >= 15


def test_findings_are_sorted_errors_first(broken_dir):
    from aitrain.fabric.sources import load_hosts

    findings = check(load_hosts([broken_dir]), expected_rate_gbps=400)
    ranks = [f.severity.rank for f in findings]
    assert ranks == sorted(ranks)
