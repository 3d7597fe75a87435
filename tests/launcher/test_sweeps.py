"""Sweeps with Hydra's own plugins: the optuna sweeper optimising the value each job returns
(``sweep.objective``), recorded on the sweep's parent MLflow run, and the joblib launcher
running jobs in parallel, each in its own process and run dir."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest

from aitrain.errors import ConfigError
from aitrain.launcher.sweep import child_run_name, objective, reduce, swept_keys

from aitrain_testing import run_aitrain

TINY = ["model.n_layer=1", "model.d_model=32", "model.seq_len=16", "train.global_batch_size=8", "nproc_per_node=1",
        "fabric=off"]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aitrain")
    return list(client.search_runs([exp.experiment_id])) if exp else []


def test_objective_modes_and_sources(tmp_path: Path) -> None:
    values = [5.0, 3.0, 4.0, 2.0]
    assert (reduce(values, "last"), reduce(values, "min"), reduce(values, "max")) == (2.0, 2.0, 5.0)
    assert reduce(values, "mean_last_2") == 3.0 and reduce(values, "mean_last_9") == 3.5
    for bad in ("mean", "mean_last_0", "median", "last2"):
        with pytest.raises(ConfigError, match="sweep.objective_mode"):
            reduce(values, bad)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": v, "acc": i / 10}) + "\n"
                                                    for i, v in enumerate(values, 1)))
    assert objective(tmp_path, "acc", "max", None) == 0.4
    with pytest.raises(ConfigError, match="logged no 'bleu'"):
        objective(tmp_path, "bleu", "last", None)
    # a flag is no value, nor is a line that is not a record; a cut-off last line is not read yet
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "acc": true}\n7\n{"step": 6, "acc": 0.9')
    assert objective(tmp_path, "acc", "last", None) == 0.4


def test_child_names_are_the_swept_values_and_the_sweep() -> None:
    overrides = ["train.lr=0.001", "+strategy=fsdp", "train.steps=30", "fabric=off"]
    keys = swept_keys(["train.lr=interval(1e-4,1e-2)", "+strategy=ddp,fsdp", "train.steps=30"], {})
    assert keys == ["train.lr", "strategy"]
    sweep = {"dir": "/x/multirun/2026-12-05/16-29-32-265139", "swept": keys}
    assert child_run_name(overrides, sweep) == "train.lr=0.001 +strategy=fsdp [16-29-32-265139]"
    assert child_run_name(overrides, {"dir": "/x/1"}) == "train.lr=0.001 +strategy=fsdp train.steps=30 fabric=off [1]"


def test_a_bad_objective_mode_is_refused_before_anything_starts(tmp_path: Path) -> None:
    r = run_aitrain(["launch", *TINY, "sweep.objective_mode=median"], tmp_path, timeout=60)
    assert r.returncode == 2 and "sweep.objective_mode='median' is not one of" in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not _installed("hydra_plugins.hydra_optuna_sweeper"), reason="hydra-optuna-sweeper not installed")
def test_optuna_sweeper_optimises_the_objective_and_the_parent_run_records_the_best(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=6",
                     "hydra.sweeper.sampler.seed=1", "train.lr=interval(1e-4,1e-2)", "train.steps=30",
                     "train.log_every=5", *TINY], tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = _runs(tmp_path)
    parent = next(x for x in runs if x.data.tags.get("aitrain.sweep") == "parent")
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED" and parent.data.tags["aitrain.sweep.sweeper"].endswith("OptunaSweeper")
    # Each job returned its last loss; the parent's best is the lowest, and it is optuna's best too.
    last = {c.info.run_id: c.data.metrics["loss"] for c in children}
    best_id = min(last, key=lambda k: last[k])
    assert parent.data.tags["aitrain.sweep.best_run_id"] == best_id
    assert math.isclose(parent.data.metrics["best/loss"], last[best_id], rel_tol=1e-6)
    results = next(tmp_path.glob("outputs/multirun/*/*/optimization_results.yaml")).read_text()
    assert f"best_value: {last[best_id]}"[:20] in results
    best_lr = next(c for c in children if c.info.run_id == best_id).data.params["train.lr"]
    assert parent.data.tags["aitrain.sweep.best_overrides"].startswith(f"train.lr={best_lr}")


@pytest.mark.slow
@pytest.mark.skipif(not _installed("hydra_plugins.hydra_joblib_launcher"), reason="hydra-joblib-launcher not installed")
def test_joblib_launcher_runs_jobs_in_parallel_each_in_its_own_process_and_run_dir(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "train.lr=1e-3,3e-3",
                     "train.steps=10", *TINY], tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dirs = sorted(p.parent for p in tmp_path.glob("outputs/multirun/*/*/*/outcome.json"))
    assert len(run_dirs) == 2
    outcomes = [json.loads((d / "outcome.json").read_text()) for d in run_dirs]
    assert all(o["state"] == "SUCCEEDED" for o in outcomes), outcomes
    pids = {json.loads((d / "launcher.json").read_text()).get("pid") for d in run_dirs}
    assert len(pids) == 2  # two launcher processes: joblib's workers ran the jobs side by side
    ports = {json.loads(next((d / "progress").glob("agent-*.json")).read_text())["rendezvous"] for d in run_dirs}
    assert len(ports) == 2  # each job its own rendezvous port
    runs = _runs(tmp_path)
    parent = next(x for x in runs if x.data.tags.get("aitrain.sweep") == "parent")
    assert parent.data.tags["aitrain.sweep.launcher"].endswith("JoblibLauncher")
    assert sum(1 for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id) == 2


def test_a_killed_sweep_leaves_no_running_parent_run(tmp_path: Path) -> None:
    """SIGKILL to a sweep mid-job: its callback never ends the parent run, but the next
    `aitrain runs` finds the sweep gone and ends it KILLED, as it does the job's run."""
    import os
    import signal
    import subprocess

    from aitrain_testing import aitrain_argv, wait_until

    proc = subprocess.Popen(aitrain_argv() + ["launch", "-m", "train.lr=1e-3,3e-3", "train.steps=100000",
                                              "train.log_every=1", *TINY],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until(lambda: list(tmp_path.glob("outputs/multirun/*/*/*/progress/rank0.json")), 120,
                   "the first job's rank stepping")
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    r = run_aitrain(["runs", "--last", "5", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    parent = next(x for x in rows if x["sweep"])
    job = next(x for x in rows if x["parent_run_id"] == parent["run_id"])
    assert (parent["status"], job["status"]) == ("KILLED", "KILLED"), rows
    assert "was left RUNNING by a sweep" in r.stderr
    again = run_aitrain(["runs", "--last", "5"], tmp_path)
    assert "left RUNNING" not in again.stderr  # once
