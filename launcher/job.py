"""The job, planned once: a frozen, backend-neutral spec of what to run and where its files go.

:func:`plan_job` checks the composed config (world size, parallel degrees, strategy, script,
resources) and turns it into a :class:`JobSpec`. Planning writes nothing: the run directory
is only named here; :func:`prepare_run_dir` creates it when the job really runs.

The spec also holds the one command that re-runs this job where a scheduler starts it
(:attr:`JobSpec.relaunch`: a Slurm batch script, the Ray Jobs API, a detached process):
``aitrain launch`` with the user's overrides byte for byte and the run directory pinned.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aitrain.errors import ConfigError
from aitrain.launcher.config import JobConfig
from aitrain.launcher.container import ContainerPlan, job_label, plan_container
from aitrain.launcher.resources import ResourceRequest
from aitrain.launcher.util import PRIVATE_UMASK, USER_UMASK_ENV, user_umask

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
    container: ContainerPlan | None = None  # the image the ranks run in (launcher/container.py)
    env: Mapping[str, str] = field(default_factory=dict)  # extra env for every rank
    env_reasons: Mapping[str, str] = field(default_factory=dict)  # why each env value was set
    resources: ResourceRequest = field(default_factory=ResourceRequest)  # binding, cgroup, profiler
    overrides: tuple[str, ...] = ()  # the user's Hydra overrides, as given
    relaunch: tuple[str, ...] = ()  # `aitrain launch` of this job where a scheduler starts it
    config_yaml: str = ""  # the resolved config the ranks read (<run_dir>/job.yaml)
    resolved: Mapping[str, Any] = field(default_factory=dict)  # the same as a dict (tracking params)
    launch_dir: Path = field(default_factory=Path.cwd)  # where `aitrain launch` was run
    cwd: Path = field(default_factory=Path.cwd)  # where the ranks run: launch_dir, or run_dir (hydra.job.chdir)

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
    return bool(cfg.script or cfg.module) or cfg.binding != "none" or cfg.resources.cgroup or cfg.profile != "none"


def rank_program(cfg: JobConfig, config_file: Path, script_dir: Path | None = None) -> list[str]:
    """argv each rank runs, as torchrun builds it (``python -u SCRIPT ARGS`` or ``python -u -m
    MODULE ARGS``), or the built-in training job. ``script_dir``: the launch directory, when
    the ranks run elsewhere (hydra.job.chdir): a relative script is the one the user meant."""
    if cfg.module:
        return [sys.executable, "-u", "-m", cfg.module, *cfg.script_args]
    if cfg.script:
        script = cfg.script
        if script_dir is not None and not Path(script).is_absolute():
            script = str(script_dir / script)
        return [sys.executable, "-u", script, *cfg.script_args]
    return [sys.executable, "-u", "-m", "aitrain.launcher.train", "--config", str(config_file)]


def user_program(cfg: JobConfig) -> bool:
    return bool(cfg.script or cfg.module)


def local_world_size(value: Any, *, gpus_per_node: int | None = None) -> int:
    """``nproc_per_node`` as torchrun reads it: N, ``cpu`` (the CPUs this process may use),
    ``gpu`` (the CUDA devices; an error without one) or ``auto`` (GPUs if any, else CPUs).
    ``gpus_per_node``: what the scheduler will give each node (Slurm's --gpus-per-node), for
    a plan made away from the nodes."""
    text = str(value).strip().lower()
    if text.lstrip("+-").isdigit():
        return int(text)
    if text == "cpu":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if text in ("gpu", "auto"):
        gpus = gpus_per_node if gpus_per_node is not None else _cuda_device_count()
        if gpus:
            return gpus
        if text == "gpu":
            raise ConfigError("nproc_per_node=gpu, but no CUDA device is visible here (torchrun: "
                              "'Cuda is not available.')",
                              "set nproc_per_node=N, or nproc_per_node=auto (one rank per CPU without a GPU)")
        return local_world_size("cpu")
    raise ConfigError(f"nproc_per_node={value!r} is not a number or one of auto, gpu, cpu",
                      "nproc_per_node=2, or auto (one rank per GPU, else per CPU), gpu, cpu (as torchrun)")


def _cuda_device_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_module(module: str, launch_dir: Path) -> None:
    """The module's top-level package can be found by the ranks' interpreter (as ``python -m``
    would from the launch directory). Only the top level: finding ``a.b`` imports ``a``."""
    top = module.split(".", 1)[0]
    if not top.isidentifier():
        raise ConfigError(f"module={module!r} is not a Python module name", "e.g. -- -m pkg.train --lr 1e-3")
    if top in sys.builtin_module_names:
        return
    if importlib.machinery.PathFinder.find_spec(top, [str(launch_dir), *sys.path[1:]]) is None:
        raise ConfigError(f"module={module}: no module named {top!r} for {sys.executable} "
                          f"(looked in {launch_dir} and the installed packages)",
                          "install the package into this environment, or launch from the directory "
                          f"that contains {top}/")


def override_key(override: str) -> str:
    """``+train.lr=1`` -> ``train.lr``."""
    return override.split("=", 1)[0].lstrip("+~")


def relaunch_argv(overrides: Sequence[str], *, python: str, run_dir: Path,
                  replace: Mapping[str, str] | None = None, default: Mapping[str, str] | None = None,
                  program: Sequence[str] | None = None) -> list[str]:
    """``aitrain launch`` of the same job, as a scheduler re-runs it: the user's overrides byte
    for byte (but ``dry_run``, which is how the user looked at the plan, and ``hydra.run.dir``),
    then the run directory pinned, then the backend's ``replace`` settings (always) and its
    ``default`` settings (unless the user set them), then ``-- PROGRAM ARGS`` (the user's
    program in torchrun's shape, whether it was given that way or as ``script=``)."""
    replace, default = dict(replace or {}), dict(default or {})
    drop = {"dry_run", "hydra.run.dir", *replace, *(PROGRAM_KEYS if program else ())}
    kept = [o for o in overrides if override_key(o) not in drop]
    for o in kept:
        if any(c in o for c in "\n\r\x00"):
            raise ConfigError(f"override {o!r} contains a newline", "pass one override per argument")
    given = {override_key(o) for o in kept}
    argv = [python, "-m", "aitrain.launcher.cli", "launch", *kept, f"hydra.run.dir={run_dir}"]
    argv += [f"{k}={v}" for k, v in replace.items()]
    argv += [f"{k}={v}" for k, v in default.items() if k not in given]
    if program:
        for a in program:
            if "\x00" in a:
                raise ConfigError(f"argument {a!r} of the program contains a NUL byte", "remove it")
        argv += ["--", *program]
    return argv


PROGRAM_KEYS = ("script", "module", "script_args")


def program_argv(job: JobConfig, anchor: Path | None = None) -> list[str] | None:
    """``[SCRIPT | -m MODULE, ARGS...]``: the user's program as typed after ``--``; None for the
    built-in job. ``anchor``: a relative script is given as the file in that directory (a re-run
    may start elsewhere: a Ray Jobs API entrypoint runs in the cluster's own directory)."""
    if job.module:
        return ["-m", job.module, *job.script_args]
    if job.script:
        script = job.script
        if anchor is not None and not Path(script).is_absolute():
            script = str(anchor / script)
        return [script, *job.script_args]
    return None


def check_job(job: JobConfig, launch_dir: Path | None = None) -> None:
    """What can be checked before anything starts (no torch import)."""
    launch_dir = launch_dir or Path.cwd()
    world = job.nnodes * job.nproc_per_node
    if world < 1:
        raise ConfigError(f"nnodes={job.nnodes} x nproc_per_node={job.nproc_per_node} gives no ranks",
                          "set nnodes and nproc_per_node to 1 or more")
    if job.fabric.on_error not in ("fail", "warn"):
        raise ConfigError(f"fabric.on_error={job.fabric.on_error!r} is not one of fail, warn",
                          "fabric.on_error=fail stops the launch on fabric errors; warn only reports them")
    check_values(job)
    from aitrain.strategies.options import StrategyOptions
    from aitrain.strategies.plan import ParallelPlan
    from aitrain.strategies.rules import preflight

    # Degrees, the strategy and its options, the built-in model against TP/PP, the batch splits.
    plan = ParallelPlan.resolve(world_size=world, **vars(job.parallel))
    user = user_program(job)
    preflight(job.strategy.name, plan, StrategyOptions.from_config(job.strategy, job.pp),
              model=None if user else job.model, train=None if user else job.train)
    if job.script and job.module:
        raise ConfigError(f"both script={job.script} and module={job.module} are set",
                          "give one: `-- train.py ARGS` or `-- -m pkg.module ARGS`")
    if job.script and not (launch_dir / job.script).is_file():
        raise ConfigError(f"script={job.script} does not exist (looked in {launch_dir})",
                          "give a path to a torchrun-compatible Python script")
    if job.module and not getattr(job.backend, "python", None) and not _ray_ships_code(job) \
            and not job.container.image:  # the image's Python finds it, not this one
        check_module(job.module, launch_dir)


# (key, lowest allowed value, what it means) for the numbers a rank would otherwise trip over.
_AT_LEAST: tuple[tuple[str, float, str], ...] = (
    ("train.steps", 1, "optimizer steps to run"),
    ("train.global_batch_size", 1, "sequences per step"),
    ("train.grad_accum", 1, "micro-batches per step"),
    ("train.log_every", 1, "steps between progress lines"),
    ("train.warmup_steps", 0, "warmup steps"),
    ("train.grad_clip", 0, "max gradient norm (0: off)"),
    ("train.weight_decay", 0, "AdamW weight decay"),
    ("model.vocab_size", 2, "tokens in the vocabulary"),
    ("model.seq_len", 1, "context length"),
    ("model.n_layer", 1, "transformer blocks"),
    ("model.n_head", 1, "attention heads"),
    ("model.d_model", 1, "hidden width"),
    ("model.mlp_ratio", 1, "MLP width ratio"),
    ("data.branching", 1, "successors per token"),
    ("data.num_sequences", 1, "sequences in the dataset"),
    ("checkpoint.every_n_steps", 0, "steps between checkpoints (0: never)"),
    ("checkpoint.keep", 0, "checkpoints kept (0: all)"),
    ("checkpoint.save_timeout_s", 1, "seconds a checkpoint on SIGTERM/Ctrl-C may take"),
    ("watchdog.timeout_s", 0, "seconds without progress (0: off)"),
    ("fabric.collective_timeout_s", 1, "process-group timeout"),
    ("fabric.smoke_timeout_s", 1, "smoke test timeout"),
    ("tracking.system_metrics_interval_s", 0.1, "seconds between samples"),
)


def _get(job: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        job = getattr(job, part)
    return job


def check_values(job: JobConfig) -> None:
    """Values a rank would trip over (a ZeroDivisionError, a NaN loss, a job that trains
    nothing and exits 0) refused here, before any process starts, one message each."""
    builtin = not user_program(job)
    for key, low, what in _AT_LEAST:
        if not builtin and key.split(".")[0] in ("train", "model", "data"):
            continue  # the user's program reads its own settings
        value = _get(job, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number ({what})", f"set {key} to a number >= {low:g}")
        if value < low:
            raise ConfigError(f"{key}={value} is below {low:g} ({what})", f"set {key} to {low:g} or more")
    if builtin:
        lr = job.train.lr
        if not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"train.lr={lr} is not a positive finite learning rate", "e.g. train.lr=3e-3")
        if not 0 <= job.model.dropout < 1:
            raise ConfigError(f"model.dropout={job.model.dropout} is not in [0, 1)", "e.g. model.dropout=0.1")
    from aitrain.launcher.sweep import parse_mode

    parse_mode(job.sweep.objective_mode)
    if job.checkpoint.dir and job.checkpoint.every_n_steps > 0 and job.backend.name != "ray":
        # (Ray's workers may see other filesystems than this host; Slurm's nodes share this one.)
        _check_writable("checkpoint.dir", job.checkpoint.dir)
    if job.resume not in ("none", "auto"):
        path = Path(job.resume).expanduser()
        if not path.exists():
            raise ConfigError(f"resume={job.resume}: no such checkpoint (looked for {path.absolute()})",
                              "give a checkpoint directory (step-NNNNNNNN) or a checkpoint.dir holding one, "
                              "or resume=auto for the newest complete checkpoint")


def _check_writable(key: str, value: str) -> None:
    """``key``'s directory can be made and written by this user: its nearest existing folder
    is a writable directory (a rank would otherwise fail at its first save, minutes in)."""
    import errno

    path = Path(value).expanduser().absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    if not existing.is_dir():
        raise ConfigError(f"{key}={value}: {existing} is a file, not a directory",
                          f"set {key}= to a directory (it is made when missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value}: {existing} is not writable: {os.strerror(errno.EACCES)} (EACCES)",
                          f"set {key}= to a directory you can write, or fix its owner or mode (ls -ld {existing})")


def _ray_ships_code(job: JobConfig) -> bool:
    env = getattr(job.backend, "runtime_env", None) or {}
    return any(env.get(k) for k in ("working_dir", "py_modules", "pip", "conda", "uv"))


def _allocation_nnodes(job: JobConfig) -> int | None:
    """Inside a Slurm allocation, a Slurm job without ``nnodes`` runs on all of its nodes (as
    srun does): planned with that many from the start (degrees, batch splits, world size)."""
    if getattr(job.backend, "name", "") != "slurm":
        return None
    from aitrain.launcher.environment import SlurmEnvironment, detect

    if detect(os.environ).kind != "slurm":
        return None
    try:
        return SlurmEnvironment.from_env(os.environ).nnodes
    except ConfigError:
        return None


def plan_job(job: JobConfig, *, resolved: Mapping[str, Any], config_yaml: str, overrides: Sequence[str],
             backend: Backend, launch_dir: Path | None = None, chdir: bool = False) -> JobSpec:
    """The checked, frozen spec of one composed job. Writes nothing.

    ``launch_dir``: where ``aitrain launch`` was run (relative paths the user typed are
    relative to it); ``chdir``: Hydra's ``hydra.job.chdir``, the ranks run in the run dir."""
    launch_dir = (launch_dir or Path.cwd()).resolve()
    gpus = getattr(job.backend, "gpus_per_node", None)
    job = dataclasses.replace(job, nproc_per_node=local_world_size(job.nproc_per_node, gpus_per_node=gpus))
    allocation = None if any(override_key(o) == "nnodes" for o in overrides) else _allocation_nnodes(job)
    if allocation and allocation != job.nnodes:  # and so in job.yaml and the run's params
        job = dataclasses.replace(job, nnodes=allocation)
        resolved = {**resolved, "nnodes": allocation}
        config_yaml = re.sub(r"(?m)^nnodes: .*$", f"nnodes: {allocation}", config_yaml, count=1)
    check_job(job, launch_dir)
    resources = ResourceRequest.from_config(job)
    run_dir = Path(job.run_dir or ".").resolve()  # set by Hydra (None only in `--cfg job --resolve`)
    config_file = run_dir / CONFIG_FILE
    env = {
        "AITRAIN_RUN_DIR": str(run_dir),
        "AITRAIN_METRICS_FILE": str(run_dir / "metrics.jsonl"),
        "AITRAIN_PROGRESS_DIR": str(run_dir / "progress"),
        "AITRAIN_STRATEGY": job.strategy.name,
        "PYTHONUNBUFFERED": "1",
    }
    reasons: dict[str, str] = {}
    umask = user_umask()
    if user_program(job) and umask is not None and umask != PRIVATE_UMASK:
        # aitrain's own files are private (umask 077); the user's program writes as under torchrun.
        env[USER_UMASK_ENV] = f"{umask:03o}"
        reasons[USER_UMASK_ENV] = "the umask the program gets back (aitrain's files use 077; supervise.py)"
    if chdir and job.module:  # `python -m` finds modules in its cwd, which is now the run dir
        path = os.pathsep.join(p for p in (str(launch_dir), os.environ.get("PYTHONPATH", "")) if p)
        env["PYTHONPATH"] = path
        reasons["PYTHONPATH"] = "hydra.job.chdir=true: the launch directory, where `-m` looked before the chdir"
    for k, v in job.fabric.env.items():
        env[str(k)] = str(v)
        reasons[str(k)] = "user-set (fabric.env)"
    replace, default = backend.relaunch_settings(job)
    python = getattr(job.backend, "python", None) or sys.executable
    name = f"aitrain-{run_dir.name}"
    cwd = run_dir if chdir else launch_dir
    container = plan_container(job.container, backend=str(getattr(job.backend, "name", "local")), run_dir=run_dir,
                               launch_dir=launch_dir, cwd=cwd, job=job_label(name, run_dir),
                               checkpoint_dir=job.checkpoint.dir)
    argv = rank_program(job, config_file, launch_dir if chdir else None)
    return JobSpec(
        name=name,
        run_dir=run_dir,
        argv=tuple(container.program(argv) if container else argv),
        nnodes=job.nnodes,
        nproc_per_node=job.nproc_per_node,
        config=job,
        # A rank's `podman run` gets the job's cgroup and dies with the agent through it.
        needs_trampoline=needs_trampoline(job) or bool(container and container.runtime == "podman"),
        container=container,
        env=env,
        env_reasons=reasons,
        resources=resources,
        overrides=tuple(overrides),
        relaunch=tuple(relaunch_argv(overrides, python=python, run_dir=run_dir, replace=replace, default=default,
                                     program=program_argv(job, None if _ray_ships_code(job) else launch_dir))),
        config_yaml=config_yaml,
        resolved=dict(resolved),
        launch_dir=launch_dir,
        cwd=cwd,
    )


def prepare_run_dir(spec: JobSpec) -> None:
    """Create the run directory for a job that runs here (0700: the user's only): the config
    the ranks read, and an earlier attempt's metrics (a requeued Slurm job) kept apart, so
    this attempt's MLflow run gets only its own steps.

    ``job.yaml`` has its secrets masked (``redact.py``): the built-in job reads none of them,
    and the ranks get ``fabric.env`` through their environment."""
    from aitrain.launcher.redact import redact_yaml
    from aitrain.launcher.util import private_dir, write_atomic

    private_dir(spec.run_dir)
    write_atomic(spec.config_file, redact_yaml(spec.config_yaml))
    if spec.metrics_file.exists():
        spec.metrics_file.rename(spec.metrics_file.with_name(f"metrics-{int(time.time())}.jsonl"))
