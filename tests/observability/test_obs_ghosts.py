"""A launcher killed outright (SIGKILL) leaves no RUNNING ghost: the next aitrain command that
touches the store or the job registry sends the spooled metrics and marks the run KILLED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from aitrain_testing import aitrain_argv, all_gone, run_aitrain, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
TINY = ["model.n_layer=1", "model.d_model=32", "model.seq_len=16", "train.global_batch_size=8", "train.log_every=50"]


def _killed_launch(tmp_path: Path, env: dict[str, str]) -> tuple[Path, str]:
    """A running launch, SIGKILLed after its MLflow run exists and some steps are spooled."""
    proc = subprocess.Popen(aitrain_argv() + ["launch", "nproc_per_node=2", "train.steps=100000", "fabric=off",
                                              f"run_root={tmp_path / 'runs'}", *TINY],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run_id_file = wait_until(lambda: next((tmp_path / "runs").glob("*/*/mlflow_run_id"), None), 90,
                                 "the MLflow run")
        run_dir = run_id_file.parent
        wait_until(lambda: (run_dir / "metrics.jsonl").exists() and
                   len((run_dir / "metrics.jsonl").read_text().splitlines()) > 20, 60, "spooled steps")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    ranks = [int(d) for d in os.listdir("/proc") if d.isdigit() and str(run_dir) in _environ(int(d))]
    assert not all_gone(ranks, within=20), "ranks outlived the killed launcher"
    return run_dir, run_id_file.read_text().strip()


def _environ(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _run(tmp_path: Path, run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    return client.get_run(run_id), client


@pytest.mark.parametrize("command", [["runs", "--last", "3"], ["list"]])
def test_killed_launcher_leaves_no_running_ghost(tmp_path: Path, command: list[str]) -> None:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    env.pop("MLFLOW_TRACKING_URI", None)
    run_dir, run_id = _killed_launch(tmp_path, env)
    run, _ = _run(tmp_path, run_id)
    assert run.info.status == "RUNNING"  # what the killed launcher left

    if command[0] == "runs":
        command = [*command, "--run-root", str(tmp_path / "runs")]
    r = run_aitrain(command, tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"MLflow run {run_id}" in r.stderr and "marked KILLED" in r.stderr, r.stderr
    run, client = _run(tmp_path, run_id)
    assert run.info.status == "KILLED"
    spooled = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = client.get_metric_history(run_id, "loss")
    assert len(losses) == len([s for s in spooled if "loss" in s])  # everything spooled was delivered
    again = run_aitrain(command, tmp_path, env=env, timeout=120)
    assert "marked KILLED" not in again.stderr  # once
