"""Real processes across network namespaces (the multi-host test rig): untuned gloo
fails, tuned gloo runs on the fabric network, the smoke test names a host whose
fabric link is down, and the CLI tunes, benchmarks and searches over the rig."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aitrain.fabric.tune import tune
from aitrain.launcher.nodes import (
    apply_tuned,
    netns_node,
    probe_node,
    run_on_nodes,
    smoke_gate,
    smoke_test,
)

from rig_helpers import delta, rx_tx_bytes

pytestmark = [pytest.mark.netns, pytest.mark.slow]

MIB = 1 << 20


def bench_argv(out, size="16M", iters=3, timeout=30):
    return [sys.executable, "-u", "-m", "aitrain.fabric.bench_rank", "--mode", "bench", "--collectives",
            "all_reduce", "--sizes", size, "--iters", str(iters), "--out", str(out), "--timeout", str(timeout)]


def tuned_nodes(rig, count):
    nodes = [netns_node(h.name, h.mgmt_ip) for h in rig.hosts[:count]]
    hosts = [probe_node(n) for n in nodes]
    tuned = tune(hosts)
    apply_tuned(nodes, tuned, hosts)
    return nodes, tuned


def test_untuned_two_host_gloo_job_fails(rig, tmp_path):
    """No GLOO_SOCKET_IFNAME: gloo binds what the hostname resolves to (127.0.0.1 in
    every namespace), so the ranks cannot connect to each other."""
    n1, n2 = rig.hosts[:2]
    nodes = [netns_node(n1.name, n1.mgmt_ip), netns_node(n2.name, n2.mgmt_ip)]  # naive: node 0's mgmt IP
    run = run_on_nodes(nodes, bench_argv(tmp_path / "r.json", timeout=6), timeout=45, run_dir=tmp_path)
    assert not run.ok, "an untuned cross-namespace gloo job should not connect"
    messages = " ".join(r.message for r in run.results.values() if r is not None)
    assert "127.0.0.1" in messages, run.failure()


def test_tuned_two_host_gloo_job_runs_on_the_fabric_network(rig, tmp_path):
    nodes, tuned = tuned_nodes(rig, 2)
    assert [t.env["GLOO_SOCKET_IFNAME"] for t in tuned.values()] == ["fab0", "fab0"]
    assert nodes[0].address == rig.hosts[0].fabric_ip
    before = {n.name: rx_tx_bytes(n.name) for n in nodes}
    run = run_on_nodes(nodes, bench_argv(tmp_path / "r.json"), timeout=90, run_dir=tmp_path)
    assert run.ok, run.failure()
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["rows"][0]["correct"] is True and result["world_size"] == 2
    for n in nodes:
        moved = delta(before[n.name], rx_tx_bytes(n.name))
        # 4 all_reduces of 16 MiB (check + 3 timed) cross fab0; eth0 only sees noise
        assert moved["fab0"] > 4 * 16 * MIB, moved
        assert moved["eth0"] < 1 * MIB, moved


def test_smoke_names_the_host_whose_fabric_link_is_down(rig, tmp_path):
    """fab0 down inside one host: that host's own check names it at once, the smoke
    all_reduce over the others passes, and the launch can go on without it."""
    nodes, _ = tuned_nodes(rig, 4)
    bad = rig.hosts[2].name
    subprocess.run(["ip", "-n", bad, "link", "set", "fab0", "down"], check=True)
    try:
        outcome = smoke_gate(nodes, tmp_path, timeout=10, exclude_bad_nodes=True, min_nodes=3)
    finally:
        subprocess.run(["ip", "-n", bad, "link", "set", "fab0", "up"], check=True)
    assert outcome.excluded == [bad], outcome.message
    assert [n.name for n in outcome.nodes] == [n.name for n in nodes if n.name != bad]
    assert f"fab0 is down on {bad}" in outcome.message


def test_smoke_bisection_finds_a_host_cut_off_behind_a_working_link(rig, tmp_path):
    """The fabric 'cable' of one host is pulled at the switch (its veth leaves the fabric
    bridge): its fab0 still looks up, only a collective shows the fault. Bisection over
    the four hosts names it in two rounds after the failed smoke."""
    nodes, _ = tuned_nodes(rig, 4)
    bad = rig.hosts[2]
    outer = f"{rig.name}{bad.index}f"  # the rig's name for the fabric veth's outer end
    subprocess.run(["ip", "link", "set", outer, "nomaster"], check=True)
    try:
        report = smoke_test(nodes, tmp_path, timeout=10)
    finally:
        subprocess.run(["ip", "link", "set", outer, "master", rig.fabric_bridge], check=True)
    assert report.precheck == {} and not report.full.ok
    assert report.bad == [bad.name], report.describe()
    assert report.bisect.good == [n.name for n in nodes if n.name != bad.name]
    assert len(report.bisect.rounds) == 2  # halves, then each suspect with a good partner
    assert bad.name in report.describe()


def aitrain(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "aitrain.launcher.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_tune_json_over_the_rig(rig):
    out = aitrain("fabric", "tune", "--netns", rig.hosts[0].name, "--netns", rig.hosts[1].name, "--json",
                  "--profile", "none", "--env", "NCCL_IB_TC=106")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [h["hostname"] for h in doc["hosts"]] == [rig.hosts[0].name, rig.hosts[1].name]
    for h in doc["hosts"]:
        assert h["env"]["NCCL_SOCKET_IFNAME"] == "=fab0" and h["env"]["GLOO_SOCKET_IFNAME"] == "fab0"
        assert h["reasons"]["GLOO_SOCKET_IFNAME"]
        assert h["env"]["NCCL_IB_TC"] == "106" and "NCCL_IB_TC" in h["user_set"]


def test_cli_bench_over_the_rig(rig, tmp_path):
    ns = ["--netns", rig.hosts[0].name, "--netns", rig.hosts[1].name]
    out = aitrain("fabric", "bench", *ns, "--collectives", "all_reduce,sendrecv", "--sizes", "1M",
                  "--json", "--plot", str(tmp_path / "p.png"), "--timeout", "60")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert {r["collective"] for r in doc["rows"]} == {"all_reduce", "sendrecv"}
    assert all(r["correct"] and r["busbw_gbps"] > 0 for r in doc["rows"])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert doc["run_dir"] is None  # no --run-dir and all correct: nothing left in /tmp


def test_cli_search_stores_a_profile_that_tune_then_uses(rig, tmp_path):
    ns = ["--netns", rig.hosts[0].name, "--netns", rig.hosts[1].name]
    out = aitrain("fabric", "tune", *ns, "--search", "--search-size", "2M", "--search-iters", "2",
                  "--profile-dir", str(tmp_path), "--json", "--timeout", "60", timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    trials = {t["setting"]["interface"]: t["busbw_gbps"] for t in doc["search"]["trials"]}
    assert set(trials) == {"fab0", "eth0"} and trials["fab0"] > 2 * trials["eth0"]
    # Long work says what it did as it goes: each trial on stderr as it ended, stdout stays JSON.
    shown = [line for line in out.stderr.splitlines() if line.startswith("search trial ")]
    assert len(shown) == len(doc["search"]["trials"]) and "interface=fab0" in "\n".join(shown)
    assert doc["profile"] == doc["search"]["fingerprint"]
    assert list(tmp_path.glob("*.json"))
    out = aitrain("fabric", "tune", *ns, "--profile-dir", str(tmp_path), "--json")
    doc = json.loads(out.stdout)
    assert doc["hosts"][1]["reasons"]["GLOO_SOCKET_IFNAME"].startswith("profile")
    assert doc["hosts"][1]["env"]["GLOO_SOCKET_IFNAME"] == "fab0"
