"""check_host on temporary trees: the findings a user sees for a stock host, a tuned one, a bare one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aitrain.errors import FabricError
from aitrain.fabric.findings import Finding, Severity
from aitrain.fabric.host import HostPaths, check_host, rule_ids

from hosttree import write_tree


def by_id(findings: list[Finding]) -> dict[str, Finding]:
    return {f.id: f for f in findings}


def test_stock_host_warns_about_what_slows_training(make_host) -> None:
    found = by_id(check_host(make_host(), rdma=False))
    warnings = {i for i, f in found.items() if f.severity is Severity.WARNING}
    assert warnings == {
        "host-thp-defrag",  # [always]
        "host-numa-balancing",  # 1, on two NUMA nodes
        "host-cpu-governor",  # powersave
        "host-swappiness",  # 60 with swap configured
        "host-nofile",  # soft 1024
        "host-shm-size",  # 64 MiB, the Docker default
    }
    numa = found["host-numa-balancing"]
    assert numa.subject == "kernel.numa_balancing" and numa.host == "gpu-node-07"
    assert numa.data["current"] == "1" and numa.data["recommended"] == "0"
    assert numa.data["fix"] == "sysctl -w kernel.numa_balancing=0"
    assert numa.data["tunable"] is True and numa.data["why"]
    assert "kernel.numa_balancing is 1" in numa.message and numa.hint.startswith("sysctl -w")
    assert found["host-shm-size"].data["current"] == "64 MiB"
    assert "host-thp-enabled" not in found  # [always] is fine


def test_low_memlock_is_an_error_only_with_rdma(make_host) -> None:
    paths = make_host()
    assert by_id(check_host(paths, rdma=False))["host-memlock"].severity is Severity.INFO
    assert by_id(check_host(paths, rdma=True))["host-memlock"].severity is Severity.ERROR
    detected = make_host(**{"sys/class/infiniband/mlx5_0/node_type": "1: CA\n"})
    assert by_id(check_host(detected))["host-memlock"].severity is Severity.ERROR


def test_every_setting_missing_is_not_available_never_a_crash(tmp_path: Path) -> None:
    findings = check_host(write_tree(tmp_path, {}), include_ok=True)
    assert [f.id for f in findings] == rule_ids()
    for f in findings:
        assert f.severity is Severity.INFO
        assert f.data["status"] == "not-available"
        assert "not available" in f.message and f.data["current"] is None


def test_one_missing_file_makes_only_that_setting_not_available(make_host) -> None:
    found = by_id(check_host(make_host(drop=["proc/sys/vm/zone_reclaim_mode",
                                             "sys/kernel/mm/transparent_hugepage"]),
                             include_ok=True))
    missing = {i for i, f in found.items() if f.data["status"] == "not-available"}
    assert missing == {"host-zone-reclaim", "host-thp-enabled", "host-thp-defrag"}


def test_garbage_values_are_not_available(make_host) -> None:
    found = by_id(check_host(make_host(**{"proc/sys/vm/swappiness": "sixty\n"}), include_ok=True))
    assert found["host-swappiness"].data["status"] == "not-available"


def test_tuned_host_is_ok_and_ok_rows_only_on_request(make_host) -> None:
    tuned = {
        "proc/sys/kernel/numa_balancing": "0\n",
        "proc/sys/vm/swappiness": "10\n",
        "sys/kernel/mm/transparent_hugepage/defrag": "always defer defer+madvise [madvise] never\n",
    }
    paths = make_host(**tuned)
    ok = {f.id for f in check_host(paths, include_ok=True) if f.data["status"] == "ok"}
    assert {"host-numa-balancing", "host-swappiness", "host-thp-defrag", "host-zone-reclaim"} <= ok
    assert not ok & {f.id for f in check_host(paths)}


def test_numa_balancing_on_one_node_is_only_advice(make_host) -> None:
    paths = make_host(drop=["sys/devices/system/node/node1"])
    assert by_id(check_host(paths))["host-numa-balancing"].severity is Severity.INFO


def test_swappiness_without_swap_is_only_advice(make_host) -> None:
    meminfo = (make_host().proc / "meminfo").read_text().replace("8388604", "0")
    paths = make_host(**{"proc/meminfo": meminfo})
    assert by_id(check_host(paths))["host-swappiness"].severity is Severity.INFO


def test_rendezvous_port_inside_the_ephemeral_range_is_a_warning(make_host) -> None:
    wide = {"proc/sys/net/ipv4/ip_local_port_range": "1024\t65535\n"}
    f = by_id(check_host(make_host(**wide)))["host-ip-local-port-range"]
    assert f.severity is Severity.WARNING and "29400,29500" in f.message
    assert f.data["fix"] == "sysctl -w net.ipv4.ip_local_reserved_ports=29400,29500"
    reserved = {**wide, "proc/sys/net/ipv4/ip_local_reserved_ports": "29400,29500-29510\n"}
    assert "host-ip-local-port-range" not in by_id(check_host(make_host(**reserved)))
    f = by_id(check_host(make_host(**wide), rendezvous_ports=[6000]))["host-ip-local-port-range"]
    assert "6000" in f.data["fix"]


def test_unused_hugetlb_reservation(make_host) -> None:
    meminfo = (make_host().proc / "meminfo").read_text()
    big = meminfo.replace("HugePages_Total:       0", "HugePages_Total:  200000") \
        .replace("HugePages_Free:        0", "HugePages_Free:   200000") \
        .replace("Hugetlb:               0 kB", "Hugetlb:       409600000 kB")
    f = by_id(check_host(make_host(**{"proc/meminfo": big})))["host-hugepages"]
    assert f.severity is Severity.WARNING
    assert "None of it is in use" in f.message


def test_cgroup_v2_missing_controllers(make_host) -> None:
    paths = make_host(**{"sys/fs/cgroup/cgroup.controllers": "io pids\n"})
    f = by_id(check_host(paths))["host-cgroup-controllers"]
    assert f.severity is Severity.WARNING and "cpu,cpuset,memory" in f.message
    assert "+cpu +cpuset +memory" in f.data["fix"]


def test_findings_are_json_and_round_trip(make_host) -> None:
    for f in check_host(make_host(), include_ok=True):
        assert Finding.from_dict(json.loads(json.dumps(f.to_dict()))) == f


def test_a_root_that_is_not_a_directory_cannot_be_checked(tmp_path: Path) -> None:
    with pytest.raises(FabricError, match="not a directory") as e:
        check_host(HostPaths(tmp_path / "nope", tmp_path))
    assert "--proc-root" in str(e.value)


def test_live_host_does_not_crash() -> None:
    findings = check_host(include_ok=True)
    assert [f.id for f in findings] == rule_ids()
