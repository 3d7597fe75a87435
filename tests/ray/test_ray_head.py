"""backend=ray on a real local head (``ray start --head``): the Ray client, the Jobs API and
its handles, a failing rank, a killed worker with restarts, and the example notebook.

After every job Ray's state API must show no live actor and no placement group.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from aitrain_testing import alive, up_or_skip, wait_until  # noqa: E402
from raycluster import REPO, TINY, LocalHead, aitrain, leftovers  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
FAIL_SCRIPT = REPO / "tests" / "scripts" / "fail_rank.py"


@pytest.fixture(scope="module")
def head():
    yield from up_or_skip(LocalHead(num_cpus=8), "a Ray head")


def run_dir_of(stdout: str) -> Path:
    line = next(x for x in stdout.splitlines() if "; run dir " in x or x.startswith("aitrain: job finished"))
    return Path(line.split("run dir ")[1].split(";")[0].strip())


def assert_nothing_left(head: LocalHead) -> None:
    state = leftovers(head.jobs, head.env())
    assert state == {"actors": [], "placement_groups": []}, state


def test_job_through_the_ray_client(head: LocalHead, tmp_path: Path) -> None:
    # Two job nodes packed onto the one Ray node, each rank holding one unit of a custom resource.
    r = aitrain(["launch", "backend=ray", f"backend.address={head.client}", "+strategy=ddp", "nnodes=2",
                 "nproc_per_node=1", "backend.placement=pack", "backend.cpus_per_worker=0.5",
                 "+backend.resources_per_worker.accel=1", "train.steps=4", *TINY], tmp_path, head.env(tmp_path))
    assert r.returncode == 0, r.stderr + r.stdout
    lines = [x for x in r.stdout.splitlines() if x.startswith("[rank")]
    assert any(x.startswith("[rank0 node0]:step 4/4") for x in lines)
    assert all(x.startswith(("[rank0 node0]:", "[rank1 node1]:")) for x in lines)
    run_dir = run_dir_of(r.stdout)
    assert (run_dir / "logs" / "node0" / "rank0.log").exists() and (run_dir / "logs" / "node1" / "rank1.log").exists()
    ranks = json.loads((run_dir / "ray-ranks.json").read_text())
    assert len({x["ray_node_id"] for x in ranks["ranks"]}) == 1  # packed
    assert ranks["rendezvous"].startswith("127.0.0.1:")  # one machine: loopback
    assert_nothing_left(head)


def test_failing_rank_takes_the_group_down(head: LocalHead, tmp_path: Path) -> None:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    t0 = time.monotonic()
    r = aitrain(["launch", "backend=ray", f"script={FAIL_SCRIPT}", "nproc_per_node=2",
                 "tracking=none", "fabric.env.FAIL_RANK=1", f"fabric.env.PID_DIR={pid_dir}"],
                tmp_path, dict(head.env(tmp_path), RAY_ADDRESS=head.gcs))
    assert r.returncode == 1, r.stdout
    assert time.monotonic() - t0 < 90
    assert "the job failed: rank 1 on node0 exited with code 1" in r.stderr
    assert "RuntimeError: deliberate failure on rank 1" in r.stderr
    pids = [int(p.read_text()) for p in pid_dir.glob("rank*.pid")]
    assert len(pids) == 2 and not [p for p in pids if alive(p)]  # rank 0 was stopped, not left waiting
    assert_nothing_left(head)


def test_killed_worker_restarts_the_group_from_the_checkpoint(head: LocalHead, tmp_path: Path) -> None:
    import subprocess
    import sys

    args = ["launch", "backend=ray", f"backend.address={head.gcs}", "backend.max_failures=1", "nproc_per_node=2",
            "train.steps=40", "checkpoint.every_n_steps=1", "checkpoint.keep=2", "tracking=none", *TINY]
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "aitrain.launcher.cli", *args], cwd=tmp_path,
                                env=head.env(tmp_path), stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: "step 8/40" in out.read_text(), 120, "step 8", poll=0.5)
        ranks_file = next(tmp_path.glob("outputs/*/*/ray-ranks.json"))
        ranks = json.loads(ranks_file.read_text())
        victim = next(x for x in ranks["ranks"] if x["rank"] == 1)
        # Both ranks held still, the newest complete checkpoint damaged (a flipped byte: only
        # its checksum can tell), then rank 1's Ray worker dies: the restarted group must name
        # the damaged checkpoint and resume from the intact one before it.
        for x in ranks["ranks"]:
            os.kill(x["rank_pid"], signal.SIGSTOP)
        complete = sorted(p.parent for p in (ranks_file.parent / "checkpoints").glob("step-*/COMPLETE"))
        damaged, intact = complete[-1], complete[-2]
        data = next(damaged.glob("__0_*.distcp"))
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        os.kill(victim["worker_pid"], signal.SIGKILL)  # rank 1's Ray worker dies mid-training
        os.kill(next(x for x in ranks["ranks"] if x["rank"] == 0)["rank_pid"], signal.SIGCONT)
        assert proc.wait(180) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert "rank 1 on node0 lost its Ray worker" in text and "restarting the group (restart 1 of at most 1)" in text
    assert "attempt 2" in text and "step 40/40" in text
    line = next((x for x in text.splitlines() if f"checkpoint {damaged.name} is damaged" in x), text[-3000:])
    assert f"aitrain: checkpoint {damaged.name} is damaged (rank0 file {data.name} fails its checksum" in line
    assert line.endswith(f"); resuming from {intact.name}"), line
    assert f"aitrain: resumed from {intact} (step {int(intact.name.split('-')[1])}," in text
    assert not alive(victim["rank_pid"])
    assert_nothing_left(head)


def test_sweep_through_the_jobs_api_submits_every_job_and_ties_their_runs(head: LocalHead, tmp_path: Path) -> None:
    """Hydra's basic sweeper with the Ray Jobs API: both jobs submitted without waiting, the
    sweep's MLflow run lists their handles, and their runs are its children."""
    from mlflow.tracking import MlflowClient

    env = head.env(tmp_path)
    r = aitrain(["launch", "-m", "backend=ray", f"backend.address={head.jobs}", "nproc_per_node=2",
                 "train.lr=1e-3,3e-3", "train.steps=3", *TINY], tmp_path, env)
    assert r.returncode == 0, r.stderr + r.stdout
    handles = list(dict.fromkeys(w for w in r.stdout.split() if w.startswith("ray://")))
    assert len(handles) == 2
    for handle in handles:
        follow = aitrain(["logs", handle, "--follow"], tmp_path, env, timeout=180)
        assert follow.returncode == 0, follow.stdout[-2000:] + follow.stderr[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("aitrain").experiment_id])
    parent = next(x for x in runs if x.data.tags.get("aitrain.sweep") == "parent")
    assert parent.data.tags["aitrain.sweep.handles"].split() == handles
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.run_name.split(" [")[0] for c in children) == ["train.lr=0.001", "train.lr=0.003"]
    assert_nothing_left(head)


def test_jobs_api_handle(head: LocalHead, tmp_path: Path) -> None:
    env = head.env(tmp_path)
    r = aitrain(["launch", "backend=ray", f"backend.address={head.jobs}", "nproc_per_node=2", "train.steps=3",
                 "tracking=none", *TINY], tmp_path, env)
    assert r.returncode == 0, r.stderr
    handle = next(w for w in r.stdout.split() if w.startswith("ray://"))
    assert handle.startswith(f"ray://127.0.0.1:{head.dashboard_port}/raysubmit_")
    follow = aitrain(["logs", handle, "--follow"], tmp_path, env, timeout=180)
    assert follow.returncode == 0 and "[rank0 node0]:step 3/3" in follow.stdout, follow.stdout + follow.stderr
    st = json.loads(aitrain(["status", handle, "--json"], tmp_path, env).stdout)
    assert st["state"] == "SUCCEEDED" and Path(st["run_dir"]).is_dir()
    only = aitrain(["logs", handle, "--rank", "0"], tmp_path, env).stdout  # the rank's own log file
    assert "step 3/3" in only and "[rank1" not in only
    again = aitrain(["cancel", handle], tmp_path, env)
    assert again.returncode == 0 and "nothing to cancel" in again.stdout
    # Without a token the Jobs API refuses, and the error says what to do about it.
    no_token = aitrain(["status", handle], tmp_path, dict(env, HOME=str(tmp_path)))
    assert no_token.returncode != 0 and "auth_token" in no_token.stderr and "RAY_AUTH_MODE" in no_token.stderr
    assert_nothing_left(head)


def test_notebook_submits_follows_cancels_and_leaves_a_job_running(head: LocalHead, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    for k, v in head.env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AITRAIN_RAY_CLIENT", head.client)
    monkeypatch.setenv("AITRAIN_RAY_JOBS", head.jobs)
    monkeypatch.setenv("AITRAIN_EXAMPLE_OVERRIDES", f"run_root={tmp_path / 'outputs'} tracking=none")
    nb = nbformat.read(REPO / "examples" / "notebook_submit.ipynb", as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    # The kernel is gone now: the last job, submitted through the Jobs API, still finishes.
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "[rank0 node0]:step 10/10" in text  # logs(follow=True) printed the ray:// job's lines
    assert "CANCELLED" in text
    handle = nb.cells[-1].outputs[0]["text"].strip()
    assert handle.startswith("ray://")
    env = head.env(tmp_path)
    st = wait_until(lambda: (s := json.loads(aitrain(["status", handle, "--json"], tmp_path, env).stdout))["state"]
                  in ("SUCCEEDED", "FAILED", "CANCELLED") and s, 180, "the job the notebook left running", poll=0.5)
    assert st["state"] == "SUCCEEDED", st
    assert_nothing_left(head)


ARGV_SCRIPT = """\
import json, os, sys
with open(os.path.join(os.environ["ARGV_OUT"], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "mlflow_run": os.environ.get("MLFLOW_RUN_ID")}, f)
"""


@pytest.mark.parametrize("address", ["client", "jobs"])
def test_torchrun_command_shape_on_ray(head: LocalHead, tmp_path: Path, address: str) -> None:
    """`-- script ARGS` reaches every rank byte for byte, through the Ray client and through the
    Jobs API (whose entrypoint re-runs `aitrain launch` on the cluster), with the launch's MLflow run."""
    (tmp_path / "show_argv.py").write_text(ARGV_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    args = ["--lr", "1e-3", "--flag", "true", "it's", "${x}", ""]
    env = head.env(tmp_path)
    addr = head.client if address == "client" else head.jobs
    r = aitrain(["launch", "backend=ray", f"backend.address={addr}", "nproc_per_node=2", "fabric=off",
                 f"fabric.env.ARGV_OUT={out}", f"run_root={tmp_path / 'runs'}", "--", "show_argv.py", *args],
                tmp_path, env)
    assert r.returncode == 0, r.stderr + r.stdout
    if address == "jobs":
        handle = next(w for w in r.stdout.split() if w.startswith("ray://"))
        follow = aitrain(["logs", handle, "--follow"], tmp_path, env, timeout=180)
        assert follow.returncode == 0, follow.stdout + follow.stderr
    seen = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [s["argv"] for s in seen] == [args, args]
    assert seen[0]["mlflow_run"] and seen[0]["mlflow_run"] == seen[1]["mlflow_run"]
    assert_nothing_left(head)


def test_progress_bar_reaches_the_console_as_it_comes(head: LocalHead, tmp_path: Path) -> None:
    """A rank's \\r progress bar on Ray: shown while it runs (a line a second off a terminal),
    ending as its last state, as on the local backend."""
    import subprocess
    import threading

    from aitrain_testing import aitrain_argv

    script = REPO / "tests" / "scripts" / "progress_bar_job.py"
    proc = subprocess.Popen(aitrain_argv() + ["launch", "backend=ray", f"backend.address={head.client}",
                                              "nproc_per_node=1", "tracking=none", "fabric=off",
                                              "fabric.env.UPDATES=25", "fabric.env.UPDATE_SLEEP=0.1", "--",
                                              str(script)],
                            cwd=tmp_path, env=head.env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    err: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: err.extend((time.monotonic(), x) for x in proc.stderr or ()))
    reader.start()
    out = proc.stdout.read() if proc.stdout else ""
    proc.wait(timeout=180)
    reader.join()
    assert proc.returncode == 0, out + "".join(x for _, x in err)
    bars = [(t, x.strip()) for t, x in err if x.startswith("[rank0 node0]:training:")]
    assert len(bars) >= 3 and bars[-1][1] == "[rank0 node0]:training: 25/25 steps", bars
    assert bars[-1][0] - bars[0][0] > 1.5  # shown while it ran, not all at its newline
    assert_nothing_left(head)
