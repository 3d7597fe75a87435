"""Ranks inside a container image (launcher/container.py).

Real tests run rootful Podman from Debian with an image built offline (Debian bookworm with
python3.11, no torch: the host's venv and interpreter are mounted with container.python=host).
Pyxis and Apptainer cannot be installed here: their command lines are checked against their
documentation (Pyxis: github.com/NVIDIA/pyxis/wiki/Usage; Apptainer: `apptainer exec --help`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from aitrain.launcher.container import ContainerPlan, Mount, insert_cgroup_parent

from aitrain_testing import (
    aitrain_argv,
    podman_containers,
    podman_env,
    podman_image,
    podman_unavailable,
    run_aitrain,
    wait_until,
)

RUN = Path("/runs/r1")
LAUNCH = Path("/home/u/proj")


def _plan(runtime: str, **kw: object) -> ContainerPlan:
    base: dict = dict(runtime=runtime, image="nvcr.io#nvidia/pytorch:24.05-py3", python="python",
                      mounts=[Mount(str(RUN), str(RUN)), Mount(str(LAUNCH), str(LAUNCH)),
                              Mount("/data", "/data", True)],
                      workdir=str(LAUNCH), env=["HF_TOKEN"], job="aitrain-x-1234abcd")
    base.update(kw)
    return ContainerPlan(**base)  # type: ignore[arg-type]


# -- command lines (no runtime needed) -------------------------------------------------------


def test_pyxis_flags_go_on_the_agents_srun_as_its_documentation_spells_them() -> None:
    assert _plan("pyxis").srun_flags() == [
        "--container-image=nvcr.io#nvidia/pytorch:24.05-py3",
        "--container-mounts=/runs/r1:/runs/r1,/home/u/proj:/home/u/proj,/data:/data:ro",
        "--container-workdir=/home/u/proj",
        "--no-container-mount-home",
        "--container-env=HF_TOKEN",
    ]
    # The ranks are not wrapped again: the agent already runs inside the container.
    assert _plan("pyxis").rank_argv(["python", "-u", "train.py"]) == ["python", "-u", "train.py"]


def test_pyxis_agents_srun_runs_the_images_python(monkeypatch: pytest.MonkeyPatch) -> None:
    from aitrain.launcher.backends.slurm import SlurmBackend
    from aitrain.launcher.environment import SlurmEnvironment

    backend = SlurmBackend(environ={})
    spec = SimpleNamespace(container=_plan("pyxis"), run_dir=RUN)
    slurm = SimpleNamespace(nnodes=2)
    srun = backend._agents_srun(spec, slurm)  # type: ignore[arg-type]
    assert srun[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--job-name=aitrain-agents"]
    assert "--container-image=nvcr.io#nvidia/pytorch:24.05-py3" in srun
    assert srun[-5:] == ["python", "-m", "aitrain.launcher.agent", "--slurm", "/runs/r1/agents.json"]
    assert SlurmEnvironment  # the real allocation path is the same function


def test_apptainer_wraps_each_rank_with_its_binds_and_gpus() -> None:
    assert _plan("apptainer", image="/img/pt.sif", gpus=True).rank_argv(["python", "-u", "train.py"]) == [
        "apptainer", "exec", "--nv", "--bind=/runs/r1:/runs/r1,/home/u/proj:/home/u/proj,/data:/data:ro",
        "--pwd=/home/u/proj", "/img/pt.sif", "python", "-u", "train.py"]


def test_podman_rank_command_shares_host_network_and_passes_env_by_name() -> None:
    argv = _plan("podman", image="localhost/img", gpus=True, rdma=True).rank_argv(
        ["python", "-u", "train.py"], ["NCCL_SOCKET_IFNAME", "AITRAIN_RUN_DIR", "GLOO_SOCKET_IFNAME"], node_rank=1)
    head = argv[:argv.index("localhost/img")]
    assert argv[argv.index("localhost/img") + 1:] == ["python", "-u", "train.py"]
    assert head[:6] == ["podman", "run", "--rm", "--init", "--network=host", "--ipc=host"]
    assert "--label=aitrain.job=aitrain-x-1234abcd.1" in head
    assert {"--device=nvidia.com/gpu=all", "--device=/dev/infiniband", "--ulimit=memlock=-1:-1"} <= set(head)
    assert "--volume=/data:/data:ro" in head and "--workdir=/home/u/proj" in head
    env = [a.split("=", 1)[1] for a in head if a.startswith("--env=")]
    # torch's rank variables, the tuned env and the user's names; never values (secrets stay off argv).
    assert {"RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_*", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
            "HF_TOKEN"} <= set(env)
    assert "AITRAIN_RUN_DIR" not in env and "AITRAIN_*" in env  # covered by the prefix


def test_ray_rank_actors_get_the_image_over_the_jobs_runtime_env() -> None:
    from aitrain.launcher.backends.ray.group import actor_options

    opts = SimpleNamespace(cpus_per_worker=1.0, gpus_per_worker=0.0, resources_per_worker={},
                           runtime_env={"env_vars": {"A": "1"}})
    got = actor_options(opts, SimpleNamespace(container=_plan("ray", image="rayproject/ray:2.60.0-py311")))
    assert got["runtime_env"] == {"env_vars": {"A": "1"}, "image_uri": "rayproject/ray:2.60.0-py311"}
    assert "runtime_env" not in actor_options(opts, SimpleNamespace(container=None))


def test_a_ranks_podman_run_is_put_under_the_jobs_cgroup() -> None:
    v1 = "4:memory:/user.slice/aitrain/aitrain-r1\n3:cpuset:/user.slice/aitrain/aitrain-r1\n"
    args = ["podman", "run", "--rm", "img", "python"]
    assert insert_cgroup_parent(args, v1) == ["podman", "run", "--cgroup-parent=/user.slice/aitrain/aitrain-r1",
                                              "--rm", "img", "python"]
    assert insert_cgroup_parent(args, "0::/aitrain/j\n")[2] == "--cgroup-parent=/aitrain/j"


@pytest.mark.parametrize(("override", "error"), [
    ("container.runtime=docker", "container.runtime='docker' is not one of auto, podman, pyxis, apptainer"),
    ("container.runtime=pyxis", "container.runtime=pyxis needs backend=slurm"),
    ("container.mounts=[/nonexistent-src:/x]", "container.mounts: /nonexistent-src does not exist on this host"),
    ("container.mounts=[/tmp:relative]",
     "container.mounts: '/tmp:relative': the path inside the container must be absolute"),
    ("container.env=[bad-name]", "container.env: 'bad-name' is not an environment variable name"),
])
def test_bad_container_settings_are_one_line_before_anything_starts(override: str, error: str,
                                                                      tmp_path: Path) -> None:
    r = run_aitrain(["launch", "container.image=some/img", override, "dry_run=true", "fabric=off"], tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"aitrain: error: {error}" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_runtime_that_is_not_installed_is_named(tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    r = run_aitrain(["launch", "container.image=some/img", "container.runtime=podman", "dry_run=true",
                     "fabric=off"], tmp_path, env={"PATH": str(bare)})
    assert r.returncode == 2, r.stderr
    assert "aitrain: error: container.runtime=podman: `podman` is not installed or not on PATH" in r.stderr
    r = run_aitrain(["launch", "container.image=some/img", "dry_run=true", "fabric=off"], tmp_path,
                    env={"PATH": str(bare)})
    assert "aitrain: error: container.image is set, but no container runtime was found" in r.stderr, r.stderr


# -- real Podman ------------------------------------------------------------------------------

WHY = podman_unavailable()
podman = pytest.mark.skipif(bool(WHY), reason=WHY)

SCRIPT = """\
import os, sys, time
rank = int(os.environ["RANK"])
cg = open("/proc/self/cgroup").read()
print(f"rank {rank} container={os.path.exists('/run/.containerenv')} "
      f"gloo={os.environ.get('GLOO_SOCKET_IFNAME')} cpus={sorted(os.sched_getaffinity(0))} "
      f"jobcg={'/aitrain/' in cg} secret={os.environ.get('MY_SECRET')} home_env={os.environ.get('HOST_ONLY')}",
      flush=True)
mode = os.environ.get("MODE", "ok")
if mode == "fail" and rank == 1:
    time.sleep(1)
    raise SystemExit("rank 1 fails on purpose")
if mode in ("fail", "sleep"):
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    if WHY:
        pytest.skip(WHY)
    return podman_image(tmp_path_factory.mktemp("image"))


@pytest.fixture
def cenv(tmp_path: Path) -> dict[str, str]:
    """Podman's settings for this sandbox and a private state dir (the image check's cache)."""
    env = {**podman_env(tmp_path / "podman"), "XDG_STATE_HOME": str(tmp_path / "state")}
    yield env
    assert podman_containers(env) == [], "a container was left behind"


def _container(image: str) -> list[str]:
    return [f"container.image={image}", "container.python=host"]


@podman
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_built_in_job_runs_in_the_image_and_is_recorded(image: str, cenv: dict[str, str],
                                                            tmp_path: Path) -> None:
    r = run_aitrain(["launch", *_container(image), "train.steps=4", "checkpoint.every_n_steps=2",
                     "model.n_layer=1", "model.d_model=32", "train.log_every=2"], tmp_path, env=cenv)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step 4/4" in r.stdout + r.stderr
    run_dir = next(p.parent for p in (tmp_path / "outputs").glob("*/*/job.yaml"))
    assert len([ln for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]) == 4
    assert (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("aitrain").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["container.image"] == image
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 4
    # A second launch finds the image check in its cache: no extra container at plan time.
    checks = json.loads((tmp_path / "state" / "aitrain" / "container-checks.json").read_text())
    assert len(checks) == 1


@podman
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_tuned_env_binding_and_cgroup_reach_the_ranks_and_the_dry_run_shows_the_command(
        image: str, cenv: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(SCRIPT)
    args = ["launch", *_container(image), "tracking=none", "binding=core", "resources.cgroup=true",
            "container.env=[MY_SECRET]", "--", "probe.py"]
    env = {**cenv, "MY_SECRET": "s3cr3t", "HOST_ONLY": "not-passed"}
    dry = run_aitrain([*args[:-2], "dry_run=true", *args[-2:]], tmp_path, env=env)
    assert dry.returncode == 0, dry.stderr
    line = next(ln for ln in dry.stdout.splitlines() if "each rank:" in ln)
    assert "podman run --rm --init --network=host --ipc=host" in line and image in line
    assert "--env=MY_SECRET" in line and "s3cr3t" not in dry.stdout
    r = run_aitrain(args, tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    for rank in (0, 1):
        line = next(ln for ln in out.splitlines() if f"rank {rank} container=" in ln)
        assert "container=True gloo=lo" in line and "jobcg=True" in line, line
        assert "secret=s3cr3t home_env=None" in line, line  # named env passes, the rest of the host's does not
    cpus = {ln.split("cpus=")[1].split(" ")[0] for ln in out.splitlines() if "container=True" in ln}
    if (os.cpu_count() or 1) >= 2:
        assert len(cpus) == 2, out  # each rank its own CPU (binding=core), inside the container too


@podman
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failing_rank_takes_the_job_down_and_leaves_no_container(image: str, cenv: dict[str, str],
                                                                   tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(SCRIPT)
    t0 = time.monotonic()
    r = run_aitrain(["launch", *_container(image), "tracking=none", "fabric=off", "container.env=[MODE]", "--",
                     "probe.py"], tmp_path, env={**cenv, "MODE": "fail"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "aitrain: error: the job failed: rank 1" in r.stderr and "rank 1 fails on purpose" in r.stderr
    assert "rank 0" in r.stderr and "stopped" in r.stderr, r.stderr  # stopped by aitrain, not a failure of its own
    assert time.monotonic() - t0 < 60


@podman
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_stops_every_container(image: str, cenv: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(SCRIPT)
    proc = subprocess.Popen(aitrain_argv() + ["launch", *_container(image), "tracking=none", "fabric=off",
                                              "container.env=[MODE]", "--", "probe.py"],
                            cwd=tmp_path, env={**os.environ, **cenv, "MODE": "sleep"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until(lambda: len([c for c in podman_containers(cenv) if "Up" in c]) == 2, 120, "two rank containers")
        time.sleep(1)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert out.count("aitrain: error: interrupted by SIGINT; all ranks were stopped") == 1, out
    assert "Traceback" not in out and took < 15, (took, out)


@podman
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_image_that_cannot_run_the_job_is_refused_before_ranks_start(image: str, cenv: dict[str, str],
                                                                         tmp_path: Path) -> None:
    missing = run_aitrain(["launch", "container.image=localhost/no-such-image:1", "dry_run=true", "fabric=off"],
                          tmp_path, env=cenv)
    assert missing.returncode == 2
    assert ("aitrain: error: container.image=localhost/no-such-image:1: no such image in podman's storage"
            in missing.stderr), missing.stderr
    assert "podman pull localhost/no-such-image:1" in missing.stderr
    # The image has python3.11 (without torch) and no `python3`.
    nopy = run_aitrain(["launch", f"container.image={image}", "fabric=off", "tracking=none"], tmp_path, env=cenv)
    assert nopy.returncode == 2, nopy.stdout + nopy.stderr
    assert f"aitrain: error: container.image={image}: there is no python3 in the image" in nopy.stderr
    assert "container.python=" in nopy.stderr
    notorch = run_aitrain(["launch", f"container.image={image}", "container.python=python3.11", "fabric=off",
                           "tracking=none"], tmp_path, env=cenv)
    assert notorch.returncode == 2, notorch.stdout + notorch.stderr
    assert f"aitrain: error: container.image={image}: its Python cannot run the job" in notorch.stderr
    assert "No module named 'torch'" in notorch.stderr and "container.python=host" in notorch.stderr
    assert not list((tmp_path / "outputs").glob("*/*/logs/rank*.log"))  # no rank started
