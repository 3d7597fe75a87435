"""Secrets never land in what aitrain writes or prints: eleven kinds of secret planted in launches
(env by name, URI credentials, a ``?token=`` query, program arguments, Ray's runtime_env), then
every file under the run root, the MLflow server's store and the console searched for each
value, and the run dir's modes checked (0700 directories, 0600 files). The same for a local, a
Slurm and a Ray Jobs API dry run; the sbatch script and the Jobs API submission carry the
values in the environment, and the re-run gets them back."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aitrain_testing import MlflowServer, run_aitrain

pytestmark = pytest.mark.timeout(240)

# name -> value; each value is unique text, so finding it anywhere is a leak.
ENV_SECRETS = {
    "DB_PASSWORD": "dbpw-S3cr3t-0001",
    "HF_TOKEN": "hf_S3cr3t0002xx",
    "AWS_SECRET_ACCESS_KEY": "aws-S3cr3t-0003",
    "WANDB_API_KEY": "wandb-S3cr3t-0004",
    "GITHUB_TOKEN": "ghp_S3cr3t0005xx",
}
URI_PASSWORD = "uripw-S3cr3t-0006"
QUERY_TOKEN = "qtok-S3cr3t-0007"
ARG_PASSWORD = "argpw-S3cr3t-0008"
ARG_KEY = "argkey-S3cr3t-0009"
REPO_TOKEN = "ghs_S3cr3t0010xx"
RAY_KEY = "sk-S3cr3t-0011"
# Not secret by name: the value's ?token= and the URI's user:token@ are.
DATA_URL = f"https://data.example/shard?token={QUERY_TOKEN}&part=1"
CODE_REPO = f"https://x-access-token:{REPO_TOKEN}@github.com/org/repo.git"
SECRETS = [*ENV_SECRETS.values(), URI_PASSWORD, QUERY_TOKEN, ARG_PASSWORD, ARG_KEY, REPO_TOKEN, RAY_KEY]

JOB = f"""\
import os, sys
expected = {json.dumps({**ENV_SECRETS, "DATA_URL": DATA_URL, "CODE_REPO": CODE_REPO})}
wrong = [k for k, v in expected.items() if os.environ.get(k) != v]
assert not wrong, "ranks did not get the real values of " + ", ".join(wrong)
assert "--password={ARG_PASSWORD}" in sys.argv and sys.argv[sys.argv.index("--api-key") + 1] == "{ARG_KEY}"
if os.environ.get("RANK") == "0":
    import mlflow  # the program's own MLflow logging, into the launch's run: MLflow prints its "View run" line
    mlflow.start_run()
    mlflow.log_metric("own_metric", 1.0)
    mlflow.end_run()
print("the real values reached the rank", flush=True)
"""


def overrides(uri: str) -> list[str]:
    return [*(f"fabric.env.{k}={v}" for k, v in ENV_SECRETS.items()),
            f"fabric.env.DATA_URL='{DATA_URL}'", f"fabric.env.CODE_REPO={CODE_REPO}", f"tracking.uri={uri}"]


PROGRAM = ["--", "job.py", f"--password={ARG_PASSWORD}", "--api-key", ARG_KEY, "--lr", "0.1"]


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def file_leaks(root: Path) -> dict[str, list[str]]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            hits = leaks(path.read_bytes().decode("utf-8", "replace"))
            if hits:
                found[str(path.relative_to(root))] = hits
    return found


def loose_modes(root: Path) -> list[str]:
    """Entries under ``root`` (and root) that others could read: directories not 0700, files not 0600."""
    bad = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode & 0o777
        want = 0o700 if path.is_dir() else 0o600
        if not path.is_symlink() and mode != want:
            bad.append(f"{oct(mode)} {path.relative_to(root.parent)}")
    return bad


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    # The launch reaches it as http://user:password@127.0.0.1:port (the server has no auth and
    # ignores the credentials). It starts while the first tests run.
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.launch()
    try:
        yield srv
    finally:
        srv.stop()


def project(tmp_path: Path) -> Path:
    (tmp_path / "job.py").write_text(JOB)
    return tmp_path


# -- dry runs: nothing printed ------------------------------------------------------------------


def test_local_dry_run_prints_no_secret_even_with_a_100k_character_value(tmp_path: Path) -> None:
    # The old redaction was quadratic: a 40,000-character value took 34 s, 100,000 over 120 s.
    huge, huge_secret = "ab.c-" * 20_000, "S3cr3t-" + "zq.c-" * 20_000
    args = ["launch", "dry_run=true", "fabric=off", *overrides(f"http://user:{URI_PASSWORD}@127.0.0.1:9"),
            f"fabric.env.BIG_VALUE={huge}", f"fabric.env.BIG_TOKEN={huge_secret}", *PROGRAM]
    r = run_aitrain(args, project(tmp_path), timeout=30)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not leaks(r.stdout + r.stderr) and huge_secret[:5000] not in r.stdout
    assert "DB_PASSWORD=***" in r.stdout and "?token=***" in r.stdout and "--password=***" in r.stdout
    assert huge in r.stdout  # an innocent value is shown whole
    r = run_aitrain([*args[:1], "--json", *args[1:]], tmp_path, timeout=30)
    assert r.returncode == 0 and not leaks(r.stdout + r.stderr)
    assert not (tmp_path / "outputs").exists()  # a dry run writes nothing


def test_slurm_dry_run_and_its_sbatch_script_show_no_secret(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "backend=slurm", "dry_run=true", *overrides(f"http://u:{URI_PASSWORD}@mlflow:5000"),
                     *PROGRAM], project(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not leaks(r.stdout + r.stderr)
    script = r.stdout.split("--- sbatch script ---\n", 1)[1]
    assert ': "${AITRAIN_SECRET_ARGS:?' in script  # resubmitted by hand, it stops instead of using ***
    exec_line = next(line for line in script.splitlines() if line.startswith("exec "))
    assert "++fabric.env.DB_PASSWORD=***" in shlex.split(exec_line)


def test_ray_jobs_api_dry_run_shows_no_secret(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "backend=ray", "backend.address=http://127.0.0.1:8265", "dry_run=true",
                     *overrides(f"https://u:{URI_PASSWORD}@mlflow"),
                     f"backend.runtime_env.env_vars.OPENAI_API_KEY={RAY_KEY}", *PROGRAM], project(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not leaks(r.stdout + r.stderr)
    assert '"OPENAI_API_KEY": "***"' in r.stdout and "entrypoint:" in r.stdout


# -- submissions: the values travel in the environment, the re-run gets them back -----------------


def relaunch_spec(tmp_path: Path, backend: Any, extra: list[str]) -> Any:
    from aitrain.launcher.config import JobConfig
    from aitrain.launcher.job import JobSpec, relaunch_argv

    cfg = JobConfig()
    over = [*overrides(f"http://u:{URI_PASSWORD}@mlflow:5000"), *extra]
    program = [str(tmp_path / "job.py"), *PROGRAM[2:]]
    replace, default = backend.relaunch_settings(cfg)
    relaunch = relaunch_argv(over, python="python", run_dir=tmp_path / "run", replace=replace, default=default,
                             program=program)
    return JobSpec(name="aitrain-x", run_dir=tmp_path / "run", argv=("python", "-u", *program), nnodes=1,
                   nproc_per_node=1, config=cfg, overrides=tuple(over), relaunch=tuple(relaunch),
                   env={k: v for k, v in ENV_SECRETS.items()})


def test_sbatch_submission_passes_secrets_in_sbatch_environment(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from aitrain.launcher.backends.slurm import SlurmBackend
    from aitrain.launcher.redact import SECRET_ARGS_ENV, restore_secrets

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    calls: list[tuple[list[str], dict[str, Any]]] = []

    def runner(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append((argv, kw))
        return subprocess.CompletedProcess(argv, 0, stdout="77;c\n", stderr="")

    backend = SlurmBackend(runner=runner, environ={}, extra_sbatch=["--export=NONE"])
    spec = relaunch_spec(tmp_path, backend, [])
    request = backend.dryrun(spec)
    assert not leaks(str(request))
    backend.submit(request)
    argv, kw = calls[0]
    env = kw["env"]
    assert set(env) == {SECRET_ARGS_ENV} and not leaks(" ".join(argv))
    script = Path(argv[-1])
    assert not file_leaks(spec.run_dir) and loose_modes(spec.run_dir) == [f"{oct(0o700)} run/aitrain.sbatch"]
    text = script.read_text()
    assert f"#SBATCH --export={SECRET_ARGS_ENV}" in text  # the user's --export=NONE still passes them
    # The batch job's `aitrain launch` gets the values back, in their places.
    words = shlex.split(next(x for x in text.splitlines() if x.startswith("exec "))[len("exec "):])
    assert restore_secrets(words, dict(env)) == list(spec.relaunch)
    # Without that environment the script stops at its guard, before anything starts.
    probe = text.replace("exec ", "printf '%s\\n' ", 1)
    bare = {k: v for k, v in os.environ.items() if k != SECRET_ARGS_ENV}
    r = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=bare)
    assert r.returncode != 0 and f"{SECRET_ARGS_ENV}: is not set" in r.stderr
    r = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env={**bare, **env})
    assert r.returncode == 0 and not leaks(r.stdout)


def test_ray_jobs_api_submission_passes_secrets_in_runtime_env(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from aitrain.launcher.backends.ray import RayBackend
    from aitrain.launcher.redact import restore_secrets

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    submitted: dict[str, Any] = {}

    class Client:
        def submit_job(self, **kw: Any) -> str:
            submitted.update(kw)
            return "raysubmit_1"

    runtime_env = {"env_vars": {"OPENAI_API_KEY": RAY_KEY}}
    backend = RayBackend(jobs_client=lambda _: Client(), environ={}, address="http://127.0.0.1:8265",
                         runtime_env=runtime_env)
    spec = relaunch_spec(tmp_path, backend, [f"backend.runtime_env.env_vars.OPENAI_API_KEY={RAY_KEY}"])
    request = backend.dryrun(spec)
    assert not leaks(str(request))
    backend.submit(request)
    assert not leaks(submitted["entrypoint"])
    env_vars = submitted["runtime_env"]["env_vars"]
    assert env_vars["OPENAI_API_KEY"] == RAY_KEY  # the user's runtime_env, as given
    assert restore_secrets(shlex.split(submitted["entrypoint"]), dict(env_vars)) == list(spec.relaunch)


def test_a_rerun_takes_its_secret_arguments_from_the_environment(tmp_path: Path) -> None:
    """`aitrain launch` with the masked arguments and AITRAIN_SECRET_ARGS composes the real values."""
    from aitrain.launcher.redact import split_secrets

    masked, env = split_secrets(["launch", f"fabric.env.HF_TOKEN={ENV_SECRETS['HF_TOKEN']}", "--cfg", "job"])
    assert not leaks(" ".join(masked))
    r = run_aitrain(masked, tmp_path, env=env, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"HF_TOKEN: {ENV_SECRETS['HF_TOKEN']}" in r.stdout  # --cfg job prints the composed config


# -- real launches: nothing written, 0700/0600 ----------------------------------------------------


def test_builtin_job_runs_with_a_masked_job_yaml(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "fabric=off", "nproc_per_node=1", "train.steps=1", "tracking.enabled=false",
                     *overrides("")[:-1]], tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not leaks(r.stdout + r.stderr)
    root = tmp_path / "outputs"
    assert not file_leaks(root) and not loose_modes(root)
    job_yaml = next(root.rglob("job.yaml")).read_text()
    assert "DB_PASSWORD: '***'" in job_yaml and "?token=***" in job_yaml


def test_local_launch_writes_and_prints_no_secret(tmp_path: Path, server: MlflowServer) -> None:
    server.wait_up()
    uri = f"http://mlflowuser:{URI_PASSWORD}@127.0.0.1:{server.port}"
    r = run_aitrain(["launch", "fabric=off", "nproc_per_node=2", "tracking.system_metrics_interval_s=0.5",
                     *overrides(uri), *PROGRAM], project(tmp_path), timeout=150)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert "[rank0]:the real values reached the rank" in r.stdout
    console = r.stdout + r.stderr
    assert not leaks(console), console[-3000:]
    # MLflow's own "View run" line, without the credentials (the launcher's; the program's is not printed).
    assert "View run ddp-" in r.stdout and f"at: http://127.0.0.1:{server.port}/#/experiments/" in r.stdout
    root = tmp_path / "outputs"
    assert not file_leaks(root)
    assert not file_leaks(server.root)  # params, tags, documents as MLflow stores them
    assert not loose_modes(root)
    run_dir = next(root.rglob("tracking.json")).parent
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "job.yaml", "tracking.json"):
        assert "***" in (run_dir / name).read_text(), name
    state = json.loads((run_dir / "tracking.json").read_text())
    assert state["uri"] == f"http://***@127.0.0.1:{server.port}" and state["finished"]


def test_a_sync_finds_the_credentials_the_record_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from aitrain.launcher.tracking import recorded_uri

    real = f"http://u:{URI_PASSWORD}@h:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", real)
    assert recorded_uri("http://***@h:5000") == real
    assert recorded_uri("http://***@h:5000", given=real) == real
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert recorded_uri("http://***@h:5000") == "http://h:5000"  # MLflow's MLFLOW_TRACKING_USERNAME/_PASSWORD
    assert recorded_uri("sqlite:////x/mlflow.db") == "sqlite:////x/mlflow.db"
