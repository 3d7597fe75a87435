"""Tune rules on synthetic and published topologies: which env each host gets, and why."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from aitrain.errors import FabricError
from aitrain.fabric.topology import (
    GID_TYPE_IB_ROCE_V1,
    GID_TYPE_ROCE_V2,
    Cluster,
    Gid,
    HostInfo,
    HostTopology,
    Limit,
    Nic,
    RdmaDevice,
    RdmaPort,
    Route,
)
from aitrain.fabric.tune import (
    DEBUG_ONLY,
    TuneOptions,
    fit_ib_timeout,
    ib_transport_seconds,
    interface_key,
    parse_version,
    select_gid_index,
    select_hca_ports,
    select_socket_interfaces,
    tune,
    user_env_from,
)

import hostbuilder

SHARED = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "fabric"


# --------------------------------------------------------------------------- helpers


def nic(name, ip=None, kind="physical", speed=None, mtu=1500, up=True):
    return Nic(name=name, kind=kind, virtual=kind not in ("physical", "ipoib"), operstate="up" if up else "down",
               mtu=mtu, speed_mbps=speed, ipv4=[ip] if ip else [])


def host(name, nics, routes, **kw):
    return HostTopology(hostname=name, nics=[nic("lo", "127.0.0.1/8", "loopback", mtu=65536), *nics],
                        routes=[Route(destination=d, interface=i, gateway=g) for d, i, g in routes],
                        routes_known=True, host=HostInfo(cpus=kw.pop("cpus", 8)), **kw)


def rig_host(i):
    """Like a netns rig host: eth0 (mgmt, default route) and fab0 (jumbo), both veths."""
    return host(f"n{i}", [nic("eth0", f"10.9.1.{10 + i}/24", "veth", 10000, 1500),
                          nic("fab0", f"10.9.2.{10 + i}/24", "veth", 10000, 9000)],
                [("0.0.0.0/0", "eth0", None), ("10.9.1.0/24", "eth0", None), ("10.9.2.0/24", "fab0", None)])


def roce_port(gids, state="ACTIVE"):
    return RdmaPort(port=1, state=state, phys_state="LinkUp", link_layer="Ethernet", rate_gbps=100.0,
                    netdev="ens1", gids=gids, gids_known=True)


def issue_769_port() -> RdmaPort:
    """NCCL issue 769's GID table: index 1 is the link-local RoCE v2 GID (wrong),
    index 3 the IPv4 one (right)."""
    data = json.loads((SHARED / "nccl-issue-769" / "gid_table.facts.json").read_text())
    kinds = {"RoCE v1": GID_TYPE_IB_ROCE_V1, "RoCE v2": GID_TYPE_ROCE_V2}
    return roce_port([Gid(index=g["index"], gid=g["gid"], type=kinds[g["type"]]) for g in data["port"]["gids"]])


def roce_cluster(nccl=None, port=None):
    hosts = []
    for i in (1, 2):
        h = host(f"r{i}", [nic("ens1", f"200.0.209.{i}/24", speed=100000, mtu=9000)],
                 [("200.0.209.0/24", "ens1", None)])
        p = copy.deepcopy(port or issue_769_port())
        h.rdma_devices = [RdmaDevice(name="mlx5_bond_0", ports=[p])]
        h.host.nccl_version = nccl
        hosts.append(h)
    return hosts


# --------------------------------------------------------------------------- socket interface


def test_rig_picks_the_jumbo_fabric_on_every_host():
    tuned = tune([rig_host(1), rig_host(2)])
    for name in ("n1", "n2"):
        assert tuned[name].env["NCCL_SOCKET_IFNAME"] == "=fab0"
        assert tuned[name].env["GLOO_SOCKET_IFNAME"] == "fab0"
        assert "MTU" in tuned[name].reasons["GLOO_SOCKET_IFNAME"]
    assert tuned["n1"].address == "10.9.2.11"


def test_rendezvous_on_management_address_still_uses_fabric_for_data():
    tuned = tune([rig_host(1), rig_host(2)], rendezvous="10.9.1.11")
    assert tuned["n2"].env["GLOO_SOCKET_IFNAME"] == "fab0"


def test_node0_is_the_host_owning_the_rendezvous():
    hosts = [rig_host(1), rig_host(2), rig_host(3)]
    choices = select_socket_interfaces(Cluster(hosts=hosts), "10.9.1.12", multi_host=True)
    assert "node 0 (n2)" in choices[1].reason


def test_never_loopback_for_multi_host_even_when_rendezvous_resolves_to_127():
    tuned = tune([rig_host(1), rig_host(2)], rendezvous="127.0.0.1")
    assert all(t.env["GLOO_SOCKET_IFNAME"] != "lo" for t in tuned.values())


def test_single_host_job_uses_loopback():
    tuned = tune([rig_host(1)])
    assert tuned["n1"].env["GLOO_SOCKET_IFNAME"] == "lo"
    assert tuned["n1"].env["NCCL_SOCKET_IFNAME"] == "=lo"


def test_single_host_probe_with_remote_rendezvous_follows_the_route():
    tuned = tune([rig_host(2)], rendezvous="10.9.2.11")
    assert tuned["n2"].env["GLOO_SOCKET_IFNAME"] == "fab0"
    tuned = tune([rig_host(2)], rendezvous="10.9.1.11")
    assert tuned["n2"].env["GLOO_SOCKET_IFNAME"] == "eth0"


def test_physical_beats_virtual_even_when_virtual_is_faster():
    def h(i):
        return host(f"h{i}", [nic("br0", f"10.1.0.{i}/24", "bridge", 100000, 9000),
                              nic("eno1", f"10.2.0.{i}/24", "physical", 25000, 1500)],
                    [("10.1.0.0/24", "br0", None), ("10.2.0.0/24", "eno1", None)])

    tuned = tune([h(1), h(2)])
    assert tuned["h1"].env["GLOO_SOCKET_IFNAME"] == "eno1"


def test_fastest_physical_link_wins():
    def h(i):
        return host(f"h{i}", [nic("eno1", f"10.1.0.{i}/24", speed=1000),
                              nic("ens2", f"10.2.0.{i}/24", speed=100000)],
                    [("0.0.0.0/0", "eno1", "10.1.0.254"), ("10.1.0.0/24", "eno1", None),
                     ("10.2.0.0/24", "ens2", None)])

    tuned = tune([h(1), h(2)])
    assert tuned["h2"].env["NCCL_SOCKET_IFNAME"] == "=ens2"


def test_docker_and_down_interfaces_are_never_chosen():
    def h(i):
        return host(f"h{i}", [nic("docker0", "172.17.0.1/16", "docker", 10000, 9000),
                              nic("ens9", f"10.3.0.{i}/24", speed=200000, up=False),
                              nic("eno1", f"10.1.0.{i}/24", speed=1000)],
                    [("172.17.0.0/16", "docker0", None), ("10.1.0.0/24", "eno1", None)])

    tuned = tune([h(1), h(2)])
    assert {t.env["GLOO_SOCKET_IFNAME"] for t in tuned.values()} == {"eno1"}


def test_interface_peers_cannot_route_back_is_skipped():
    def h(i, back=True):
        routes = [("10.1.0.0/24", "eno1", None)] + ([("10.2.0.0/24", "ens2", None)] if back else [])
        return host(f"h{i}", [nic("eno1", f"10.1.0.{i}/24", speed=1000),
                              nic("ens2", f"10.2.0.{i}/24", speed=100000)], routes)

    tuned = tune([h(1), h(2, back=False)])
    assert tuned["h1"].env["GLOO_SOCKET_IFNAME"] == "eno1"


def test_interface_key_orders_kind_speed_mtu():
    a = nic("a", kind="veth", speed=10000, mtu=9000)
    b = nic("b", kind="veth", speed=10000, mtu=1500)
    c = nic("c", kind="physical", speed=1000, mtu=1500)
    assert sorted([a, b, c], key=interface_key) == [c, a, b]


def test_fabric_interface_option_is_forced():
    tuned = tune([rig_host(1), rig_host(2)], options=TuneOptions(interface="eth0"))
    assert tuned["n1"].env["NCCL_SOCKET_IFNAME"] == "=eth0"
    assert tuned["n1"].reasons["GLOO_SOCKET_IFNAME"].startswith("fabric.interface")


def test_duplicate_hostnames_are_refused():
    with pytest.raises(FabricError, match="named n1"):
        tune([rig_host(1), rig_host(1)])


# --------------------------------------------------------------------------- RDMA


def test_dgx_gets_all_eight_hcas_exact_and_rail_settings(trees, probe_tree):
    tuned = tune([probe_tree(trees / "dgx01"), probe_tree(trees / "dgx02")],
                 options=TuneOptions(nproc_per_node=8))
    env = tuned["dgx01"].env
    assert env["NCCL_IB_HCA"] == "=" + ",".join(f"mlx5_{i}:1" for i in range(8))
    assert "NCCL_IB_DISABLE" not in env
    assert env["NCCL_CROSS_NIC"] == "0"
    assert env["NCCL_NET_GDR_LEVEL"] == "PXB"
    assert "NCCL_IB_GID_INDEX" not in env  # InfiniBand, not RoCE
    assert env["OMP_NUM_THREADS"] == "28"  # 224 CPUs / 8 ranks
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0


def test_down_and_polling_ports_are_left_out(tmp_path, probe_tree):
    from aitrain.fabric import probe

    spec = hostbuilder.broken("port-polling", "bad01")
    hostbuilder.port_init(spec)
    topo = probe(hostbuilder.write_host(spec, tmp_path / "bad01"))
    tuned = tune([topo], rendezvous="10.0.0.1")
    hca = tuned["bad01"].env["NCCL_IB_HCA"]
    assert "mlx5_6" not in hca and "mlx5_7" not in hca and "mlx5_5:1" in hca
    assert "mlx5_7:1 (state DOWN)" in tuned["bad01"].reasons["NCCL_IB_HCA"]


def test_degraded_rate_port_is_left_out(tmp_path):
    from aitrain.fabric import probe

    spec = hostbuilder.dgx_h100("slow01")
    hostbuilder._hca(spec, 3).ports[0].rate = "100 Gb/sec (4X EDR)"
    topo = probe(hostbuilder.write_host(spec, tmp_path / "slow01"))
    ports, skipped = select_hca_ports(topo)
    assert "mlx5_3" not in [d.name for d, _ in ports]
    assert any(s.startswith("mlx5_3:1") and "below half" in s for s in skipped)


def test_ib_disabled_only_when_rdma_exists_but_nothing_is_usable():
    hosts = roce_cluster(port=roce_port([], state="DOWN"))
    tuned = tune(hosts)
    assert tuned["r1"].env["NCCL_IB_DISABLE"] == "1"
    assert "NCCL_IB_HCA" not in tuned["r1"].env


def test_no_rdma_devices_sets_neither_hca_nor_disable(trees, probe_tree):
    tuned = tune([probe_tree(trees / "cpu01")], rendezvous="10.0.0.5")
    env = tuned["cpu01"].env
    assert "NCCL_IB_HCA" not in env and "NCCL_IB_DISABLE" not in env
    assert "NCCL_IB_HCA" in tuned["cpu01"].notes


def test_roce_with_only_link_local_gids_is_unusable_across_hosts(tmp_path):
    from aitrain.fabric import probe

    topo = probe(hostbuilder.write_host(hostbuilder.broken("roce-no-ip", "ll01"), tmp_path / "ll01"))
    tuned = tune([topo], rendezvous="10.0.0.1")
    assert tuned["ll01"].env.get("NCCL_IB_DISABLE") == "1"
    assert "link-local" in tuned["ll01"].reasons["NCCL_IB_DISABLE"]


# --------------------------------------------------------------------------- GID index


def test_issue_769_gid_index_is_3_not_the_link_local_1():
    index, why = select_gid_index([issue_769_port()])
    assert index == 3
    assert "IPv4" in why


@pytest.mark.parametrize("version,expect", [("2.18.3", "3"), ("2.20.5", "3"), ("2.21.5", None),
                                            ("2.23.4", None), (None, "3")])
def test_gid_index_only_for_nccl_before_2_21(version, expect):
    tuned = tune(roce_cluster(nccl=version))
    assert tuned["r1"].env.get("NCCL_IB_GID_INDEX") == expect
    if expect is None:
        assert "2.21" in tuned["r1"].notes["NCCL_IB_GID_INDEX"]


def test_nccl_version_option_used_when_the_probe_found_none():
    assert "NCCL_IB_GID_INDEX" not in tune(roce_cluster(nccl=None), nccl_version="2.21.5")["r1"].env
    assert tune(roce_cluster(nccl=None), nccl_version="2.19.3")["r1"].env["NCCL_IB_GID_INDEX"] == "3"


def test_probed_nccl_version_beats_the_option():
    assert "NCCL_IB_GID_INDEX" not in tune(roce_cluster(nccl="2.21.5"), nccl_version="2.18.1")["r1"].env


def test_roce_fixture_hosts_get_the_ipv4_gid(trees, probe_tree):
    tuned = tune([probe_tree(trees / "roce01"), probe_tree(trees / "roce02")], nccl_version="2.18.3")
    assert tuned["roce01"].env["NCCL_IB_GID_INDEX"] == "3"
    assert tuned["roce01"].env["NCCL_IB_HCA"] == "=mlx5_0:1,mlx5_1:1"


def test_gid_index_never_link_local():
    ll_only = roce_port([Gid(0, "fe80::1", GID_TYPE_IB_ROCE_V1), Gid(1, "fe80::1", GID_TYPE_ROCE_V2)])
    assert select_gid_index([ll_only])[0] is None


def test_parse_version_forms():
    assert parse_version("2.21.5") == (2, 21, 5)
    assert parse_version((2, 18, 3)) == (2, 18, 3)
    assert parse_version(22105) == (2, 21, 5)
    assert parse_version("2.21.5+cuda12.4") == (2, 21, 5)
    assert parse_version(None) is None


# --------------------------------------------------------------------------- QoS, GDR, timeouts


def test_tc_and_sl_from_options():
    tuned = tune(roce_cluster(nccl="2.21.5"), options=TuneOptions(ib_tc=106, ib_sl=3))
    assert tuned["r1"].env["NCCL_IB_TC"] == "106"
    assert tuned["r1"].env["NCCL_IB_SL"] == "3"
    assert "NCCL_IB_TC" not in tune(roce_cluster(nccl="2.21.5"))["r1"].env


def test_no_peermem_means_no_gdr_level(tmp_path):
    from aitrain.fabric import probe

    topo = probe(hostbuilder.write_host(hostbuilder.broken("no-peermem", "np01"), tmp_path / "np01"))
    tuned = tune([topo], rendezvous="10.0.0.1")
    assert "NCCL_NET_GDR_LEVEL" not in tuned["np01"].env
    assert "peermem" in tuned["np01"].notes["NCCL_NET_GDR_LEVEL"]


def test_ib_timeout_fits_inside_the_collective_timeout():
    for timeout_s in (30, 60, 120, 600, 1800):
        t = fit_ib_timeout(timeout_s)
        assert ib_transport_seconds(t, 7) <= timeout_s / 4 or t == 8
    tuned = tune(roce_cluster(nccl="2.21.5"), options=TuneOptions(collective_timeout_s=60))
    env = tuned["r1"].env
    assert ib_transport_seconds(int(env["NCCL_IB_TIMEOUT"]), int(env["NCCL_IB_RETRY_CNT"])) < 60
    assert env["AITRAIN_COLLECTIVE_TIMEOUT_S"] == "60"
    assert int(tune(roce_cluster(nccl="2.21.5"))["r1"].env["NCCL_IB_TIMEOUT"]) == 20


def test_low_memlock_is_noted():
    hosts = roce_cluster(nccl="2.21.5")
    hosts[0].host.memlock = Limit(soft=65536, hard=65536)
    assert "memlock" in tune(hosts)["r1"].notes


def test_omp_threads_from_cores_per_rank():
    tuned = tune([rig_host(1), rig_host(2)], options=TuneOptions(nproc_per_node=3))
    assert tuned["n1"].env["OMP_NUM_THREADS"] == "2"  # 8 CPUs // 3 ranks
    assert "8 CPUs / 3 rank(s)" in tuned["n1"].reasons["OMP_NUM_THREADS"]


def test_cpu_only_hosts_get_no_torch_nccl_knobs():
    env = tune([rig_host(1), rig_host(2)])["n1"].env
    assert not [k for k in env if k.startswith("TORCH_NCCL_")]


def test_trace_dir_sets_the_flight_recorder_file(trees, probe_tree):
    tuned = tune([probe_tree(trees / "dgx01")], options=TuneOptions(trace_dir="/runs/r1/"))
    assert tuned["dgx01"].env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == "/runs/r1/nccl_trace_rank_"


# --------------------------------------------------------------------------- user env, debug knobs


def test_user_env_wins_and_is_reported(trees, probe_tree):
    hosts = [probe_tree(trees / "dgx01"), probe_tree(trees / "dgx02")]
    tuned = tune(hosts, user_env={"NCCL_IB_HCA": "=mlx5_0:1", "NCCL_ALGO": "Ring"},
                 shell_env={"NCCL_SOCKET_IFNAME": "=eno1", "HOME": "/root", "OMP_NUM_THREADS": "4"})
    t = tuned["dgx01"]
    assert t.env["NCCL_IB_HCA"] == "=mlx5_0:1"
    assert t.reasons["NCCL_IB_HCA"].startswith("user-set (fabric.env)")
    assert "tuning would set" in t.reasons["NCCL_IB_HCA"]
    assert t.env["NCCL_SOCKET_IFNAME"] == "=eno1" and "shell env" in t.reasons["NCCL_SOCKET_IFNAME"]
    assert t.env["GLOO_SOCKET_IFNAME"] == "eno1"  # follows the user's NCCL choice
    assert t.env["NCCL_ALGO"] == "Ring"  # the user asked for it
    assert t.env["OMP_NUM_THREADS"] == "4"
    assert "HOME" not in t.env
    assert set(t.user_set) == {"NCCL_IB_HCA", "NCCL_ALGO", "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS"}


def test_fabric_env_beats_shell_env():
    user = user_env_from({"NCCL_IB_TC": "1"}, {"NCCL_IB_TC": "2"})
    assert user["NCCL_IB_TC"] == ("2", "fabric.env")


def test_user_exclusion_pattern_leaves_gloo_unset():
    t = tune([rig_host(1), rig_host(2)], shell_env={"NCCL_SOCKET_IFNAME": "^docker,lo"})["n1"]
    assert t.env["NCCL_SOCKET_IFNAME"] == "^docker,lo"
    assert "GLOO_SOCKET_IFNAME" not in t.env


@pytest.mark.parametrize("name", ["dgx01", "roce01", "cpu01"])
def test_debug_only_knobs_are_never_set(trees, probe_tree, name):
    tuned = tune([probe_tree(trees / name)], rendezvous="10.0.0.99", nccl_version="2.18.3")
    assert not DEBUG_ONLY & set(tuned[name].env)
    for k in tuned[name].env:
        assert tuned[name].reasons[k], f"{k} has no reason"


def test_to_dict_round_trip():
    from aitrain.fabric.tune import TunedEnv

    t = tune([rig_host(1), rig_host(2)])["n1"]
    assert TunedEnv.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_package_level_tune_is_callable():
    import aitrain.fabric as fabric
    from aitrain.fabric.tune import TuneOptions as Opts

    tuned = fabric.tune([rig_host(1), rig_host(2)], options=Opts(nproc_per_node=2))
    assert tuned["n1"].env["GLOO_SOCKET_IFNAME"] == "fab0"
    assert fabric.tune.TunedEnv is type(tuned["n1"])


def test_tuned_env_says_which_nccl_it_assumed():
    from aitrain.fabric.tune import TunedEnv
    from aitrain.launcher.cli.fabric import render_tuned

    probed = tune(roce_cluster(nccl="2.21.5"), nccl_version="2.18.1")["r1"]
    assert probed.nccl_version == "2.21.5"  # the probe's wins over the fallback
    given = tune(roce_cluster(nccl=None), nccl_version="2.19.3")["r1"]
    assert given.nccl_version == "2.19.3"
    assert TunedEnv.from_dict(json.loads(json.dumps(given.to_dict()))).nccl_version == "2.19.3"
    assert "NCCL 2.19.3" in render_tuned({"r1": given}).splitlines()[0]
    assert tune(roce_cluster(nccl=None))["r1"].nccl_version is None
