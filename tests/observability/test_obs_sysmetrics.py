"""System metric readers on captured /proc and /sys trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aitrain.launcher.node.sysmetrics import (
    SystemMetricsThread,
    SystemSampler,
    interfaces_from_env,
    read_cgroup_usage,
    read_meminfo,
    read_pressure,
    read_proc_cgroups,
    select_interfaces,
)


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write(tmp_path, "proc/stat", "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0 0 0\n")
    write(tmp_path, "proc/meminfo", "MemTotal:       16384000 kB\nMemFree:  1000 kB\n"
                                     "MemAvailable:    8192000 kB\nCached:          2048000 kB\n")
    write(tmp_path, "proc/pressure/cpu", "some avg10=1.50 avg60=1.00 avg300=0.50 total=100\n"
                                          "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    write(tmp_path, "proc/pressure/memory",
          "some avg10=0.25 avg60=0 avg300=0 total=1\nfull avg10=0.10 avg60=0 avg300=0 total=1\n")
    write(tmp_path, "proc/self/cgroup", "0::/job.slice/aitrain-1\n")
    write(tmp_path, "proc/4242/cgroup", "12:memory:/slurm/job_7\n4:cpu,cpuacct:/slurm/job_7\n1:name=systemd:/x\n")
    write(tmp_path, "cg/cgroup.controllers", "cpu memory io\n")
    write(tmp_path, "cg/job.slice/aitrain-1/memory.current", str(3 * 2**30))
    write(tmp_path, "cg/job.slice/aitrain-1/memory.max", "max\n")
    write(tmp_path, "cg/job.slice/aitrain-1/cpu.stat", "usage_usec 10000000\nuser_usec 9000000\n")
    for name, up, rx, tx in (("ib0", "up", 1000, 2000), ("eth0", "up", 10, 20), ("lo", "unknown", 5, 5),
                             ("eth1", "down", 0, 0)):
        write(tmp_path, f"sys/class/net/{name}/operstate", up + "\n")
        write(tmp_path, f"sys/class/net/{name}/statistics/rx_bytes", f"{rx}\n")
        write(tmp_path, f"sys/class/net/{name}/statistics/tx_bytes", f"{tx}\n")
    port = "sys/class/infiniband/mlx5_0/ports/1"
    for name, value in (("counters/port_rcv_data", 100), ("counters/port_xmit_data", 200),
                        ("counters/symbol_error", 0), ("counters/link_downed", 1), ("hw_counters/out_of_sequence", 3)):
        write(tmp_path, f"{port}/{name}", f"{value}\n")
    return tmp_path


def test_readers(tree: Path) -> None:
    mem = read_meminfo(tree / "proc")
    assert mem["MemTotal"] == 16384000 * 1024 and mem["Cached"] == 2048000 * 1024
    assert read_pressure(tree / "proc") == {"cpu_some": 1.5, "cpu_full": 0.0, "memory_some": 0.25, "memory_full": 0.1}
    v2 = read_cgroup_usage(tree / "cg", read_proc_cgroups(tree / "proc"))
    assert v2.memory_bytes == 3 * 2**30 and v2.memory_max_bytes is None and v2.cpu_usage_s == 10.0
    assert read_proc_cgroups(tree / "proc", 4242) == {"memory": "/slurm/job_7", "cpu": "/slurm/job_7",
                                                      "cpuacct": "/slurm/job_7", "systemd": "/x"}


def test_cgroup_v1(tmp_path: Path) -> None:
    write(tmp_path, "cg/memory/slurm/job_7/memory.usage_in_bytes", "1048576\n")
    write(tmp_path, "cg/memory/slurm/job_7/memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path, "cg/cpu,cpuacct/slurm/job_7/cpuacct.usage", "2500000000\n")
    usage = read_cgroup_usage(tmp_path / "cg", {"memory": "/slurm/job_7", "cpuacct": "/slurm/job_7"})
    assert usage.memory_bytes == 1048576 and usage.memory_max_bytes is None and usage.cpu_usage_s == 2.5


def test_interface_selection(tree: Path) -> None:
    sys_root = tree / "sys"
    assert select_interfaces(sys_root) == ["eth0", "ib0"]  # up, not loopback
    assert select_interfaces(sys_root, ["ib"]) == ["ib0"]
    assert select_interfaces(sys_root, ["=eth0"]) == ["eth0"]
    assert select_interfaces(sys_root, ["^lo", "^eth"]) == ["ib0"]
    assert interfaces_from_env({"NCCL_SOCKET_IFNAME": "ib0,ib1"}) == ["ib0", "ib1"]
    assert interfaces_from_env({"NCCL_SOCKET_IFNAME": "ib0"}, explicit="eth0") == ["eth0"]
    assert interfaces_from_env({}) is None


class FakeGpus:
    def sample(self) -> dict[str, float]:
        return {"gpu/0/util_pct": 97.0, "gpu/0/power_w": 650.0}


def test_sampler_turns_counters_into_rates(tree: Path) -> None:
    s = SystemSampler("node-1", proc=tree / "proc", sys=tree / "sys", cgroup_root=tree / "cg",
                      interfaces=["ib0"], gpus=FakeGpus())
    first = s.sample(now=100.0)
    assert first["system/node-1/mem_total_mib"] == pytest.approx(16000.0)
    assert first["system/node-1/mem_available_mib"] == pytest.approx(8000.0)
    assert first["system/node-1/mem_cached_mib"] == pytest.approx(2000.0)
    assert first["system/node-1/mem_used_pct"] == pytest.approx(50.0)
    assert first["system/node-1/psi_cpu_some_avg10"] == 1.5
    assert first["system/node-1/cgroup_memory_mib"] == pytest.approx(3072.0)
    assert first["system/node-1/gpu/0/util_pct"] == 97.0
    assert not any("per_s" in k or "cpu_util" in k for k in first)  # rates need two samples

    write(tree, "proc/stat", "cpu  200 0 200 1400 200 0 0 0 0 0\n")
    write(tree, "cg/job.slice/aitrain-1/cpu.stat", "usage_usec 30000000\n")
    write(tree, "sys/class/net/ib0/statistics/rx_bytes", "11000\n")
    write(tree, "sys/class/net/ib0/statistics/tx_bytes", "2000\n")
    port = tree / "sys/class/infiniband/mlx5_0/ports/1"
    (port / "counters/port_rcv_data").write_text("350\n")  # +250 words = 1000 bytes
    (port / "counters/link_downed").write_text("2\n")
    (port / "hw_counters/out_of_sequence").write_text("13\n")
    second = s.sample(now=110.0)
    # total +1000 jiffies, idle +700, iowait +100 -> busy 20%, iowait 10%
    assert second["system/node-1/cpu_util_pct"] == pytest.approx(20.0)
    assert second["system/node-1/cpu_iowait_pct"] == pytest.approx(10.0)
    assert second["system/node-1/cgroup_cpu_cores"] == pytest.approx(2.0)
    assert second["system/node-1/net/ib0/rx_bytes_per_s"] == pytest.approx(1000.0)
    assert second["system/node-1/net/ib0/tx_bytes_per_s"] == 0.0
    assert "system/node-1/net/eth0/rx_bytes_per_s" not in second
    assert second["system/node-1/rdma/mlx5_0_1/rx_bytes_per_s"] == pytest.approx(100.0)
    assert second["system/node-1/rdma/mlx5_0_1/link_downed"] == 1.0
    assert second["system/node-1/rdma/mlx5_0_1/out_of_sequence"] == 10.0


def test_thread_writes_json_lines(tree: Path) -> None:
    path = tree / "run" / "system-node-1.jsonl"
    t = SystemMetricsThread(SystemSampler("node-1", proc=tree / "proc", sys=tree / "sys", cgroup_root=tree / "cg"),
                            path, interval_s=0.05)
    t.start()
    import time

    time.sleep(0.3)
    t.stop()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) >= 2 and [r["step"] for r in lines] == list(range(1, len(lines) + 1))
    assert all("system/node-1/mem_total_mib" in r and "time" in r for r in lines)
