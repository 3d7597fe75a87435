"""Resource plans without processes: memory sizes, CPU sets from sysfs trees, cgroup discovery, perf output."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from aitrain.errors import ConfigError
from aitrain.launcher.config import JobConfig
from aitrain.launcher.profiling import parse_perf_stat, unsupported_note
from aitrain.launcher.resources import (
    CgroupLayout,
    CgroupUnavailable,
    JobCgroup,
    NodePlan,
    NodeResources,
    ResourceRequest,
    apply_rank_plan,
    find_cgroups,
    gpu_numa_nodes,
    parse_memory_size,
    plan_cpu_sets,
)


def test_memory_sizes() -> None:
    assert parse_memory_size("300M") == 300 << 20
    assert parse_memory_size("1.5G") == 3 << 29
    assert parse_memory_size("512Mi") == parse_memory_size("512MB") == 512 << 20
    assert parse_memory_size(str(64 << 20)) == 64 << 20
    with pytest.raises(ConfigError, match="512M"):
        parse_memory_size("lots")
    with pytest.raises(ConfigError, match="below 1M"):
        parse_memory_size("100K")


def _job(**kw: object) -> JobConfig:
    job = JobConfig()
    res = kw.pop("resources", None)
    if res:
        job.resources = dataclasses.replace(job.resources, **res)  # type: ignore[arg-type]
    return dataclasses.replace(job, **kw)  # type: ignore[arg-type]


def test_request_from_config_checks_values() -> None:
    req = ResourceRequest.from_config(_job(binding="core", profile="perf",
                                           resources={"cgroup": True, "memory_max": "2G"}))
    assert (req.binding, req.cgroup, req.memory_max, req.profile) == ("core", True, 2 << 30, "perf")
    assert not ResourceRequest.from_config(_job()).active
    with pytest.raises(ConfigError, match="resources.cgroup=true"):
        ResourceRequest.from_config(_job(resources={"memory_max": "2G"}))
    with pytest.raises(ConfigError, match="numa.*core.*none"):
        ResourceRequest.from_config(_job(binding="socket"))
    with pytest.raises(ConfigError, match="pyspy"):
        ResourceRequest.from_config(_job(profile="vtune"))


def _sysfs(root: Path, *, nodes: dict[int, str], gpus: dict[str, int] | None = None) -> Path:
    """A sysfs tree: online CPUs, NUMA nodes (node -> cpulist), NVIDIA GPUs (PCI address -> NUMA node)."""
    cpu = root / "devices/system/cpu"
    cpu.mkdir(parents=True)
    all_cpus = ",".join(nodes.values())
    (cpu / "online").write_text(all_cpus + "\n")
    for n, cpus in nodes.items():
        d = root / f"devices/system/node/node{n}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
    for address, numa in (gpus or {}).items():
        d = root / "bus/pci/devices" / address
        d.mkdir(parents=True)
        (d / "class").write_text("0x030200\n")
        (d / "vendor").write_text("0x10de\n")
        (d / "numa_node").write_text(f"{numa}\n")
    return root


def test_numa_binding_follows_each_ranks_gpu(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path, nodes={0: "0-3", 1: "4-7"},
                   gpus={"0000:17:00.0": 1, "0000:b1:00.0": 0})  # GPU 0 sits on node 1
    gpus = gpu_numa_nodes(sysfs)
    assert gpus == [1, 0]
    sets, note = plan_cpu_sets("numa", 2, sysfs_root=sysfs, allowed=range(8), gpu_numa=gpus)
    assert sets == [[4, 5, 6, 7], [0, 1, 2, 3]]
    assert "NUMA node of its GPU" in note
    assert gpu_numa_nodes(sysfs, visible="1") == [0]  # CUDA_VISIBLE_DEVICES=1: the rank's GPU is on node 0
    assert gpu_numa_nodes(sysfs, visible="GPU-6f1e") == []  # UUIDs: no alignment


def test_core_binding_splits_the_allowed_cpus(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path, nodes={0: "0-7"})
    sets, _ = plan_cpu_sets("core", 2, sysfs_root=sysfs, allowed=range(8))
    assert sets == [[0, 1, 2, 3], [4, 5, 6, 7]]
    sets, note = plan_cpu_sets("core", 3, sysfs_root=sysfs, allowed=[2, 3, 4, 5, 6, 7])  # e.g. taskset -c 2-7
    assert sets == [[2, 3], [4, 5], [6, 7]] and "CPUs 2-7" in note


def test_rank_plan_sets_affinity_and_omp_and_leaves_no_plan_behind() -> None:
    import json
    import os

    cpu = sorted(os.sched_getaffinity(0))[-1]
    env = {"LOCAL_RANK": "1", "AITRAIN_RANK_PLAN": json.dumps({"cpu_sets": [[], [cpu]], "omp_threads": [3, 1]})}
    before = os.sched_getaffinity(0)
    try:
        assert apply_rank_plan(env) is None
        assert os.sched_getaffinity(0) == {cpu}
    finally:
        os.sched_setaffinity(0, before)
    assert env == {"LOCAL_RANK": "1", "OMP_NUM_THREADS": "1"}


# -- cgroups ----------------------------------------------------------------------------

HYBRID_MOUNTINFO = """\
31 23 0:28 / {root} rw,relatime - tmpfs tmpfs rw,mode=755
34 31 0:31 / {root}/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_SELF = "4:memory:/process_api/abc\n3:cpuset:/\n0::/\n"


def _proc(tmp_path: Path, mountinfo: str, self_cgroup: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self/mountinfo").write_text(mountinfo)
    (proc / "self/cgroup").write_text(self_cgroup)
    return proc


def test_hybrid_host_uses_v1_nested_under_the_agents_own_cgroup(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "unified").mkdir(parents=True)
    (root / "unified/cgroup.controllers").write_text("hugetlb\n")  # v2 without memory: not usable
    proc = _proc(tmp_path, HYBRID_MOUNTINFO.format(root=root), HYBRID_SELF)
    layout = find_cgroups(proc, root="")
    assert layout.version == 1
    assert layout.job_dirs("aitrain/j") == {"memory": root / "memory/process_api/abc/aitrain/j",
                                            "cpuset": root / "cpuset/aitrain/j"}


def test_unified_host_uses_v2_at_the_top(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    proc = _proc(tmp_path, f"30 23 0:26 / {root} rw - cgroup2 cgroup2 rw\n", "0::/user.slice/session-1.scope\n")
    layout = find_cgroups(proc, root="")
    assert layout.version == 2 and layout.job_dirs("aitrain/j") == {"unified": root / "aitrain/j"}


def test_no_cgroup_fs_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(CgroupUnavailable, match="no cgroup filesystem"):
        find_cgroups(_proc(tmp_path, "", ""), root="")
    with pytest.raises(CgroupUnavailable, match="not a cgroup filesystem"):
        find_cgroups(root=str(tmp_path))


def test_v2_group_gets_controllers_limit_and_cpus(tmp_path: Path) -> None:
    """On a stand-in tree (regular files): what is written where, and OOM kills read back."""
    top = tmp_path / "cg"
    top.mkdir()
    (top / "cgroup.controllers").write_text("cpuset memory pids\n")
    (top / "cgroup.subtree_control").write_text("")
    group = JobCgroup.create("aitrain/j", memory_max=300 << 20, cpus=[0, 1, 2, 3],
                             layout=CgroupLayout(2, {"unified": top}))
    job = top / "aitrain/j"
    assert group.procs_files == [str(job / "cgroup.procs")]
    assert (job / "memory.max").read_text() == str(300 << 20)
    assert (job / "cpuset.cpus").read_text() == "0-3"
    assert (top / "aitrain/cgroup.subtree_control").read_text() == "+cpuset"  # the last of +memory, +cpuset
    assert group.memory_limited and group.notes == []
    (job / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert group.oom_kills() == 1


def test_v2_without_the_memory_controller_says_so(tmp_path: Path) -> None:
    top = tmp_path / "cg"
    top.mkdir()
    (top / "cgroup.controllers").write_text("pids\n")
    group = JobCgroup.create("aitrain/j", memory_max=300 << 20, layout=CgroupLayout(2, {"unified": top}))
    assert not group.memory_limited
    assert "memory controller is not available" in group.notes[0]


def test_oom_killed_rank_is_named() -> None:
    node = NodeResources(NodePlan(), nproc=2)
    node.cgroup = SimpleNamespace(oom_kills=lambda: 1, memory_max=300 << 20)  # type: ignore[assignment]
    failures = {0: SimpleNamespace(exitcode=-signal.SIGTERM), 1: SimpleNamespace(exitcode=-signal.SIGKILL)}
    assert node.oom_ranks(failures) == ({1}, "cgroup memory limit 300M reached")
    ranks, reason = node.oom_ranks({0: SimpleNamespace(exitcode=1)})  # a data-loader worker was the victim
    assert ranks == set() and "killed 1 process(es) in the job's cgroup" in reason
    node.cgroup = SimpleNamespace(oom_kills=lambda: 0, memory_max=300 << 20)  # type: ignore[assignment]
    assert node.oom_ranks(failures) == (set(), "")


# -- perf stat output -------------------------------------------------------------------

PERF_VM = """\
# started on Tue Nov 24 22:32:19 2026

<not supported>,,cycles,0,100.00,,
<not supported>,,instructions,0,100.00,,
<not supported>,,cache-misses,0,100.00,,
448,,context-switches,433372681,100.00,1.034,K/sec
433.37,msec,task-clock,433372681,100.00,0.760,CPUs utilizedEvents disabled
Events enabled
"""

PERF_PMU = """\
1843212598,,cycles:u,1210048213,100.00,,
2511845112,,instructions:u,1210048213,100.00,1.36,insn per cycle
412884,,cache-misses:u,1210048213,100.00,,
211,,context-switches:u,1210048213,100.00,174.372,/sec
1210.05,msec,task-clock:u,1210048213,100.00,0.981,CPUs utilized
"""

PERF_HYBRID = """\
1000,,cpu_core/cycles/,500,100.00,,
200,,cpu_atom/cycles/,500,100.00,,
<not counted>,,cpu_atom/instructions/,0,0.00,,
3000,,cpu_core/instructions/,500,100.00,3.00,insn per cycle
"""


def test_perf_output_without_hardware_counters() -> None:
    counters, units, missing = parse_perf_stat(PERF_VM)
    assert counters == {"context-switches": 448.0, "task-clock": 433.37}
    assert units["task-clock"] == "msec"
    assert missing == ["cycles", "instructions", "cache-misses"]
    note = unsupported_note(missing, list(counters))
    assert "not supported on this machine" in note and "PMU" in note and "counting context-switches" in note


def test_perf_output_with_hardware_counters() -> None:
    counters, _, missing = parse_perf_stat(PERF_PMU)
    assert counters["instructions"] == 2511845112 and counters["cycles"] == 1843212598
    assert counters["cache-misses"] == 412884 and missing == []


def test_perf_output_of_a_hybrid_cpu_sums_core_types() -> None:
    counters, _, missing = parse_perf_stat(PERF_HYBRID)
    assert counters == {"cycles": 1200.0, "instructions": 3000.0} and missing == []
