"""The sbatch script generator: golden files, quoting, and bad values."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from aitrain.errors import ConfigError
from aitrain.launcher.backends.slurm import SlurmBackend, parse_handle
from aitrain.launcher.backends.slurm.sbatch import render_sbatch as render_script
from aitrain.launcher.config import JobConfig, SlurmBackendConfig
from aitrain.launcher.job import JobSpec, relaunch_argv

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"


def spec(nnodes: int = 2, run_dir: str = "/shared/runs/2026-01-01/12-00-00", overrides: list[str] | None = None,
         python: str = "python") -> JobSpec:
    cfg = JobConfig()
    cfg.strategy.name = "fsdp"
    overrides = list(overrides or [])
    # What plan_job puts in the spec for backend=slurm: the relaunch command of the batch job.
    relaunch = relaunch_argv(overrides, python=python, run_dir=Path(run_dir),
                             default=SlurmBackend(environ={}).relaunch_settings(cfg)[1])
    return JobSpec(name="aitrain-x", run_dir=Path(run_dir), argv=("python",), nnodes=nnodes, nproc_per_node=8,
                   config=cfg, overrides=tuple(overrides), relaunch=tuple(relaunch))


def render_sbatch(opts: SlurmBackendConfig, job: JobSpec | None = None, *, overrides: list[str], cwd: str,
                  python: str, nnodes: int = 2) -> str:
    """The script for a job planned with these overrides (as `aitrain launch` plans it)."""
    return render_script(opts, spec(nnodes=nnodes, overrides=overrides, python=python), cwd=cwd)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("AITRAIN_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; AITRAIN_UPDATE_GOLDEN=1 rewrites it"


def test_golden_full_options() -> None:
    opts = SlurmBackendConfig(partition="gpu", account="ml", qos="high", time="04:00:00", gpus_per_node=8,
                              cpus_per_node=96, mem="900G", constraint="h100", exclusive=True,
                              extra_sbatch=["--reservation=train", "mail-type=END"])
    text = render_sbatch(opts, overrides=["+strategy=fsdp", "backend=slurm", "nnodes=2", "backend.partition=gpu"],
                         cwd="/home/me/project", python="/opt/venv/bin/python")
    check_golden("sbatch_full.sh", text)


def test_golden_minimal() -> None:
    text = render_sbatch(SlurmBackendConfig(), overrides=["backend=slurm"], nnodes=1,
                         cwd="/home/me", python="/usr/bin/python3")
    check_golden("sbatch_minimal.sh", text)


NASTY = [
    "tracking.run_name='a b'",
    "tracking.run_name=$(touch /tmp/aitrain-pwned)",
    "tracking.run_name=`id`; rm -rf /",
    'tracking.run_name="quoted \'single\' and \\"double\\""',
    "fabric.env.X=a&&b|c>d<e",
]


@pytest.mark.parametrize("override", NASTY)
def test_overrides_reach_the_job_unchanged_and_execute_nothing(override: str, tmp_path: Path) -> None:
    text = render_sbatch(SlurmBackendConfig(), overrides=[override], cwd=str(tmp_path / "a dir; $(x)"),
                         python="/usr/bin/python3")
    exec_line = next(line for line in text.splitlines() if line.startswith("exec "))
    argv = shlex.split(exec_line[len("exec "):])
    assert override in argv
    cd_line = next(line for line in text.splitlines() if line.startswith("cd "))
    assert shlex.split(cd_line)[1] == str(tmp_path / "a dir; $(x)")
    # bash parses the exec line into exactly those words, running nothing.
    probe = exec_line.replace("exec ", "printf '%s\\n' ", 1)
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout
    assert override in out.splitlines()
    assert not Path("/tmp/aitrain-pwned").exists()


@pytest.mark.parametrize("field,value", [("partition", "gpu debug"), ("time", "1:00;reboot"),
                                         ("account", "$(id)"), ("job_name", "a'b")])
def test_unsafe_sbatch_values_are_rejected(field: str, value: str) -> None:
    opts = SlurmBackendConfig(**{field: value})
    with pytest.raises(ConfigError, match=field):
        render_sbatch(opts, overrides=[], cwd="/", python="python")


def test_newline_in_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match="newline"):
        render_sbatch(SlurmBackendConfig(), overrides=["a=1\nrm -rf /"], cwd="/", python="python")


def test_user_resume_is_kept() -> None:
    text = render_sbatch(SlurmBackendConfig(), overrides=["resume=none"], cwd="/", python="python")
    assert "resume=auto" not in text and "resume=none" in text


def test_submit_writes_private_script_and_returns_handle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    calls = []

    def runner(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="4242;mycluster\n", stderr="")

    backend = SlurmBackend(runner=runner, environ={})
    s = spec(run_dir=str(tmp_path / "run"))
    req = backend.dryrun(s)
    handle = backend.submit(req)
    assert handle == "slurm://mycluster/4242"
    assert calls[0][:2] == ["sbatch", "--parsable"]
    script = Path(calls[0][2])
    assert script.read_text() == req.script
    assert oct(script.stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "run").stat().st_mode & 0o077) == "0o0"


def test_cancel_is_idempotent() -> None:
    def runner(argv, **kw):
        if argv[:3] == ["scontrol", "show", "job"]:
            return subprocess.CompletedProcess(argv, 0, stdout="JobId=7 JobState=COMPLETED NodeList=n1", stderr="")
        raise AssertionError(f"unexpected {argv}")

    msg = SlurmBackend(runner=runner, environ={}).cancel("slurm://c/7")
    assert "nothing to cancel" in msg


def test_parse_handle() -> None:
    assert parse_handle("slurm://c1/123") == ("c1", "123")
    assert parse_handle("123") == ("", "123")
    with pytest.raises(ConfigError, match="handle"):
        parse_handle("ray://x")
