"""`aitrain fabric probe|check` as a user runs it: a subprocess, real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ENV = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}


def aitrain(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aitrain.launcher.cli", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=120)


def test_probe_json_schema_of_a_captured_host(hosts_dir):
    out = aitrain("fabric", "probe", "--sysfs-root", str(hosts_dir / "roce01"), "--json")
    assert out.returncode == 0, out.stderr
    (host,) = json.loads(out.stdout)["hosts"]
    assert {"hostname", "nics", "rdma_devices"} <= host.keys() and host["hostname"] == "roce01"
    dev = host["rdma_devices"][0]
    assert {"name", "ports"} <= dev.keys()
    port = dev["ports"][0]
    assert {"port", "state", "link_layer", "rate_gbps", "active_mtu", "gids"} <= port.keys()
    assert (port["state"], port["link_layer"], port["rate_gbps"], port["active_mtu"]) == \
        ("ACTIVE", "Ethernet", 100.0, 4096)
    gid = port["gids"][-1]
    assert set(gid) == {"index", "gid", "type", "netdev"} and gid["type"] == "RoCE v2" and gid["netdev"] == "ens1f0np0"


def test_probe_json_has_gpu_nic_distances_and_loads_back(hosts_dir):
    from aitrain.fabric.topology import loads_topologies

    out = aitrain("fabric", "probe", "--sysfs-root", str(hosts_dir / "dgx01"), "--json")
    (host,) = json.loads(out.stdout)["hosts"]
    near = {(d["gpu"], d["nic"]) for d in host["gpu_nic_distances"] if d["distance"] == "same-switch"}
    assert near == {(i, f"mlx5_{i}") for i in range(8)}
    assert {d["distance"] for d in host["gpu_nic_distances"]} == {"same-switch", "same-numa-node", "cross-socket"}
    assert loads_topologies(out.stdout)[0].hostname == "dgx01"


def test_probe_json_of_this_host():
    out = aitrain("fabric", "probe", "--json")
    assert out.returncode == 0, out.stderr
    (host,) = json.loads(out.stdout)["hosts"]
    assert host["rdma_devices"] == [] and host["nics"]


def test_probe_host_check_adds_this_hosts_findings_and_refuses_captured_trees(hosts_dir):
    out = aitrain("fabric", "probe", "--json", "--host-check")
    assert out.returncode == 0, out.stderr
    (host,) = json.loads(out.stdout)["hosts"]
    # (a host tuned to every recommendation has no findings at all)
    assert all(f["id"].startswith("host-") and f["host"] == host["hostname"] for f in host["host_findings"])
    bad = aitrain("fabric", "probe", "--json", "--host-check", "--sysfs-root", str(hosts_dir / "roce01"))
    assert bad.returncode == 2 and "live host only" in bad.stderr


def test_host_findings_of_a_jobs_nodes_gate_the_launch(capsys):
    import pytest

    from aitrain.errors import FabricError
    from aitrain.fabric.findings import Finding, Severity
    from aitrain.launcher.pipeline import gate as gate_host_findings
    from aitrain.launcher.pipeline import host_findings

    def doc(sev: Severity) -> dict:
        return {"hostname": "localhost", "host_findings": [
            Finding("host-memlock-low", sev, "localhost", "memlock", "64 KiB", "ulimit -l unlimited").to_dict()]}

    found = host_findings({"node1": doc(Severity.WARNING), "node2": {"hostname": "localhost"}})
    assert [(f.host, f.id) for f in found] == [("node1", "host-memlock-low")]  # named after the node
    gate_host_findings(found, "fail", "on 2 node(s)")
    assert "0 error(s), 1 warning(s) on 2 node(s) (host-memlock-low)" in capsys.readouterr().out
    errors = host_findings({"node2": doc(Severity.ERROR)})
    with pytest.raises(FabricError) as e:
        gate_host_findings(errors, "fail", "on 2 node(s)")
    assert "node2 memlock" in str(e.value) and "fabric.on_error=warn" in e.value.hint
    gate_host_findings(errors, "warn", "on 2 node(s)")  # reported, not fatal
    assert "1 error(s)" in capsys.readouterr().out


def test_probe_table(hosts_dir):
    out = aitrain("fabric", "probe", "--sysfs-root", str(hosts_dir / "dgx01"))
    assert out.returncode == 0, out.stderr
    assert "mlx5_7/1" in out.stdout and "ACTIVE" in out.stdout and "same-switch" in out.stdout
    assert "\033[" not in out.stdout  # not a terminal: no colour


def test_probe_table_colour_can_be_forced(hosts_dir):
    out = aitrain("fabric", "probe", "--sysfs-root", str(hosts_dir / "dgx01"), env={"FORCE_COLOR": "1"})
    assert "\033[32mACTIVE" in out.stdout
    out = aitrain("fabric", "probe", "--sysfs-root", str(hosts_dir / "dgx01"), "--color", "always",
                  env={"NO_COLOR": "1"})
    assert "\033[" in out.stdout


def test_check_ok_exits_0(hosts_dir):
    out = aitrain("fabric", "check", "--sysfs-root", str(hosts_dir / "dgx01"), "--sysfs-root",
                  str(hosts_dir / "dgx02"), "--rendezvous", "dgx01", "--expected-rate-gbps", "400")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no findings on 2 host(s)" in out.stdout


def test_check_errors_exit_1_with_a_table(broken_dir):
    out = aitrain("fabric", "check", "--sysfs-root", str(broken_dir / "port-init"))
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["SEVERITY", "HOST", "SUBJECT", "ID"]
    assert lines[1].split() == ["ERROR", "port-init01", "mlx5_6/1", "rdma-port-not-active"]
    assert "hint:" in out.stdout and "1 error(s)" in out.stdout


def test_check_json(broken_dir):
    out = aitrain("fabric", "check", "--sysfs-root", str(broken_dir / "rate-degraded"), "--json",
                  "--expected-rate-gbps", "400")
    assert out.returncode == 1
    findings = json.loads(out.stdout)["findings"]
    assert {f["id"] for f in findings} == {"rdma-rate-below-peers", "rdma-rate-below-expected"}
    assert set(findings[0]) == {"id", "severity", "host", "subject", "message", "hint", "data"}


def test_check_directory_of_hosts_is_multi_host(hosts_dir):
    out = aitrain("fabric", "check", "--sysfs-root", str(hosts_dir), "--json")
    findings = json.loads(out.stdout)["findings"]
    assert out.returncode == 1
    assert {"hosts-link-layer-mismatch", "hosts-active-hca-count-mismatch"} <= {f["id"] for f in findings}


def test_check_missing_root_exits_2(tmp_path):
    out = aitrain("fabric", "check", "--sysfs-root", str(tmp_path / "nope"))
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "HINT:" in out.stderr


def test_probe_missing_root_exits_2(tmp_path):
    out = aitrain("fabric", "probe", "--sysfs-root", str(tmp_path / "nope"))
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_check_proc_root_without_sysfs_root_exits_2(tmp_path):
    out = aitrain("fabric", "check", "--proc-root", str(tmp_path))
    assert out.returncode == 2 and "--sysfs-root" in out.stderr


def test_check_garbage_tree_still_runs(broken_dir):
    out = aitrain("fabric", "check", "--sysfs-root", str(broken_dir / "garbage-files"), "--json")
    assert out.returncode in (0, 1), out.stderr
    assert any(f["id"] == "probe-bad-file-content" for f in json.loads(out.stdout)["findings"])


def test_check_from_probe_json_and_path_map(tmp_path, hosts_dir, shared):
    probe = aitrain("fabric", "probe", "--sysfs-root", str(hosts_dir / "dgx01"), "--json")
    (tmp_path / "dgx01.json").write_text(probe.stdout)
    out = aitrain("fabric", "check", "--from-json", str(tmp_path / "dgx01.json"),
                  "--sysfs-root", str(shared / "gcm" / "learn_stuck_ib_intf.json"), "--json", "--no-probe-warnings")
    findings = json.loads(out.stdout)["findings"]
    assert out.returncode == 1
    assert {(f["host"], f["id"]) for f in findings} >= {("node1661", "rdma-port-not-active"),
                                                         ("node1661", "hosts-active-hca-count-mismatch")}
    assert not any(f["id"].startswith("probe-") for f in findings)


def test_check_list_ids():
    out = aitrain("fabric", "check", "--list-ids")
    assert out.returncode == 0 and "rdma-port-not-active" in out.stdout and "hosts-mtu-mismatch" in out.stdout


def test_fabric_without_subcommand_prints_help():
    out = aitrain("fabric")
    assert out.returncode == 2 and "probe" in out.stdout and "check" in out.stdout


def test_probe_cache_flag(tmp_path):
    env = {"AITRAIN_CACHE_DIR": str(tmp_path)}
    assert aitrain("fabric", "probe", "--json", "--cache", env=env).returncode == 0
    assert len(list((tmp_path / "fabric").glob("probe-*.json"))) == 1
    assert aitrain("fabric", "check", "--cache", env=env).returncode == 0


def test_cli_imports_stay_light():
    code = ("import sys, aitrain.launcher.cli as c; c.build_parser(); import aitrain.fabric; "
            "print(sorted(m for m in ('torch', 'mlflow', 'hydra', 'pyverbs') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_fabric_subcommands_in_order():
    import argparse

    from aitrain.launcher.cli import fabric as cli_fabric

    sub = argparse.ArgumentParser().add_subparsers()
    parser = cli_fabric.add_parser(sub)
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert list(choices) == ["probe", "check", "tune", "bench"]


def test_broken_pipe_is_quiet(hosts_dir):
    cmd = (f"{sys.executable} -m aitrain.launcher.cli fabric probe --sysfs-root {hosts_dir / 'dgx01'} | head -1")
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("host dgx01") and "Traceback" not in out.stderr
