"""The job verbs for local jobs with real processes: `aitrain list|status|logs|cancel`, `--json`,
`aitrain.submit` of a detached local job, and the failing rank's traceback on the console."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aitrain_testing import REPO, all_gone, run_aitrain, wait_until

FAIL_SCRIPT = REPO / "tests" / "scripts" / "fail_rank.py"
TINY = ["model.n_layer=1", "model.d_model=32", "model.seq_len=16", "train.global_batch_size=8"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"XDG_STATE_HOME": str(tmp_path / "state")}


def aitrain_json(args: list[str], cwd: Path, env: dict[str, str]) -> object:
    r = run_aitrain(args, cwd, env=env)
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout)


def test_a_foreground_launch_has_a_handle_for_every_verb(tmp_path: Path, env: dict[str, str]) -> None:
    r = run_aitrain(["launch", "train.steps=3", "nproc_per_node=2", "--json", *TINY], tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])  # --json: the last line of stdout
    assert doc["state"] == "SUCCEEDED" and doc["mlflow_run_id"] and Path(doc["run_dir"]).is_dir()
    handle = doc["handle"]
    assert handle.startswith("local://")
    listed = aitrain_json(["list", "--json"], tmp_path, env)
    assert isinstance(listed, list)
    assert [(j["handle"], j["state"], j["backend"]) for j in listed] == [(handle, "SUCCEEDED", "local")]
    st = aitrain_json(["status", handle, "--json"], tmp_path, env)
    assert isinstance(st, dict) and st["state"] == "SUCCEEDED" and st["run_dir"] == doc["run_dir"]
    rank0 = run_aitrain(["logs", handle, "--rank", "0"], tmp_path, env=env).stdout
    assert "step 3/3" in rank0 and "[rank" not in rank0  # the rank's own log file
    every = run_aitrain(["logs", handle], tmp_path, env=env).stdout
    assert "[rank0]:step 3/3" in every and all(x.startswith("[rank") for x in every.splitlines())
    again = aitrain_json(["cancel", handle, "--json"], tmp_path, env)
    assert isinstance(again, dict) and again["cancelled"] is False and again["state"] == "SUCCEEDED"
    table = run_aitrain(["list"], tmp_path, env=env).stdout
    assert handle in table and "SUCCEEDED" in table


def test_a_failed_job_names_the_failing_rank_first(tmp_path: Path, env: dict[str, str]) -> None:
    r = run_aitrain(["launch", f"script={FAIL_SCRIPT}", "tracking=none", "nproc_per_node=2", "--json"], tmp_path,
                    env={**env, "MODE": "raise", "FAIL_RANK": "1"})
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["state"] == "FAILED" and doc["failures"][0]["rank"] == 1
    st = run_aitrain(["status", doc["handle"]], tmp_path, env=env)
    assert st.returncode == 1
    failed = next(line for line in st.stdout.splitlines() if "failed:" in line)
    assert "rank 1" in failed and "deliberate failure on rank 1" in failed


def test_submit_runs_a_local_job_detached_and_cancel_stops_it(tmp_path: Path, env: dict[str, str]) -> None:
    code = ("import json, sys, aitrain\n"
            "job = aitrain.submit(['train.steps=100000', 'train.log_every=1', 'tracking=none', "
            "'nproc_per_node=2', *sys.argv[1:]])\n"
            "print(json.dumps({'handle': job.handle, 'run_dir': job.run_dir}))\n")
    out = subprocess.run([sys.executable, "-c", code, *TINY], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    handle, run_dir = doc["handle"], Path(doc["run_dir"])
    # The submitting process has exited; the job goes on without it.
    wait_until(lambda: "step 3/" in run_aitrain(["logs", handle], tmp_path, env=env).stdout, 120, "training steps")
    st = aitrain_json(["status", handle, "--json"], tmp_path, env)
    assert isinstance(st, dict) and st["state"] == "RUNNING"
    ranks = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _in(p, run_dir)]
    assert ranks
    t0 = time.monotonic()
    r = aitrain_json(["cancel", handle, "--json"], tmp_path, env)
    assert isinstance(r, dict) and r["cancelled"] is True and r["state"] == "CANCELLED"
    assert time.monotonic() - t0 < 30
    assert not all_gone(ranks, 10)
    assert json.loads((run_dir / "outcome.json").read_text())["state"] == "CANCELLED"
    follow = run_aitrain(["logs", handle, "--follow"], tmp_path, env=env)  # returns: the job has ended
    assert follow.returncode == 0 and "step 3/" in follow.stdout


def _in(proc: Path, run_dir: Path) -> bool:
    try:
        return str(run_dir).encode() in (proc / "environ").read_bytes() and \
            b"aitrain.launcher.train" in (proc / "cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.parametrize("nproc", [2, 4])
def test_the_failing_ranks_traceback_reaches_the_console_every_time(tmp_path: Path, nproc: int) -> None:
    """A script that raises on rank 1: its traceback is on the console in 10 runs out of 10, and
    the message names rank 1 first (the other ranks were stopped after it)."""
    script = tmp_path / "raise_on_1.py"
    script.write_text("import os, time\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    time.sleep(0.2)\n"
                      "    raise RuntimeError('rank one is broken')\n"
                      "time.sleep(60)\n")
    for i in range(10):
        r = run_aitrain(["launch", f"script={script}", f"nproc_per_node={nproc}", "tracking=none", "fabric=off"],
                        tmp_path, timeout=120)
        assert r.returncode == 1, r.stderr
        console = r.stdout + r.stderr
        assert "[rank1]:RuntimeError: rank one is broken" in console, f"run {i}: {console}"
        assert "[rank1]:Traceback (most recent call last):" in console, f"run {i}: {console}"
        first = next(x for x in r.stderr.splitlines() if x.startswith("aitrain: error:"))
        assert first.startswith("aitrain: error: the job failed: rank 1 (pid"), f"run {i}: {first}"
