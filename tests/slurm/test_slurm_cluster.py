"""The Slurm backend on a real 2-node Slurm cluster (slurmctld + slurmd per network namespace).

The hostname resolves to 127.0.0.1 on every node, so an untuned multi-node gloo job
fails: these jobs only pass when aitrain picks each node's interface and the rendezvous
address itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aitrain_testing import REPO, aitrain_argv, up_or_skip

sys.path.insert(0, str(REPO / "scripts"))
import slurm_cluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(900)]

WHY = slurm_cluster.available()
if WHY:
    pytest.skip(f"real Slurm cluster unavailable: {WHY}", allow_module_level=True)

TINY = ["model.n_layer=1", "model.d_model=32", "model.seq_len=16", "train.global_batch_size=8",
        "nproc_per_node=1", "train.log_every=5"]


@pytest.fixture(scope="module")
def cluster():
    yield from up_or_skip(slurm_cluster.SlurmCluster(nodes=2, name="aitslm", base=217), "Slurm")


@pytest.fixture
def env(cluster, tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("MLFLOW_TRACKING_URI", None)
    e.update(cluster.env())
    e["XDG_STATE_HOME"] = str(tmp_path / "state")
    e["PATH"] = f"{Path(sys.executable).parent}:{e['PATH']}"
    return e


def aitrain(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(aitrain_argv() + args, cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)


def submit(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    r = aitrain(["launch", "backend=slurm", "nnodes=2", *args], cwd, env)
    assert r.returncode == 0, r.stderr + r.stdout
    handle = next(w for w in r.stdout.split() if w.startswith("slurm://"))
    return handle


def wait_done(handle: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = aitrain(["status", handle, "--json"], cwd, env)
        st = json.loads(r.stdout)
        if st["state"] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", ""):
            return st
        time.sleep(1)
    raise AssertionError(f"{handle} did not finish in {timeout}s: {st}")


def wait_for_log(handle: str, text: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    logs = ""
    while time.monotonic() < deadline and text not in logs:
        time.sleep(1)
        logs = aitrain(["logs", handle], cwd, env).stdout
    assert text in logs, logs[-2000:]
    return logs


def mlflow_runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aitrain")
    return (client.search_runs([exp.experiment_id]) if exp else []), client


def job_output(st: dict) -> str:
    run_dir = Path(st["run_dir"])
    return "\n".join(p.read_text(errors="replace") for p in run_dir.glob("slurm-*.out"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_node_job_from_a_login_node(strategy: str, tmp_path: Path, env: dict[str, str]) -> None:
    handle = submit([f"+strategy={strategy}", "train.steps=10", *TINY], tmp_path, env)
    assert handle.startswith("slurm://aitslm/")
    st = wait_done(handle, tmp_path, env)
    out = job_output(st)
    assert st["state"] == "SUCCEEDED", out
    assert "[rank1]:" in out or "rank1" in out
    runs, client = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    assert len(losses) == 10
    metrics = runs[0].data.metrics
    for phase in ("queue_wait", "probe", "check", "tune", "smoke_test"):
        assert f"phase/{phase}_s" in metrics, sorted(metrics)
    assert runs[0].data.tags["nodes"] == "node1,node2"
    # The rendezvous address is an interface address, never the hostname (which is 127.0.0.1 here).
    agents = json.loads((Path(st["run_dir"]) / "agents.json").read_text())
    assert agents[0]["master_addr"].startswith("10.217.")
    assert {a["env"]["GLOO_SOCKET_IFNAME"].lstrip("=") for a in agents} == {"fab0"}
    # The host checks ran on every node, not only on the one running the batch script.
    preflight = json.loads((Path(st["run_dir"]) / "preflight.json").read_text())
    assert {f["host"] for f in preflight["findings"] if f["id"].startswith("host-")} == {"node1", "node2"}


def test_wrapper_script_with_sbatch(tmp_path: Path, env: dict[str, str]) -> None:
    r = subprocess.run(["sbatch", "--parsable", "-N", "2", str(REPO / "slurm" / "aitrain.sbatch"),
                        "+strategy=ddp", "train.steps=5", *TINY],
                       cwd=tmp_path, env=env, text=True, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jobid = r.stdout.strip().split(";")[0]
    st = wait_done(jobid, tmp_path, env)
    out = (tmp_path / f"aitrain-{jobid}.out").read_text()
    assert st["state"] == "SUCCEEDED", out
    assert "step 5/5" in out
    # nnodes left out: the whole allocation, in the plan and in what the run records.
    runs, _ = mlflow_runs(tmp_path)
    assert runs[0].data.params["nnodes"] == "2" and runs[0].data.tags["world_size"] == "2"


def test_status_logs_and_cancel(tmp_path: Path, env: dict[str, str]) -> None:
    handle = submit(["train.steps=100000", *TINY], tmp_path, env)
    wait_for_log(handle, "step 5/", tmp_path, env)
    rank1 = aitrain(["logs", handle, "--rank", "1"], tmp_path, env).stdout
    assert rank1.strip() and "step 5/" not in rank1  # rank 1's own output (rank 0 prints progress)
    st = json.loads(aitrain(["status", handle, "--json"], tmp_path, env).stdout)
    assert st["state"] == "RUNNING" and "node" in st["nodes"]
    assert "cancelled" in aitrain(["cancel", handle], tmp_path, env).stdout
    st = wait_done(handle, tmp_path, env, timeout=60)
    assert st["state"] == "CANCELLED"
    again = aitrain(["cancel", handle], tmp_path, env)  # idempotent
    assert again.returncode == 0 and "nothing to cancel" in again.stdout
    # --follow returns once the job has ended
    r = aitrain(["logs", handle, "--follow"], tmp_path, env, timeout=60)
    assert r.returncode == 0


def test_failing_rank_on_node_two_ends_the_job_on_node_one(tmp_path: Path, env: dict[str, str]) -> None:
    script = REPO / "tests" / "scripts" / "fail_rank.py"
    env = dict(env, MODE="raise", FAIL_RANK="1")
    t0 = time.monotonic()
    handle = submit([f"script={script}", "tracking=none", "nproc_per_node=1"], tmp_path, env)
    st = wait_done(handle, tmp_path, env, timeout=120)
    assert time.monotonic() - t0 < 100
    assert st["state"] == "FAILED", st
    assert st["failures"] and st["failures"][0]["node"] == "node2"
    status_text = aitrain(["status", handle], tmp_path, env).stdout
    assert "node2" in status_text and "rank 1" in status_text


def test_override_with_shell_metacharacters_arrives_unchanged(tmp_path: Path, env: dict[str, str]) -> None:
    nasty = "run a;b $(touch /tmp/aitrain-slurm-pwned) `id` & 'x'"
    handle = submit([f'tracking.run_name="{nasty}"', "train.steps=2", *TINY], tmp_path, env)
    st = wait_done(handle, tmp_path, env)
    assert st["state"] == "SUCCEEDED", job_output(st)
    runs, _ = mlflow_runs(tmp_path)
    assert runs[0].info.run_name == nasty
    assert not Path("/tmp/aitrain-slurm-pwned").exists()
    script = Path(st["run_dir"]) / "aitrain.sbatch"
    assert oct(script.stat().st_mode & 0o077) == "0o0"


def test_signal_checkpoints_requeues_and_resumes(tmp_path: Path, env: dict[str, str]) -> None:
    """The pre-timeout signal saves a checkpoint and requeues the job. While the job waits to
    run again, that newest checkpoint is damaged (its data file cut short): the requeued
    attempt names it in one line and resumes from the newest intact one, the periodic
    checkpoint before it."""
    handle = submit(["train.steps=400", "train.log_every=1", "checkpoint.every_n_steps=10", *TINY], tmp_path, env)
    jobid = handle.rsplit("/", 1)[1]
    wait_for_log(handle, "step 25/", tmp_path, env)
    # What Slurm does before the time limit (--signal=USR1@120): signal every job step.
    subprocess.run(["scancel", "--signal=USR1", jobid], env=env, check=True, timeout=30)
    logs = wait_for_log(handle, "requeueing job", tmp_path, env)
    stopped = int(logs.split("stopping at step ")[1].split()[0])
    run_dir = Path(json.loads(aitrain(["status", handle, "--json"], tmp_path, env).stdout)["run_dir"])
    damaged = run_dir / "checkpoints" / f"step-{stopped:08d}"
    assert (damaged / "COMPLETE").exists()
    data = next(damaged.glob("__0_*.distcp"))
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    intact = max(s for s in range(10, stopped, 10))  # the periodic checkpoint before it
    st = wait_done(handle, tmp_path, env, timeout=400)
    out = job_output(st)
    assert st["state"] == "SUCCEEDED", out[-3000:]
    assert st["restarts"] == 1
    assert f"aitrain: checkpoint {damaged.name} is damaged (rank0 file {data.name} truncated: {size // 2} of " \
           f"{size} bytes); resuming from step-{intact:08d}" in out, out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{intact:08d}'} (step {intact}," in out
    runs, client = mlflow_runs(tmp_path)
    by_restart = {r.data.tags.get("slurm.restart_count"): r for r in runs}
    assert set(by_restart) == {"0", "1"}
    # The loss curve continues from the checkpoint it resumed: the second attempt's first step follows it.
    second = client.get_metric_history(by_restart["1"].info.run_id, "loss")
    assert min(m.step for m in second) == intact + 1 and max(m.step for m in second) == 400


def test_sweep_from_a_login_node_submits_every_job_and_ties_their_runs(tmp_path: Path, env: dict[str, str]) -> None:
    """Hydra's basic sweeper with backend=slurm: every job is submitted without waiting for the
    one before; the sweep's MLflow run lists their handles and their runs are its children."""
    r = aitrain(["launch", "-m", "backend=slurm", "nnodes=2", "train.lr=1e-3,3e-3", "train.steps=5", *TINY],
                tmp_path, env)
    assert r.returncode == 0, r.stderr + r.stdout
    handles = list(dict.fromkeys(w for w in r.stdout.split() if w.startswith("slurm://")))
    assert len(handles) == 2
    for handle in handles:
        st = wait_done(handle, tmp_path, env)
        assert st["state"] == "SUCCEEDED", job_output(st)[-3000:]
    runs, _ = mlflow_runs(tmp_path)
    parent = next(x for x in runs if x.data.tags.get("aitrain.sweep") == "parent")
    assert parent.data.tags["aitrain.sweep.handles"].split() == handles
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.params["train.lr"] for c in children) == ["0.001", "0.003"]
    assert sorted(c.info.run_name.split(" [")[0] for c in children) == ["train.lr=0.001", "train.lr=0.003"]


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins") is None
                    or importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                    reason="hydra-optuna-sweeper not installed")
def test_an_optimising_sweep_waits_for_each_slurm_job(tmp_path: Path, env: dict[str, str]) -> None:
    r = aitrain(["launch", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "backend=slurm", "nnodes=2",
                 "train.lr=interval(1e-4,1e-2)", "train.steps=5", *TINY], tmp_path, env, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert r.stdout.count("aitrain: waiting for slurm://") == 2
    runs, _ = mlflow_runs(tmp_path)
    parent = next(x for x in runs if x.data.tags.get("aitrain.sweep") == "parent")
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.data.tags["aitrain.sweep.failed_trials"] == "0"
    best = min(children, key=lambda c: c.data.metrics["loss"])
    assert parent.data.tags["aitrain.sweep.best_run_id"] == best.info.run_id


def test_max_requeues_stops_requeueing(tmp_path: Path, env: dict[str, str]) -> None:
    handle = submit(["train.steps=400", "train.log_every=1", "backend.max_requeues=0", *TINY], tmp_path, env)
    jobid = handle.rsplit("/", 1)[1]
    wait_for_log(handle, "step 10/", tmp_path, env)
    subprocess.run(["scancel", "--signal=USR1", jobid], env=env, check=True, timeout=30)
    st = wait_done(handle, tmp_path, env, timeout=200)
    assert st["state"] == "FAILED" and st["restarts"] == 0
    assert "max_requeues=0 reached" in job_output(st)


def test_smoke_gate_names_a_silently_broken_node_and_launches_without_it(tmp_path: Path) -> None:
    """node3's fabric interface is up (so the probe and tune see nothing wrong) but its
    cable is out: the smoke all_reduce fails, bisection names node3, and with
    fabric.exclude_bad_nodes=true the job runs on node1 and node2."""
    c = slurm_cluster.SlurmCluster(nodes=3, name="aitsm3", base=222)
    try:
        c.up()
        subprocess.run(["ip", "link", "set", "aitsm33f", "nomaster"], check=True)  # unplug node3's fabric
        env = dict(os.environ, **c.env(), XDG_STATE_HOME=str(tmp_path / "state"))
        env.pop("MLFLOW_TRACKING_URI", None)
        r = aitrain(["launch", "backend=slurm", "nnodes=3", "train.steps=3", "fabric.exclude_bad_nodes=true",
                     "fabric.smoke_timeout_s=10", "train.global_batch_size=12",
                     *[o for o in TINY if not o.startswith("train.global_batch_size")]], tmp_path, env)
        assert r.returncode == 0, r.stderr
        handle = next(w for w in r.stdout.split() if w.startswith("slurm://"))
        st = wait_done(handle, tmp_path, env, timeout=300)
        out = job_output(st)
        assert st["state"] == "SUCCEEDED", out[-3000:]
        assert "node3" in out and "launching on the other 2 node(s)" in out
        runs, _ = mlflow_runs(tmp_path)
        tags = runs[0].data.tags
        assert (tags["world_size"], tags["nnodes"], tags["fabric.excluded_nodes"]) == ("2", "2", "node3"), tags
        assert "node3" not in tags["nodes"]
    finally:
        c.down()


ARGV_SCRIPT = """\
import json, os, sys
with open(os.path.join(os.environ["ARGV_OUT"], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "mlflow_run": os.environ.get("MLFLOW_RUN_ID"),
               "role": os.environ.get("ROLE_NAME")}, f)
"""


def test_torchrun_command_shape_through_the_batch_rerun(tmp_path: Path, env: dict[str, str]) -> None:
    """`-- script ARGS` from a login node: the sbatch script re-runs `aitrain launch ... --
    script ARGS`, and every rank on both nodes gets the arguments byte for byte and the
    launch's MLflow run."""
    (tmp_path / "show_argv.py").write_text(ARGV_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    args = ["--lr", "1e-3", "--flag", "true", "it's", "${x}", "$(id)", "", "a b"]
    handle = submit(["nproc_per_node=1", f"fabric.env.ARGV_OUT={out}", "--", "show_argv.py", *args], tmp_path, env)
    st = wait_done(handle, tmp_path, env)
    assert st["state"] == "SUCCEEDED", job_output(st)
    seen = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [s["argv"] for s in seen] == [args, args]
    assert {s["cwd"] for s in seen} == {str(tmp_path)} and {s["role"] for s in seen} == {"default"}
    runs, _ = mlflow_runs(tmp_path)
    assert [r.info.run_id for r in runs] == [seen[0]["mlflow_run"]] == [seen[1]["mlflow_run"]]


CONTAINER_PROBE = """\
import os
import torch
import torch.distributed as dist
print(f"rank {os.environ['RANK']} on {os.environ.get('AITRAIN_NODE')} container={os.path.exists('/run/.containerenv')} "
      f"gloo={os.environ.get('GLOO_SOCKET_IFNAME')}", flush=True)
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
print(f"rank {os.environ['RANK']} all_reduce={t.item():g}", flush=True)
dist.barrier()  # torch 2.13's gloo may abort a rank that destroys the group straight after a collective
dist.destroy_process_group()
"""


def test_two_node_job_whose_node_agents_start_their_ranks_under_podman(tmp_path: Path, env: dict[str, str]) -> None:
    """The fabric preflight runs on each node's host; each node agent starts its rank with
    `podman run --network=host` in that node's namespace; gloo crosses the nodes on the tuned
    interface; nothing is left in `podman ps -a`."""
    from aitrain_testing import podman_containers, podman_env, podman_image, podman_unavailable

    if podman_unavailable():
        pytest.skip(podman_unavailable())
    env = {**env, **podman_env(tmp_path / "podman")}
    image = podman_image(tmp_path)
    (tmp_path / "probe.py").write_text(CONTAINER_PROBE)
    handle = submit(["script=probe.py", "tracking=none", "nproc_per_node=1", f"container.image={image}",
                     "container.python=host", "container.runtime=podman"], tmp_path, env)
    st = wait_done(handle, tmp_path, env, timeout=240)
    out = job_output(st)
    assert st["state"] == "SUCCEEDED", out
    for rank, node in ((0, "node1"), (1, "node2")):
        assert f"rank {rank} on {node} container=True gloo=fab0" in out, out
        assert f"rank {rank} all_reduce=2" in out, out
    agents = json.loads((Path(st["run_dir"]) / "agents.json").read_text())
    assert [a["argv"][4:6] for a in agents] == [["podman", "run"]] * 2  # the trampoline, then podman
    assert [a["container"]["label"].rsplit(".", 1)[1] for a in agents] == ["0", "1"]
    assert podman_containers(env) == []
