"""Real launches on the embedded store: provenance, phases, system metrics, rank logs, the watchdog."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from aitrain_testing import REPO, alive, run_aitrain

JOB = REPO / "tests" / "scripts" / "progress_job.py"
HOST = os.uname().nodename
SECRET = "hf_do_not_record_me"
pytestmark = pytest.mark.timeout(240)


def client_and_run(root: Path) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("aitrain").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def run_dir_of(stdout: str) -> Path:
    line = next(x for x in stdout.splitlines() if x.startswith("aitrain:") and "run dir " in x)
    return Path(line.split("run dir ", 1)[1].split(";")[0].strip())


def git_repo_with(path: Path, script: Path) -> str:
    path.mkdir()
    shutil.copy(script, path / script.name)
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    subprocess.run([*git, "add", script.name], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "job"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def test_launch_records_provenance_phases_system_metrics_and_rank_logs(tmp_path: Path) -> None:
    commit = git_repo_with(tmp_path / "code", JOB)
    r = run_aitrain(["launch", f"script={tmp_path / 'code' / JOB.name}", "fabric=off", "nproc_per_node=2",
                     "tracking.system_metrics_interval_s=0.3", f"fabric.env.HF_TOKEN={SECRET}"],
                    tmp_path, env={"STEPS": "20", "STEP_SLEEP": "0.03"})
    assert r.returncode == 0, r.stderr + r.stdout
    assert SECRET not in r.stdout + r.stderr
    out = r.stdout.splitlines()
    # Console: rank prefixes kept, an identical line of both ranks shown once plus a summary.
    assert "[rank0]:only rank 0 says this" in out and "[rank1]:only rank 1 says this" in out
    same = sorted(line for line in out if "the same line on every rank" in line)
    assert same in (["[rank0]:the same line on every rank", "[rank1]:the same line on every rank [repeated 1x]"],
                    ["[rank0]:the same line on every rank [repeated 1x]", "[rank1]:the same line on every rank"])
    run_dir = run_dir_of(r.stdout)
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text().splitlines()
        assert "the same line on every rank" in log and f"only rank {rank} says this" in log

    client, run = client_and_run(tmp_path)
    run_id, tags, params, metrics = run.info.run_id, run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 21))
    for phase in ("rendezvous", "startup", "pg_init", "first_step", "steady_step"):
        assert f"phase/{phase}_s" in metrics, phase
    assert 0 < metrics["phase/steady_step_s"] < 5 and metrics["steady/tokens_per_s"] > 0
    assert "steady/mfu" not in metrics  # CPU: no MFU estimate
    assert client.get_metric_history(run_id, f"system/{HOST}/cpu_util_pct")
    assert metrics[f"system/{HOST}/mem_total_mib"] > 0 and f"system/{HOST}/cgroup_memory_mib" in metrics
    assert tags["git.commit"] == commit and tags["git.dirty"] == "false"
    assert tags["nodes"] == HOST and tags["versions.torch"].startswith("2.") and tags["versions.python"]
    assert "HF_TOKEN=***" in tags["aitrain.command"] and params["fabric.env.HF_TOKEN"] == "***"
    dl = tmp_path / "dl"
    assert SECRET not in Path(client.download_artifacts(run_id, "job.yaml", str(dl))).read_text()
    env = json.loads(Path(client.download_artifacts(run_id, f"env/{HOST}.json", str(dl))).read_text())
    assert env["HF_TOKEN"] == {"value": "***", "source": "user-set (fabric.env)"}
    assert env["AITRAIN_PROGRESS_DIR"]["value"].endswith("progress")
    node = json.loads(Path(client.download_artifacts(run_id, f"nodes/{HOST}.json", str(dl))).read_text())
    assert node["versions"]["torch"] == tags["versions.torch"]
    logs = {a.path for a in client.list_artifacts(run_id, "logs")}
    assert {"logs/rank0.log", "logs/rank1.log"} <= logs




def test_watchdog_dumps_every_stack_names_the_rank_behind_and_stops_the_job(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = run_aitrain(["launch", f"script={JOB}", "fabric=off", "nproc_per_node=2", "watchdog.timeout_s=3",
                     "log.ranks=1", "tracking.system_metrics=false"],
                    tmp_path, env={"STEPS": "50", "STEP_SLEEP": "0.02", "HANG_RANK": "1", "HANG_STEP": "4"})
    assert r.returncode == 124, r.stderr + r.stdout
    assert time.monotonic() - t0 < 120
    assert "hang watchdog" in r.stderr and f"rank 1 on {HOST}" in r.stderr and "HINT:" in r.stderr
    # log.ranks=1: only rank 1 on the console; rank 0's lines are in its file.
    assert "[rank1]:rank 1 sleeps at step 4" in r.stdout and "[rank0]:" not in r.stdout
    run_dir = run_dir_of(r.stdout)
    assert "only rank 0 says this" in (run_dir / "logs" / "rank0.log").read_text()

    report = json.loads((run_dir / f"hang-report-{HOST}.json").read_text())
    assert [(b["rank"], b["host"]) for b in report["behind"]] == [(1, HOST)]
    ranks = {r_["rank"]: r_ for r_ in report["ranks"]}
    assert ranks[0]["waiting_in"] == "all_reduce" and ranks[1]["waiting_in"] is None
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert all(r_["stack_source"] in ("py-spy", "faulthandler") for r_ in ranks.values())
    assert "progress_job.py" in ranks[1]["stack"]
    assert not [p for p in (r_["pid"] for r_ in ranks.values()) if alive(p)], "ranks left behind"

    client, run = client_and_run(tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.tags["aitrain.hang"] == "true" and run.data.tags["aitrain.hang.behind"] == f"1@{HOST}"
    hang = {a.path for a in client.list_artifacts(run.info.run_id, "hang")}
    assert {f"hang/hang-report-{HOST}.json", f"hang/hang-report-{HOST}.txt"} <= hang


def test_dry_run_prints_no_secret(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "dry_run=true", "fabric=off", f"fabric.env.HF_TOKEN={SECRET}",
                     "tracking.uri=http://bob:hunter2@127.0.0.1:5999"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout and "hunter2" not in r.stdout
    assert "HF_TOKEN=***" in r.stdout and "http://***@127.0.0.1:5999" in r.stdout


def test_rank_lists_need_no_quotes() -> None:
    from aitrain.launcher.cli.launch import _quote_rank_list

    assert _quote_rank_list("log.ranks=0,3") == "log.ranks='0,3'"
    assert _quote_rank_list("log.ranks=0") == "log.ranks=0"
    assert _quote_rank_list("log.ranks='0,3'") == "log.ranks='0,3'"
    assert _quote_rank_list("train.lr=1,2") == "train.lr=1,2"


def test_builtin_job_reports_its_phases_and_progress(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "train.steps=6", "fabric=off", "nproc_per_node=2", "tracking.system_metrics=false"],
                    tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    _, run = client_and_run(tmp_path)
    for phase in ("rendezvous", "startup", "pg_init", "first_step", "steady_step"):
        assert f"phase/{phase}_s" in run.data.metrics, phase
    run_dir = run_dir_of(r.stdout)
    beats = [json.loads((run_dir / "progress" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(b["step"], b["done"]) for b in beats] == [(6, True), (6, True)]
    assert beats[0]["info"]["n_params"] > 0
