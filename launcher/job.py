"""The job, planned once: a frozen, backend-neutral spec of what to run and where its files go.

:func:`plan_job` checks the composed config (world size, parallel degrees, strategy, script,
resources) and turns it into a :class:`JobSpec`. Planning writes nothing: the run directory
is only named here; :func:`prepare_run_dir` creates it when the job really runs.

The spec also holds the one command that re-runs this job where a scheduler starts it
(:attr:`JobSpec.relaunch`: a Slurm batch script, the Ray Jobs API, a detached process):
``aitrain launch`` with the user's overrides byte for byte and the run directory pinned.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aitrain.errors import AitrainError, ConfigError
from aitrain.launcher.config import JobConfig
from aitrain.launcher.resources import ResourceRequest

if TYPE_CHECKING:
    from aitrain.launcher.backends.api import Backend

CONFIG_FILE = "job.yaml"


@dataclass(frozen=True)
class JobSpec:
    """Everything a backend needs to plan and start a job; no backend specifics."""

    name: str
    run_dir: Path
    argv: tuple[str, ...]  # the program every rank runs (argv[0] is the executable)
    nnodes: int
    nproc_per_node: int
    config: JobConfig = field(default_factory=JobConfig)
    # The built-in job arms its own parent-death signal; a user script needs the
    # trampoline (launcher/supervise.py) for that, at the cost of one exec per rank.
    needs_trampoline: bool = True
    env: Mapping[str, str] = field(default_factory=dict)  # extra env for every rank
    env_reasons: Mapping[str, str] = field(default_factory=dict)  # why each env value was set
    resources: ResourceRequest = field(default_factory=ResourceRequest)  # binding, cgroup, profiler
    overrides: tuple[str, ...] = ()  # the user's Hydra overrides, as given
    relaunch: tuple[str, ...] = ()  # `aitrain launch` of this job where a scheduler starts it
    config_yaml: str = ""  # the resolved config the ranks read (<run_dir>/job.yaml)
    resolved: Mapping[str, Any] = field(default_factory=dict)  # the same as a dict (tracking params)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def config_file(self) -> Path:
        return self.run_dir / CONFIG_FILE


def needs_trampoline(cfg: JobConfig) -> bool:
    # The trampoline also applies per-rank binding, the cgroup and the profiler.
    return bool(cfg.script) or cfg.binding != "none" or cfg.resources.cgroup or cfg.profile != "none"


def rank_program(cfg: JobConfig, config_file: Path) -> list[str]:
    """argv each rank runs: the user's script, or the built-in training job."""
    if cfg.script:
        return [sys.executable, "-u", cfg.script, *cfg.script_args]
    return [sys.executable, "-u", "-m", "aitrain.launcher.train", "--config", str(config_file)]


def override_key(override: str) -> str:
    """``+train.lr=1`` -> ``train.lr``."""
    return override.split("=", 1)[0].lstrip("+~")


def relaunch_argv(overrides: Sequence[str], *, python: str, run_dir: Path,
                  replace: Mapping[str, str] | None = None, default: Mapping[str, str] | None = None
                  ) -> list[str]:
    """``aitrain launch`` of the same job, as a scheduler re-runs it: the user's overrides byte
    for byte (but ``dry_run``, which is how the user looked at the plan, and ``hydra.run.dir``),
    then the run directory pinned, then the backend's ``replace`` settings (always) and its
    ``default`` settings (unless the user set them)."""
    replace, default = dict(replace or {}), dict(default or {})
    for o in overrides:
        if any(c in o for c in "\n\r\x00"):
            raise ConfigError(f"override {o!r} contains a newline", "pass one override per argument")
    drop = {"dry_run", "hydra.run.dir", *replace}
    kept = [o for o in overrides if override_key(o) not in drop]
    given = {override_key(o) for o in kept}
    argv = [python, "-m", "aitrain.launcher.cli", "launch", *kept, f"hydra.run.dir={run_dir}"]
    argv += [f"{k}={v}" for k, v in replace.items()]
    argv += [f"{k}={v}" for k, v in default.items() if k not in given]
    return argv


def check_job(job: JobConfig) -> None:
    """What can be checked before anything starts (no torch import)."""
    world = job.nnodes * job.nproc_per_node
    if world < 1:
        raise ConfigError(f"nnodes={job.nnodes} x nproc_per_node={job.nproc_per_node} gives no ranks",
                          "set nnodes and nproc_per_node to 1 or more")
    if job.fabric.on_error not in ("fail", "warn"):
        raise ConfigError(f"fabric.on_error={job.fabric.on_error!r} is not one of fail, warn",
                          "fabric.on_error=fail stops the launch on fabric errors; warn only reports them")
    from aitrain.strategies.options import StrategyOptions
    from aitrain.strategies.plan import ParallelPlan
    from aitrain.strategies.rules import preflight

    # Degrees, the strategy and its options, the built-in model against TP/PP, the batch splits.
    plan = ParallelPlan.resolve(world_size=world, **vars(job.parallel))
    preflight(job.strategy.name, plan, StrategyOptions.from_config(job.strategy, job.pp),
              model=None if job.script else job.model, train=None if job.script else job.train)
    if job.script and not Path(job.script).is_file():
        raise AitrainError(f"script={job.script} does not exist (looked in {Path.cwd()})",
                           "give a path to a torchrun-compatible Python script")


def plan_job(job: JobConfig, *, resolved: Mapping[str, Any], config_yaml: str, overrides: Sequence[str],
             backend: Backend) -> JobSpec:
    """The checked, frozen spec of one composed job. Writes nothing."""
    check_job(job)
    resources = ResourceRequest.from_config(job)
    run_dir = Path(job.run_dir).resolve()
    config_file = run_dir / CONFIG_FILE
    env = {
        "AITRAIN_RUN_DIR": str(run_dir),
        "AITRAIN_METRICS_FILE": str(run_dir / "metrics.jsonl"),
        "AITRAIN_PROGRESS_DIR": str(run_dir / "progress"),
        "AITRAIN_STRATEGY": job.strategy.name,
        "PYTHONUNBUFFERED": "1",
    }
    reasons: dict[str, str] = {}
    for k, v in job.fabric.env.items():
        env[str(k)] = str(v)
        reasons[str(k)] = "user-set (fabric.env)"
    replace, default = backend.relaunch_settings(job)
    python = getattr(job.backend, "python", None) or sys.executable
    return JobSpec(
        name=f"aitrain-{run_dir.name}",
        run_dir=run_dir,
        argv=tuple(rank_program(job, config_file)),
        nnodes=job.nnodes,
        nproc_per_node=job.nproc_per_node,
        config=job,
        needs_trampoline=needs_trampoline(job),
        env=env,
        env_reasons=reasons,
        resources=resources,
        overrides=tuple(overrides),
        relaunch=tuple(relaunch_argv(overrides, python=python, run_dir=run_dir, replace=replace, default=default)),
        config_yaml=config_yaml,
        resolved=dict(resolved),
    )


def prepare_run_dir(spec: JobSpec) -> None:
    """Create the run directory for a job that runs here: the config the ranks read, and an
    earlier attempt's metrics (a requeued Slurm job) kept apart, so this attempt's MLflow
    run gets only its own steps."""
    from aitrain.launcher.util import write_atomic

    spec.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(spec.config_file, spec.config_yaml)
    if spec.metrics_file.exists():
        spec.metrics_file.rename(spec.metrics_file.with_name(f"metrics-{int(time.time())}.jsonl"))
