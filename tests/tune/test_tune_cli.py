"""`aitrain fabric tune` on captured host trees, and `aitrain fabric bench` on this host."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def aitrain(*args, env=None, timeout=180):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "GLOO_"))}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "aitrain.launcher.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full)


def test_tune_json_shape_and_reasons(trees):
    out = aitrain("fabric", "tune", "--sysfs-root", str(trees / "roce01"), "--sysfs-root", str(trees / "roce02"),
                  "--nccl-version", "2.18.3", "--json", "--profile", "none")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [h["hostname"] for h in doc["hosts"]] == ["roce01", "roce02"]
    for h in doc["hosts"]:
        assert set(h) >= {"hostname", "env", "reasons", "user_set"}
        assert set(h["env"]) == set(h["reasons"])
        assert h["env"]["NCCL_IB_GID_INDEX"] == "3"
        assert h["env"]["NCCL_SOCKET_IFNAME"].startswith("=")


def test_tune_table_marks_user_set(trees):
    out = aitrain("fabric", "tune", "--sysfs-root", str(trees / "dgx01"), "--rendezvous", "10.0.0.1",
                  "--env", "NCCL_IB_HCA==mlx5_0:1", "--color", "never", env={"NCCL_IB_TC": "106"})
    assert out.returncode == 0, out.stderr
    assert "NCCL_IB_HCA==mlx5_0:1" in out.stdout and "user-set (fabric.env)" in out.stdout
    assert "NCCL_IB_TC=106" in out.stdout and "user-set (shell env)" in out.stdout
    assert "NCCL_ALGO" not in out.stdout and "NCCL_PROTO" not in out.stdout


def test_tune_newer_nccl_leaves_gid_index_unset(trees):
    out = aitrain("fabric", "tune", "--sysfs-root", str(trees / "roce01"), "--rendezvous", "10.0.0.1",
                  "--nccl-version", "2.21.5", "--json")
    h = json.loads(out.stdout)["hosts"][0]
    assert "NCCL_IB_GID_INDEX" not in h["env"] and "2.21" in h["notes"]["NCCL_IB_GID_INDEX"]


def test_search_refuses_captured_trees(trees):
    out = aitrain("fabric", "tune", "--sysfs-root", str(trees / "cpu01"), "--search")
    assert out.returncode == 2 and "captured trees" in out.stderr


def test_bench_bad_arguments_fail_fast():
    out = aitrain("fabric", "bench", "--collectives", "allreduce")
    assert out.returncode == 2 and "unknown collective" in out.stderr
    out = aitrain("fabric", "bench", "--sizes", "1G:1K")
    assert out.returncode == 2 and "size range" in out.stderr


@pytest.mark.slow
def test_bench_on_this_host_all_collectives(tmp_path):
    out = aitrain("fabric", "bench", "--collectives", "all", "--sizes", "64K", "--nproc-per-node", "2",
                  "--json", "--run-dir", str(tmp_path), "--timeout", "90")
    assert out.returncode == 0, out.stderr + out.stdout
    doc = json.loads(out.stdout)
    assert doc["world_size"] == 2 and doc["backend"] == "gloo"
    assert [r["collective"] for r in doc["rows"]] == ["all_reduce", "all_gather", "reduce_scatter", "broadcast",
                                                      "all_to_all", "sendrecv"]
    assert all(r["correct"] for r in doc["rows"])
    assert doc["env"]["GLOO_SOCKET_IFNAME"] == "lo"  # one host: loopback


@pytest.mark.slow
def test_bench_prints_each_row_as_it_is_measured(tmp_path):
    """Rows reach stdout while the ranks still run (rank 0 writes result.json only at the end)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "GLOO_"))}
    proc = subprocess.Popen([sys.executable, "-m", "aitrain.launcher.cli", "fabric", "bench", "--collectives",
                             "all_reduce,all_gather", "--sizes", "64K,16M", "--iters", "5", "--run-dir",
                             str(tmp_path), "--timeout", "90"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    lines = []
    finished_at_first_row = None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if finished_at_first_row is None and line.strip().startswith("64K"):
            finished_at_first_row = (tmp_path / "result.json").exists()
    assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
    assert finished_at_first_row is False, "the first row came only after the benchmark had ended"
    text = "\n".join(lines)
    assert text.index("## all_reduce") < text.index("## all_gather") < text.index("# 2 rank(s), backend gloo")
    assert sum(1 for line in lines if line.strip().endswith(" ok")) == 4
