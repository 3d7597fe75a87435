"""The local backend with real processes: 2 ranks on gloo through `aitrain launch`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from aitrain_testing import REPO, aitrain_argv, all_gone, run_aitrain

FAIL_SCRIPT = REPO / "tests" / "scripts" / "fail_rank.py"
pytestmark = pytest.mark.timeout(300)




def _wait_pids(pid_dir: Path, n: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = list(pid_dir.glob("rank*.pid"))
        if len(files) == n and all(f.read_text().strip() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.1)
    raise AssertionError(f"ranks did not start: {list(pid_dir.iterdir())}")


def _assert_all_gone(pids: list[int], within: float = 10) -> None:
    assert not all_gone(pids, within), "rank processes left behind"


def _mlflow_runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aitrain")
    assert exp is not None
    return client.search_runs([exp.experiment_id]), client


def test_default_job_trains_and_logs_to_mlflow(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "+strategy=ddp", "nproc_per_node=2", "train.steps=40"], tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "[rank0]:step 1/40" in r.stdout and "[rank0]:step 40/40" in r.stdout
    # Every rank's output line carries its rank.
    assert all(line.startswith(("[rank", "aitrain")) for line in r.stdout.splitlines() if line.strip())

    runs, client = _mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["strategy"] == "ddp" and run.data.tags["world_size"] == "2"
    assert run.data.tags["backend"] == "local" and run.data.tags["host"]
    assert run.data.params["train.steps"] == "40"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 40
    assert losses[-1] < losses[0] - 1.0, f"loss did not fall: {losses[0]} -> {losses[-1]}"
    assert client.get_metric_history(run.info.run_id, "tokens_per_s")
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "job.yaml" in artifacts and "logs" in artifacts


def test_tracking_none_logs_nothing(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "tracking=none", "train.steps=3", "nproc_per_node=1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


def test_dry_run_prints_plan_and_starts_nothing(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "strategy=ddp", "dry_run=true", "nproc_per_node=4"], tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "# resolved config" in out and "nproc_per_node: 4" in out
    for rank in range(4):
        assert f"rank {rank}:" in out and f"RANK={rank}" in out
    assert "WORLD_SIZE=4" in out and "MASTER_PORT=" in out and "-m aitrain.launcher.train" in out
    assert not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("mlflow.db"))


def test_preflight_checks_fabric_and_host_before_ranks_start(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "dry_run=true"], tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("preflight:"))  # the plan shows what was found
    assert "rdma-none" in line and "host-" in line
    assert not list(tmp_path.iterdir())  # ... and the dry run wrote nothing
    r = run_aitrain(["launch", "train.steps=1", "nproc_per_node=1", "tracking=none"], tmp_path)
    assert r.returncode == 0, r.stderr
    pre = json.loads(next(tmp_path.rglob("preflight.json")).read_text())
    ids = {f["id"] for f in pre["findings"]}
    assert "rdma-none" in ids  # no RDMA here: a fact (info), not an error
    assert any(i.startswith("host-") for i in ids)
    assert pre["hosts"][0]["hostname"]


def test_bad_fabric_on_error_is_a_config_error(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "fabric.on_error=maybe"], tmp_path)
    assert r.returncode == 2 and "fabric.on_error" in r.stderr


def test_bad_override_names_the_key_before_anything_starts(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "train.lrr=0.1"], tmp_path)
    assert r.returncode == 2
    assert "train.lrr" in r.stderr and "train.lr" in r.stderr
    assert not (tmp_path / "outputs").exists()


def _agents_in(cwd: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if b"aitrain.launcher.agent" in (proc / "cmdline").read_bytes() and \
                    Path(os.readlink(proc / "cwd")) == cwd:
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def test_config_error_leaves_no_agent_behind(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = run_aitrain(["launch", "train.stepz=3"], tmp_path)
    assert r.returncode == 2
    assert time.monotonic() - t0 < 5
    assert _agents_in(tmp_path) == []


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "train.steps=many"], tmp_path)
    assert r.returncode != 0
    assert "train.steps" in r.stderr


def test_unknown_strategy_lists_known_ones(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "strategy=nope"], tmp_path)
    assert r.returncode != 0
    assert "nope" in r.stderr and "ddp" in r.stderr


def test_help_lists_groups_and_options(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "--help"], tmp_path)
    assert r.returncode == 0
    for word in ("strategy", "backend", "tracking", "fabric", "model", "nproc_per_node", "nnodes"):
        assert word in r.stdout


def test_cfg_job_prints_composed_config(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "+strategy=ddp", "train.lr=0.01", "--cfg", "job"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "lr: 0.01" in r.stdout and "name: ddp" in r.stdout


def test_rank_failure_stops_every_rank(tmp_path: Path) -> None:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    r = run_aitrain(["launch", f"script={FAIL_SCRIPT}", "tracking=none", "nproc_per_node=2"], tmp_path,
                    env={"PID_DIR": str(pid_dir), "MODE": "raise", "FAIL_RANK": "1"}, timeout=120)
    assert r.returncode != 0
    assert "deliberate failure on rank 1" in r.stderr
    assert "rank 1" in r.stderr
    pids = [int(p.read_text()) for p in pid_dir.glob("rank*.pid")]
    assert len(pids) == 2
    _assert_all_gone(pids)


HALF_WRITTEN_ERROR_FILE = """\
import os, sys, time

if os.environ["RANK"] == "1":
    with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
        f.write('{"message": {"message": "OSError: [Errno 28')  # cut off by a full disk
    print("OSError: [Errno 28] No space left on device: '/ckpt/step5'", file=sys.stderr, flush=True)
    sys.exit(1)
time.sleep(600)
"""


def test_a_half_written_rank_error_file_reports_the_ranks_own_failure(tmp_path: Path) -> None:
    # @record writes TORCHELASTIC_ERROR_FILE on the disk that just filled up: what torch's
    # agent finds there does not parse. The launch still reports the rank and its stderr.
    (tmp_path / "script.py").write_text(HALF_WRITTEN_ERROR_FILE)
    r = run_aitrain(["launch", "tracking=none", "fabric=off", "nproc_per_node=2", "--", "script.py"], tmp_path,
                    timeout=120)
    assert r.returncode == 1, r.stderr
    assert "aitrain: error: the job failed: rank 1" in r.stderr
    message = r.stderr[r.stderr.index("aitrain: error: the job failed: rank 1"):]
    assert "No space left on device: '/ckpt/step5'" in message.splitlines()[0]
    assert "JSONDecodeError" not in r.stdout + r.stderr and "elastic agent failed" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_tears_the_job_down(tmp_path: Path, sig: signal.Signals) -> None:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = dict(os.environ, PID_DIR=str(pid_dir), MODE="sleep")
    proc = subprocess.Popen(aitrain_argv() + ["launch", f"script={FAIL_SCRIPT}", "tracking=none"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = _wait_pids(pid_dir, 2)
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert sig.name in err
    _assert_all_gone(pids)


def test_killed_launcher_takes_its_ranks_with_it(tmp_path: Path) -> None:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = dict(os.environ, PID_DIR=str(pid_dir), MODE="sleep")
    proc = subprocess.Popen(aitrain_argv() + ["launch", f"script={FAIL_SCRIPT}", "tracking=none"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pids = _wait_pids(pid_dir, 2)
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_all_gone(pids)


def test_user_script_with_args(tmp_path: Path) -> None:
    r = run_aitrain(["launch", f"script={REPO / 'examples' / 'my_train.py'}", "script_args=[--epochs,1]",
                     "nproc_per_node=2", "tracking=none"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[rank0]:epoch 1/1" in r.stdout and "epoch 2/" not in r.stdout


def test_missing_script_is_a_clear_error(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "script=nowhere.py"], tmp_path)
    assert r.returncode != 0 and "nowhere.py" in r.stderr


def test_multirun_makes_one_mlflow_run_per_job(tmp_path: Path) -> None:
    """One parent run per sweep, one child run per job named after its swept values; two
    sweeps with the same values never share a run name."""
    for _ in range(2):
        r = run_aitrain(["launch", "-m", "train.lr=1e-3,3e-3", "train.steps=5", "nproc_per_node=1"], tmp_path)
        assert r.returncode == 0, r.stderr + r.stdout
    runs, _ = _mlflow_runs(tmp_path)
    parents = [run for run in runs if run.data.tags.get("aitrain.sweep") == "parent"]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(parents) == 2 and len(children) == 4 and len(runs) == 6
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {p.info.run_id for p in parents}
    assert sorted(run.data.params["train.lr"] for run in children) == ["0.001", "0.001", "0.003", "0.003"]
    assert all(run.info.status == "FINISHED" for run in runs)
    names = [c.info.run_name for c in children]
    assert len(set(names)) == 4 and all(n.split(" [")[0] in ("train.lr=0.001", "train.lr=0.003") for n in names)
    for p in parents:
        assert p.data.tags["aitrain.sweep.overrides"].startswith("train.lr=1e-3,3e-3")
        assert p.data.tags["aitrain.sweep.sweeper"].endswith("BasicSweeper")
        assert p.data.tags["aitrain.sweep.launcher"].endswith("BasicLauncher")
        assert p.data.tags["aitrain.sweep.trials"] == "2" and "best/loss" in p.data.metrics
    # `aitrain runs` shows each sweep's run with its jobs under it.
    listed = run_aitrain(["runs", "--last", "6"], tmp_path, timeout=60).stdout.splitlines()
    rows = [line.split()[:5] for line in listed[1:]]
    assert [r[4] if not r[0].startswith("└") else "job" for r in rows] == ["sweep", "job", "job"] * 2, listed
    # ...and `aitrain runs compare` tells two jobs of a sweep apart.
    a, b = sorted((c for c in children if c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id),
                  key=lambda c: c.data.params["train.lr"])
    compared = run_aitrain(["runs", "compare", a.info.run_id, b.info.run_id], tmp_path, timeout=120)
    assert compared.returncode == 0, compared.stderr
    lr_line = next(line for line in compared.stdout.splitlines() if line.split()[:1] == ["train.lr"])
    assert "0.001" in lr_line and "0.003" in lr_line, compared.stdout
    metrics = list(tmp_path.glob("outputs/multirun/*/*/*/metrics.jsonl"))
    assert len(metrics) == 4
    assert json.loads(metrics[0].read_text().splitlines()[-1])["step"] == 5


def test_built_in_job_ranks_die_with_a_killed_launcher(tmp_path: Path) -> None:
    """The built-in job skips the trampoline; it arms PDEATHSIG itself."""
    proc = subprocess.Popen(aitrain_argv() + ["launch", "tracking=none", "train.steps=100000", "train.log_every=1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "step 2/" in line:
                break
        ranks = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                 and b"aitrain.launcher.train" in _cmdline(p) and _cwd(p) == tmp_path]
        assert len(ranks) == 2
        agent = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                 and b"aitrain.launcher.agent" in _cmdline(p) and _cwd(p) == tmp_path]
        os.kill(agent[0], signal.SIGKILL)  # the node agent dies without any teardown
    finally:
        proc.kill()
        proc.wait(10)
    _assert_all_gone(ranks)


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def _cwd(p: Path) -> Path | None:
    try:
        return Path(os.readlink(p / "cwd"))
    except OSError:
        return None
