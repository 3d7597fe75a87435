"""Binding, the job's cgroup and the profilers with real ranks through `aitrain launch` (plain-Python ranks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aitrain.launcher.resources import CgroupUnavailable, JobCgroup, find_cgroups

from aitrain_testing import REPO, aitrain_argv, alive, all_gone, run_aitrain, wait_until

PROBE = REPO / "tests" / "resources" / "scripts" / "rank_probe.py"
LEAN = ["tracking=none", "fabric=off", f"script={PROBE}"]
pytestmark = pytest.mark.timeout(180)




def _cpus_allowed(pid: int) -> set[int]:
    from aitrain.fabric.host import parse_cpulist

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return set(parse_cpulist(line.split(":", 1)[1]))
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


def _run_dir(stdout: str) -> Path:
    for line in stdout.splitlines():
        if "run dir " in line:
            return Path(line.rsplit("run dir ", 1)[1].split(";")[0].strip())
    raise AssertionError(f"no run dir in {stdout}")


def _memory_cgroups_or_skip() -> None:
    """Skip unless this process can create a cgroup with a memory limit (tried, then removed)."""
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    try:
        group = JobCgroup.create(f"aitrain/test-probe-{os.getpid()}", memory_max=256 << 20)
    except CgroupUnavailable as e:
        pytest.skip(str(e))
    group.remove()
    if not group.memory_limited:
        pytest.skip(f"no memory limit possible here: {'; '.join(group.notes)}")


needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding two ranks needs two CPUs")


@needs_two_cpus
def test_dry_run_shows_cpu_sets_omp_cgroup_and_profiler(tmp_path: Path) -> None:
    r = run_aitrain(["launch", *LEAN, "dry_run=true", "nproc_per_node=2", "binding=core",
                     "resources.cgroup=true", "resources.memory_max=300M", "profile=perf"], tmp_path)
    assert r.returncode == 0, r.stderr
    plan = r.stdout.split("# plan", 1)[1]
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    from aitrain.fabric.host import format_cpulist

    for rank, share in ((0, cpus[:half]), (1, cpus[half:])):
        block = plan.split(f"rank {rank}:", 1)[1].split("rank ", 1)[0]
        assert f"cpus: {format_cpulist(share)}" in block
        assert f"OMP_NUM_THREADS={len(share)}" in block
    assert "binding: core" in plan and "cgroup:" in plan and "memory max 300M" in plan
    assert "aitrain/" in plan and "killed at teardown" in plan
    assert "profile: perf stat" in plan and "perf-rank<N>.csv" in plan
    assert not list(tmp_path.rglob("logs"))  # nothing started


@pytest.mark.slow
@needs_two_cpus
def test_each_rank_runs_on_its_own_cpus(tmp_path: Path) -> None:
    out = tmp_path / "ranks"
    out.mkdir()
    proc = subprocess.Popen(aitrain_argv() + ["launch", *LEAN, "nproc_per_node=2", "binding=core"],
                            cwd=tmp_path, env=dict(os.environ, OUT_DIR=str(out), MODE="hold"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for rank in (0, 1):
            wait_until((out / f"rank{rank}.json").exists, 60, f"rank{rank}.json", 0.05)
        info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        sets = [_cpus_allowed(i["pid"]) for i in info]  # read while the ranks run
    finally:
        (out / "release").touch()
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert sets[0] and sets[1] and not sets[0] & sets[1]
    assert sets[0] | sets[1] <= os.sched_getaffinity(0)
    assert [int(i["omp"]) for i in info] == [len(s) for s in sets]
    assert not any(i["plan_env_left"] for i in info)


@pytest.mark.slow
def test_rank_over_the_memory_limit_is_stopped_and_nothing_survives(tmp_path: Path) -> None:
    _memory_cgroups_or_skip()
    out = tmp_path / "ranks"
    out.mkdir()
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        r = run_aitrain(["launch", *LEAN, "nproc_per_node=2", "resources.cgroup=true",
                         "resources.memory_max=300M"], tmp_path, env={"OUT_DIR": str(out), "MODE": "oom"},
                        timeout=120)
        assert alive(outsider.pid), "a process outside the job was hit"
    finally:
        outsider.kill()
        outsider.wait()
    assert r.returncode != 0
    assert "rank 1 was not stopped" not in r.stdout
    assert "rank 1 (pid" in r.stderr and "killed by the kernel OOM killer: cgroup memory limit 300M reached" \
        in r.stderr, r.stderr
    # Rank 0 started a grandchild in its own session: only the cgroup could catch it.
    grandchild = int((out / "grandchild.pid").read_text())
    assert not all_gone([grandchild]), "a process of the job survived its teardown"
    assert "left in the job's cgroup at teardown" in r.stdout
    info = json.loads((out / "rank0.json").read_text())
    assert not alive(info["pid"])
    groups = [line.split(":", 2) for line in info["cgroups"]]
    job_paths = [(ctrl, path) for _, ctrl, path in groups if "/aitrain/" in path]
    assert job_paths, f"rank 0 was not in the job's cgroup: {info['cgroups']}"
    layout = find_cgroups()
    for d in layout.job_dirs("aitrain/" + job_paths[0][1].rsplit("/aitrain/", 1)[1]).values():
        assert not d.exists(), f"{d} was not removed"


@pytest.mark.slow
def test_unwritable_cgroups_warn_once_and_the_job_runs(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("simulating a read-only cgroup filesystem needs root and mount")
    ro = tmp_path / "cgroupfs"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "aitrain-test", str(ro)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (ro / "cgroup.controllers").write_text("cpuset memory\n")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        out = tmp_path / "ranks"
        out.mkdir()
        (out / "release").touch()
        r = run_aitrain(["launch", *LEAN, "nproc_per_node=1", "resources.cgroup=true",
                         "resources.memory_max=300M"], tmp_path,
                        env={"OUT_DIR": str(out), "MODE": "hold", "AITRAIN_CGROUP_ROOT": str(ro)})
    finally:
        subprocess.run(["umount", str(ro)])
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("aitrain: warning")]
    assert len(warnings) == 1, r.stderr
    assert "cgroups are not writable here" in warnings[0] and "Read-only file system" in warnings[0]
    assert "300M is not enforced" in warnings[0]
    assert (out / "rank0.json").exists()


@pytest.mark.slow
def test_v2_group_holds_the_ranks_and_is_removed(tmp_path: Path) -> None:
    """The v2 code on this host's real cgroup2 mount (controllers or not)."""
    mounts = [line.split(" - ")[0].split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if " - cgroup2 " in line]
    if os.geteuid() != 0 or not mounts:
        pytest.skip("needs root and a cgroup2 mount")
    out = tmp_path / "ranks"
    out.mkdir()
    (out / "release").touch()
    r = run_aitrain(["launch", *LEAN, "nproc_per_node=2", "resources.cgroup=true"], tmp_path,
                    env={"OUT_DIR": str(out), "MODE": "hold", "AITRAIN_CGROUP_ROOT": mounts[0]})
    assert r.returncode == 0, r.stderr
    if "not writable" in r.stderr:
        pytest.skip(f"cgroup2 at {mounts[0]} is not writable here")
    for rank in (0, 1):
        v2 = [line for line in json.loads((out / f"rank{rank}.json").read_text())["cgroups"]
              if line.startswith("0::")]
        assert v2 and v2[0].startswith("0::/aitrain/"), v2
        assert not (Path(mounts[0]) / v2[0][3:].lstrip("/")).exists()


@pytest.mark.slow
def test_perf_counters_reach_mlflow(tmp_path: Path) -> None:
    perf = shutil.which("perf")
    if perf is None or subprocess.run([perf, "stat", "-e", "task-clock", "true"],
                                      capture_output=True).returncode != 0:
        pytest.skip("perf stat does not run here (Debian: apt-get install linux-perf)")
    hw = subprocess.run([perf, "stat", "-x,", "-e", "instructions", "true"], capture_output=True, text=True)
    counts_instructions = hw.returncode == 0 and "<not" not in hw.stderr
    out = tmp_path / "ranks"
    out.mkdir()
    r = run_aitrain(["launch", "fabric=off", f"script={PROBE}", "nproc_per_node=2", "profile=perf"], tmp_path,
                    env={"OUT_DIR": str(out), "MODE": "burn"})
    assert r.returncode == 0, r.stderr
    run_dir = _run_dir(r.stdout)
    report = json.loads((run_dir / "profile/perf.json").read_text())
    assert set(report["ranks"]) == {"0", "1"}
    assert report["ranks"]["0"]["task-clock"] >= 450  # ms: the rank spun for 0.5 s of CPU time
    if counts_instructions:
        assert report["ranks"]["0"]["instructions"] > 0
    else:
        assert "not supported on this machine" in r.stdout and "instructions" in report["unsupported"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("aitrain").experiment_id])[0]
    metrics = run.data.metrics
    assert metrics["perf/rank1/task-clock"] == report["ranks"]["1"]["task-clock"]
    assert "perf/rank0/context-switches" in metrics
    if counts_instructions:
        assert metrics["perf/rank0/instructions"] > 0


@pytest.mark.slow
def test_pyspy_flame_graph_per_rank_and_the_failing_rank_is_reported(tmp_path: Path) -> None:
    from aitrain.launcher.profiling import find_pyspy

    if find_pyspy() is None:
        pytest.skip("py-spy is not installed (pip install py-spy)")
    out = tmp_path / "ranks"
    out.mkdir()
    r = run_aitrain(["launch", *LEAN, "nproc_per_node=2", "profile=pyspy"], tmp_path,
                    env={"OUT_DIR": str(out), "MODE": "burn", "FAIL_RANK": "1"})
    assert r.returncode != 0
    assert "rank 1 (pid" in r.stderr and "exited with code 3" in r.stderr, r.stderr
    run_dir = _run_dir(r.stdout)
    log = run_dir / "profile/pyspy-rank0.log"
    if not (run_dir / "profile/flame-rank0.svg").exists() and log.exists() and \
            any(w in log.read_text() for w in ("ermission denied", "not permitted")):
        pytest.skip(f"py-spy may not attach to processes here (ptrace): {log.read_text()[-300:]}")
    for rank in (0, 1):
        svg = (run_dir / f"profile/flame-rank{rank}.svg").read_text()
        assert svg.startswith("<?xml") and "<svg" in svg and "rank_probe.py" in svg
