"""The Ray backend without a cluster: config, addresses, handles, token auth, dry runs, and the
rank actor's process handling (a plain class: run here with real child processes)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from aitrain.errors import BackendError, ConfigError  # noqa: E402
from aitrain.launcher.backends.api import JobState, Outcome  # noqa: E402
from aitrain.launcher.backends.ray import (  # noqa: E402
    RayBackend,
    connection_error,
    ensure_token_auth,
    parse_address,
    parse_handle,
)
from aitrain.launcher.backends.ray.group import RankConsole, node_bundles, rank_slots  # noqa: E402
from aitrain.launcher.backends.ray.jobs_api import OUTCOME_LINE, outcome_from_logs  # noqa: E402
from aitrain.launcher.backends.ray.worker import RankActor, warm_compatible  # noqa: E402
from aitrain.launcher.config import BACKEND_SCHEMAS, JobConfig, RayBackendConfig, check_key  # noqa: E402
from aitrain.launcher.failures import RankExit, describe, root_cause_first  # noqa: E402
from aitrain.launcher.job import relaunch_argv  # noqa: E402
from aitrain.launcher.submit import hydra_value  # noqa: E402

from aitrain_testing import alive  # noqa: E402
from raycluster import aitrain, base_env  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def test_schema_is_registered_and_typos_fail() -> None:
    assert BACKEND_SCHEMAS["ray"] is RayBackendConfig
    for key in ("backend.address", "backend.placement", "backend.max_failures", "backend.gpus_per_worker",
                "backend.resources_per_worker.accel", "backend.runtime_env.env_vars"):
        check_key(key, "ray")
    with pytest.raises(ConfigError, match="backend.placement"):
        check_key("backend.placment", "ray")
    with pytest.raises(ConfigError):
        check_key("backend.partition", "ray")  # a Slurm key


@pytest.mark.parametrize("value,kind", [
    (None, "local"), ("", "local"), ("auto", "gcs"), ("10.0.0.1:6379", "gcs"), ("head.example:6379", "gcs"),
    ("ray://head:10001", "client"), ("http://head:8265", "jobs"), ("https://head:8265/", "jobs"),
])
def test_addresses(value: str | None, kind: str) -> None:
    assert parse_address(value, {}).kind == kind


def test_address_from_env_and_bad_address() -> None:
    assert parse_address(None, {"RAY_ADDRESS": "ray://h:10001"}) == parse_address("ray://h:10001", {})
    assert parse_address("http://h:8265/", {}).dashboard == "h:8265"
    with pytest.raises(ConfigError, match="not a Ray address"):
        parse_address("head", {})


def test_token_auth_is_turned_on_only_with_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    env: dict[str, str] = {}
    assert ensure_token_auth(env) is None and "RAY_AUTH_MODE" not in env
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 32)
    assert ensure_token_auth(env) == str(tmp_path / ".ray" / "auth_token")
    assert env["RAY_AUTH_MODE"] == "token"
    env = {"RAY_AUTH_TOKEN": "abc", "RAY_AUTH_MODE": "disabled"}
    assert ensure_token_auth(env) == "RAY_AUTH_TOKEN" and env["RAY_AUTH_MODE"] == "disabled"  # explicit wins


def test_connection_errors_explain_token_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    err = connection_error(parse_address("ray://h:10001", {}), ConnectionError("ray client connection timeout"))
    text = str(err)
    assert "ray://h:10001" in text and "RAY_AUTH_MODE" in text and "auth_token" in text


SERVER_TRACEBACK = ("Initialization failure from server:\nTraceback (most recent call last):\n"
                    "  File \"proxier.py\", line 777, in Datapath\n"
                    "RuntimeError: Proxy failed to Connect to backend! Check `ray_client_server.err`\n")


def test_a_server_side_client_failure_names_its_reason_and_is_tried_once_more(
        capsys: pytest.CaptureFixture[str]) -> None:
    err = connection_error(parse_address("ray://h:10001", {}), ConnectionAbortedError(SERVER_TRACEBACK))
    assert "Proxy failed to Connect to backend" in err.message
    assert err.hint is not None and "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S" in err.hint

    class FlakyRay:
        calls = 0

        def is_initialized(self) -> bool:
            return False

        def init(self, **kw: object) -> None:
            FlakyRay.calls += 1
            if FlakyRay.calls == 1:
                raise ConnectionAbortedError(SERVER_TRACEBACK)

        def shutdown(self) -> None:
            pass

    backend = RayBackend(ray_module=FlakyRay(), address="ray://h:10001")
    with backend.connect(None) as ray:  # type: ignore[arg-type]
        assert isinstance(ray, FlakyRay)
    assert FlakyRay.calls == 2 and "trying once more" in capsys.readouterr().out

    class BrokenRay(FlakyRay):
        def init(self, **kw: object) -> None:
            raise ConnectionAbortedError(SERVER_TRACEBACK)

    with pytest.raises(BackendError, match="Proxy failed"):
        with RayBackend(ray_module=BrokenRay(), address="ray://h:10001").connect(None):  # type: ignore[arg-type]
            pass


def test_handles() -> None:
    assert parse_handle("ray://127.0.0.1:8265/raysubmit_aB1") == ("127.0.0.1:8265", "raysubmit_aB1")
    assert parse_handle("raysubmit_x", {"RAY_API_SERVER_ADDRESS": "http://h:9000"}) == ("h:9000", "raysubmit_x")
    assert parse_handle("raysubmit_x", {}) == ("127.0.0.1:8265", "raysubmit_x")
    with pytest.raises(ConfigError):
        parse_handle("slurm://c/12")
    from aitrain.launcher.backends import backend_for_handle

    assert isinstance(backend_for_handle("ray://h:8265/raysubmit_x"), RayBackend)
    with pytest.raises(ConfigError, match="ray://"):
        backend_for_handle("nope://x")


def entrypoint_argv(overrides: list[str], *, python: str, run_dir: str, run_root: str) -> list[str]:
    """The Jobs API entrypoint as plan_job computes it for backend=ray with an http:// address."""
    job = JobConfig()
    job.backend = RayBackendConfig(address="http://h:8265")
    job.run_root = run_root
    replace, default = RayBackend(environ={}).relaunch_settings(job)
    return relaunch_argv(overrides, python=python, run_dir=Path(run_dir), replace=replace, default=default)


def test_entrypoint_reruns_the_same_job_on_the_cluster() -> None:
    argv = entrypoint_argv(["backend=ray", "backend.address=http://h:8265", "nnodes=2", "dry_run=true",
                            "tracking.run_name='a b'"], python="/py", run_dir="/r/d", run_root="/r")
    assert argv[:4] == ["/py", "-m", "aitrain.launcher.cli", "launch"]
    assert "backend.address=auto" in argv and "hydra.run.dir=/r/d" in argv and "run_root=/r" in argv
    assert "dry_run=true" not in argv and "backend.address=http://h:8265" not in argv
    assert "tracking.run_name='a b'" in argv
    with pytest.raises(ConfigError):
        entrypoint_argv(["a=\nb"], python="/py", run_dir="/r/d", run_root="/r")


def test_placement_and_resources() -> None:
    o = RayBackendConfig(cpus_per_worker=0.5, gpus_per_worker=1, resources_per_worker={"accel": 1})
    assert node_bundles(o, 2, 4) == [{"CPU": 2.0, "GPU": 4.0, "accel": 4.0}] * 2
    with pytest.raises(BackendError, match="asks for nothing"):
        node_bundles(RayBackendConfig(cpus_per_worker=0), 1, 1)
    with pytest.raises(ConfigError, match="placement"):
        RayBackend(placement="scatter")
    with pytest.raises(ConfigError, match="unknown Ray backend options"):
        RayBackend(partition="x")
    assert [(s.rank, s.node, s.local_rank) for s in rank_slots(2, 2)] == [
        (0, "node0", 0), (1, "node0", 1), (2, "node1", 0), (3, "node1", 1)]


def test_console_prefix_carries_rank_and_node() -> None:
    out = io.StringIO()
    c = RankConsole({0: "node0", 3: "node1"}, out=out, err=out, dedup=False)
    c.line(3, "hello")
    c.line(0, "oops", True)
    assert out.getvalue() == "[rank3 node1]:hello\n[rank0 node0]:oops\n"


def failed_outcome_line(*exits: RankExit) -> str:
    """The driver's last line inside a Ray job (what run_job prints there)."""
    outcome = Outcome(JobState.FAILED, 1, describe(exits), "", tuple(root_cause_first(exits)))
    return OUTCOME_LINE + json.dumps(outcome.to_dict())


def test_failures_are_read_back_from_the_driver_output() -> None:
    text = ("[rank0 node0]:x\naitrain: error: the job failed: rank 1 on node1 exited with code 1\n"
            + failed_outcome_line(RankExit(0, node="node0", signal="SIGTERM", ended_at=2.0),
                                  RankExit(1, node="node1", exit_code=1, ended_at=1.0)) + "\n")
    outcome = outcome_from_logs(text)
    assert outcome is not None
    assert [(x.rank, x.node) for x in outcome.failures] == [(1, "node1"), (0, "node0")]


def test_hydra_values() -> None:
    assert hydra_value({"env_vars": {"A": "x'y"}, "pip": ["a==1"], "n": 2, "ok": True}) == \
        "{env_vars:{A:'x\\'y'},pip:['a==1'],n:2,ok:true}"
    with pytest.raises(ConfigError):
        hydra_value({"a b": 1})


def test_import_aitrain_stays_light_and_submit_checks_overrides(tmp_path: Path) -> None:
    code = ("import sys, aitrain\n"
            "heavy = [m for m in ('ray', 'torch', 'hydra', 'mlflow') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert callable(aitrain.submit) and aitrain.Job\n"
            "for bad in (['train.lrr=1'], ['backend=nope']):\n"
            "    try:\n"
            "        aitrain.submit(bad)\n"
            "    except aitrain.ConfigError as e:\n"
            "        print('rejected', bad)\n"
            "print('ray' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["rejected", "['train.lrr=1']", "rejected", "['backend=nope']", "False"]


def test_dry_run_prints_the_plan_without_ray(tmp_path: Path) -> None:
    code = ("import sys\nfrom aitrain.launcher.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('RAY IMPORTED' if 'ray' in sys.modules else 'no ray')\n")
    r = subprocess.run([sys.executable, "-c", code, "launch", "backend=ray", "nnodes=2", "nproc_per_node=2",
                        "dry_run=true", "backend.placement=pack", "backend.cpus_per_worker=0.5",
                        "+backend.resources_per_worker.accel=1", "tracking=none"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=base_env(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "PACK" in out and "{'CPU': 1.0, 'accel': 2.0}" in out
    assert "rank 3: node1 local_rank 1" in out and "[rank3 node1]:" in out
    assert "no ray" in out


def test_jobs_api_dry_run_shows_the_entrypoint(tmp_path: Path) -> None:
    r = aitrain(["launch", "backend=ray", "backend.address=http://127.0.0.1:9", "dry_run=true", "nnodes=2",
                 "tracking=none"], tmp_path, base_env(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "submit to the Jobs API at http://127.0.0.1:9" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("entrypoint:"))
    assert "backend.address=auto" in line and "hydra.run.dir=" in line and "dry_run=" not in line


# -- the rank actor, in this process (no Ray needed for its process handling) ----------------


def _drain(actor: RankActor, timeout: float = 60) -> tuple[list[tuple[bool, str]], int]:
    lines: list[tuple[bool, str]] = []
    cursor = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = actor.poll(cursor, 0.5)
        lines += r["lines"]
        cursor = r["cursor"]
        if r["exit"] is not None:
            return lines, r["exit"]
    raise AssertionError(f"rank did not exit: {lines}")


def test_rank_actor_runs_the_program_and_keeps_its_log(tmp_path: Path) -> None:
    script = tmp_path / "prog.py"
    script.write_text("import os, sys\nprint('out', os.environ['RANK'], __name__, sys.argv[1:])\n"
                      "print('err line', file=sys.stderr)\nsys.exit(3)\n")
    actor = RankActor(1, 0, "node0", 1, {"JOB": "1"}, prespawn=True)  # the warm interpreter path
    log = tmp_path / "logs" / "node0" / "rank1.log"
    cfg = tmp_path / "run" / "job.yaml"
    pid = actor.start([sys.executable, "-u", str(script), "a", "b"], {"RANK": "1"}, str(log), str(tmp_path),
                      {str(cfg): "x: 1\n"})
    assert pid > 0
    lines, code = _drain(actor)
    assert code == 3
    assert (False, "out 1 __main__ ['a', 'b']") in lines and (True, "err line") in lines
    assert "out 1 __main__" in log.read_text() and cfg.read_text() == "x: 1\n"
    assert actor.tail()[-1] in ("err line", "out 1 __main__ ['a', 'b']")


def test_rank_actor_stop_kills_the_rank_and_what_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\nprint('ready', flush=True)\ntime.sleep(600)\n")
    actor = RankActor(0, 0, "node0", 0, prespawn=False)
    pid = actor.start([sys.executable, "-c", code], {}, str(tmp_path / "r0.log"))
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pidfile.read_text())
    t0 = time.monotonic()
    actor.stop(grace_s=2)
    assert time.monotonic() - t0 < 6
    time.sleep(0.3)
    assert not alive(pid) and not alive(child)
    _, code_ = _drain(actor, 10)
    assert code_ < 0  # killed by a signal


def test_warm_interpreter_only_for_plain_python_programs() -> None:
    py = sys.executable
    assert warm_compatible([py, "-u", "-m", "aitrain.launcher.train", "--config", "x"], {}, {"NCCL_X": "1"})
    assert warm_compatible([py, "-u", "s.py"], {}, {"OMP_NUM_THREADS": "2", "GLOO_SOCKET_IFNAME": "fab0"})
    assert not warm_compatible([py, "-c", "pass"], {}, {})
    assert not warm_compatible(["/bin/sh", "x"], {}, {})
    assert not warm_compatible([py, "s.py"], {}, {"LD_PRELOAD": "x.so"})
    assert not warm_compatible([py, "s.py"], {"PYTHONPATH": "a"}, {"PYTHONPATH": "b"})
    assert warm_compatible([py, "-u", "s.py"], {}, {"PYTHONUNBUFFERED": "1"})  # warm programs run unbuffered


# -- the Jobs API side with a stand-in client (the backend takes it as an argument) ------------


class FakeJobs:
    def __init__(self, state: str, logs: str, metadata: dict | None = None) -> None:
        self.state, self.text, self.metadata, self.stopped = state, logs, metadata or {}, []

    def get_job_info(self, sid: str):
        from types import SimpleNamespace

        if sid != "raysubmit_x":
            raise RuntimeError("Job raysubmit_y does not exist")
        return SimpleNamespace(status=self.state, message="", metadata=self.metadata, entrypoint="e",
                               start_time=1000, end_time=None)

    def get_job_logs(self, sid: str) -> str:
        return self.text

    def stop_job(self, sid: str) -> None:
        self.stopped.append(sid)
        self.state = "STOPPED"


def test_status_logs_cancel_through_the_jobs_api() -> None:
    logs = ("aitrain: 2 rank(s), strategy ddp, backend ray; run dir /r/d\n[rank0 node0]:step 1/9\n"
            "[rank1 node1]:x\naitrain: error: the job failed: rank 1 on node1 exited with code 2\n"
            + failed_outcome_line(RankExit(1, node="node1", exit_code=2)) + "\n")
    fake = FakeJobs("FAILED", logs)
    b = RayBackend(jobs_client=lambda dashboard: fake)
    st = b.status("ray://h:8265/raysubmit_x")
    assert st.state == "FAILED" and st.run_dir == "/r/d" and st.failures[0]["node"] == "node1"
    assert b.status("ray://h:8265/raysubmit_y").state == "UNKNOWN"
    assert list(b.logs("ray://h:8265/raysubmit_x", rank=0)) == ["[rank0 node0]:step 1/9"]
    assert "nothing to cancel" in b.cancel("ray://h:8265/raysubmit_x") and not fake.stopped
    running = FakeJobs("RUNNING", "", {"aitrain.run_dir": "/r/e"})
    b = RayBackend(jobs_client=lambda dashboard: running)
    assert b.status("raysubmit_x").run_dir == "/r/e"
    assert b.cancel("ray://h:8265/raysubmit_x").startswith("cancelled") and running.stopped == ["raysubmit_x"]
