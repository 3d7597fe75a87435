"""One Backend protocol: every backend implements every verb, maps its states in one table,
plans a frozen spec without writing anything, and re-runs the job with one relaunch command."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aitrain.launcher.backends import backend_class, backend_for_handle, names
from aitrain.launcher.backends.api import Backend, JobRegistry, JobState, JobStatus, Outcome, Request

from aitrain_testing import run_aitrain


def test_every_backend_implements_the_whole_protocol() -> None:
    assert names() == ["local", "ray", "slurm"]
    for name in names():
        cls = backend_class(name)
        assert issubclass(cls, Backend) and cls.name == name
        assert not getattr(cls, "__abstractmethods__", None), f"{name} misses {cls.__abstractmethods__}"
        backend = cls()  # no cluster, no Ray import needed to construct one
        for verb in ("dryrun", "run", "submit", "status", "logs", "cancel", "list"):
            assert callable(getattr(backend, verb))


def test_handles_pick_their_backend() -> None:
    assert backend_for_handle("local://vm/3f9a2c1b").name == "local"
    assert backend_for_handle("slurm://c/12").name == "slurm" and backend_for_handle("12").name == "slurm"
    assert backend_for_handle("ray://h:8265/raysubmit_x").name == "ray"


def test_state_tables_map_every_native_state() -> None:
    from aitrain.launcher.backends.ray.jobs_api import STATES as RAY_JOBS
    from aitrain.launcher.backends.slurm import STATES as SLURM

    assert SLURM["COMPLETED"] is JobState.SUCCEEDED and SLURM["TIMEOUT"] is JobState.FAILED
    assert SLURM["CANCELLED"] is JobState.CANCELLED and SLURM["REQUEUED"] is JobState.PENDING
    assert SLURM["PREEMPTED"] is JobState.PREEMPTED and SLURM["COMPLETING"] is JobState.RUNNING
    assert RAY_JOBS == {"PENDING": JobState.PENDING, "RUNNING": JobState.RUNNING,
                        "SUCCEEDED": JobState.SUCCEEDED, "FAILED": JobState.FAILED, "STOPPED": JobState.CANCELLED}
    assert {s for s in JobState if s.terminal} == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    assert JobState.PREEMPTED.mlflow_status == "KILLED" and JobState.SUCCEEDED.mlflow_status == "FINISHED"


class _Fake(Backend):
    name = "fake"
    scheme = "fake"

    def __init__(self, state: JobState) -> None:
        self.state, self.cancelled = state, 0

    def dryrun(self, spec):  # type: ignore[no-untyped-def]
        return Request(spec)

    def run(self, request: Request) -> Outcome:
        return Outcome.succeeded()

    def submit(self, request: Request) -> str:
        return "fake://1"

    def status(self, handle: str) -> JobStatus:
        return JobStatus(handle, self.state, self.name, native_state="NATIVE")

    def logs(self, handle: str, *, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        return iter(())

    def _cancel(self, handle: str, status: JobStatus) -> None:
        self.cancelled += 1


def test_cancel_is_idempotent_in_the_base_class() -> None:
    running = _Fake(JobState.RUNNING)
    assert running.cancel("fake://1") == "cancelled fake://1" and running.cancelled == 1
    for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.UNKNOWN):
        done = _Fake(state)
        assert "nothing to cancel" in done.cancel("fake://1") and done.cancelled == 0


def test_job_status_is_one_type_for_every_backend() -> None:
    st = JobStatus("slurm://c/1", JobState.FAILED, "slurm", "NODE_FAIL", "/r", failures=[
        {"rank": 1, "node": "n2", "message": "rank 1 on n2 exited with code 1: ValueError: x",
         "tail": ["Traceback", "ValueError: x"]}])
    d = st.to_dict()
    assert d["state"] == "FAILED" and d["native_state"] == "NODE_FAIL" and json.dumps(d)
    text = str(st)
    assert text.splitlines()[0] == "slurm://c/1: FAILED (slurm: NODE_FAIL)"
    assert "rank 1 on n2 exited with code 1" in text and "ValueError: x" in text


def test_registry_keeps_the_newest_and_reads_the_old_slurm_file(tmp_path: Path) -> None:
    (tmp_path / "slurm-jobs.json").write_text(json.dumps({"slurm://c/1": {"run_dir": "/old", "submitted": 1.0}}))
    reg = JobRegistry(tmp_path)
    reg.remember("local://h/a", backend="local", run_dir="/a", pid=1)
    reg.remember("local://h/b", backend="local", run_dir="/b", pid=2)
    assert [h for h, _ in reg.entries()] == ["local://h/b", "local://h/a", "slurm://c/1"]
    assert reg.get("slurm://c/1")["backend"] == "slurm" and [h for h, _ in reg.entries("slurm")] == ["slurm://c/1"]
    assert oct((tmp_path / "jobs.json").stat().st_mode & 0o777) == "0o600"


# -- planning: one frozen spec, a pure dry run, one relaunch command ---------------------------------


def _plan(overrides: list[str], cwd: Path):  # type: ignore[no-untyped-def]
    from aitrain.launcher.cli.launch import compose_job, composing, plan

    old = os.getcwd()
    os.chdir(cwd)
    try:
        with composing():
            return plan(compose_job(overrides), overrides)
    finally:
        os.chdir(old)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var, sub in (("XDG_STATE_HOME", "state"), ("XDG_CACHE_HOME", "cache"), ("HOME", "home")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    for var in ("SLURM_JOB_ID", "SLURM_JOBID", "RAY_ADDRESS", "RAY_JOB_ID", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.mark.parametrize("overrides", [
    ["nproc_per_node=2"],
    ["backend=slurm", "nnodes=2", "backend.partition=gpu"],
    ["backend=ray", "nnodes=2", "backend.address=ray://127.0.0.1:10001"],
    ["backend=ray", "nnodes=2", "backend.address=http://127.0.0.1:8265"],
])
def test_planning_and_the_dry_run_write_nothing_anywhere(overrides: list[str], isolated: Path) -> None:
    backend, request = _plan(overrides, isolated)
    spec = request.spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.nnodes = 3  # type: ignore[misc]
    assert str(request)  # the whole plan renders
    assert spec.run_dir.is_relative_to(isolated)
    written = [p for p in isolated.parent.rglob("*") if p.is_file()]
    assert written == [], written  # no run dir, no cache, no registry


def test_the_relaunch_command_is_computed_once_and_used_as_it_is(isolated: Path) -> None:
    _, sbatch = _plan(["backend=slurm", "nnodes=2", "tracking.run_name='a b'", "dry_run=true"], isolated)
    relaunch = list(sbatch.spec.relaunch)
    assert relaunch[1:4] == ["-m", "aitrain.launcher.cli", "launch"]
    assert "tracking.run_name='a b'" in relaunch and "dry_run=true" not in relaunch
    assert relaunch[-2:] == [f"hydra.run.dir={sbatch.spec.run_dir}", "resume=auto"]
    assert f"exec {shlex.join(relaunch)}" in sbatch.script.splitlines()

    _, jobs = _plan(["backend=ray", "backend.address=http://127.0.0.1:8265", "nnodes=2"], isolated)
    assert jobs.entrypoint == shlex.join(jobs.spec.relaunch) and "backend.address=auto" in jobs.spec.relaunch
    assert jobs.remote and sbatch.remote

    _, local = _plan(["nproc_per_node=1"], isolated)
    assert not local.remote and local.spec.relaunch[-1] == f"hydra.run.dir={local.spec.run_dir}"


def test_a_dry_run_of_each_backend_from_the_command_line_writes_nothing(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    work = tmp_path / "work"
    work.mkdir()
    for args in (["dry_run=true"], ["backend=slurm", "nnodes=2", "dry_run=true"],
                 ["-m", "train.lr=1e-3,3e-3", "dry_run=true", "tracking=none"]):
        r = run_aitrain(["launch", *args], work, env=env)
        assert r.returncode == 0, r.stderr
        assert "# plan (dry run: nothing was started or written)" in r.stdout
    assert r.stdout.count("# plan") == 2  # one per job of the sweep
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_json_dry_run_is_one_object(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "backend=slurm", "nnodes=2", "dry_run=true", "--json"], tmp_path,
                    env={"XDG_STATE_HOME": str(tmp_path / "state")})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["dry_run"] is True and doc["backend"] == "slurm" and "#SBATCH --nodes=2" in doc["plan"]
    assert doc["relaunch"][-1] == "resume=auto"


def test_import_of_the_cli_stays_light() -> None:
    code = ("import sys, aitrain.launcher.cli, aitrain.launcher.backends.api, aitrain.launcher.backends\n"
            "heavy = [m for m in ('ray', 'torch', 'mlflow', 'hydra') if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_which_foreground_launches_get_a_local_handle(isolated: Path) -> None:
    from aitrain.launcher.backends.local import register_foreground

    _, request = _plan(["nproc_per_node=1"], isolated)
    spec = request.spec
    assert register_foreground(spec, "local", {}).startswith("local://")  # type: ignore[union-attr]
    # backend=local in an salloc shell is still a local job; a Slurm job in its allocation and
    # a Ray Jobs API job are named by their scheduler's handle.
    assert register_foreground(spec, "local", {"SLURM_JOB_ID": "7"}) is not None
    assert register_foreground(spec, "slurm", {"SLURM_JOB_ID": "7"}) is None
    assert register_foreground(spec, "ray", {"RAY_JOB_ID": "02000000"}) is None
    assert register_foreground(spec, "local", {"AITRAIN_JOB_HANDLE": "local://h/x"}) == "local://h/x"
    assert len(JobRegistry().entries()) == 2
