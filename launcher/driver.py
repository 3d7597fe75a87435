"""Runs one planned job in the foreground, whatever the backend: the run dir, the MLflow run,
the backend's ``run``, how the job ended, and the requeue of a preempted job.

    spec = plan_job(...); request = backend.dryrun(spec)
    result = run_job(backend, request)    # -> LaunchResult(outcome, handle, MLflow run id)

The outcome is written to ``<run dir>/outcome.json`` (what ``aitrain status`` reads for a job
that has ended) and, inside a Ray job, printed as the last line (the Jobs API's submitter
reads it back). A preempted job is requeued here, once, after its MLflow record is complete.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aitrain import __version__
from aitrain.errors import AitrainError
from aitrain.launcher.backends.api import Backend, JobState, Outcome, Request, write_outcome
from aitrain.launcher.job import JobSpec, prepare_run_dir, user_program

if TYPE_CHECKING:
    from aitrain.launcher.tracking import Tracker

# Inherited variables worth recording in the env document (the rest of the shell is noise).
_ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "TORCHELASTIC_", "PYTORCH_", "OMP_", "MKL_", "KMP_", "CUDA_",
                 "NVIDIA_", "UCX_", "FI_", "HF_", "MLFLOW_", "MASTER_")


@dataclass(frozen=True)
class LaunchResult:
    outcome: Outcome
    handle: str | None = None
    mlflow_run_id: str | None = None
    mlflow_uri: str | None = None
    seconds: float = 0.0


class Interrupted(Exception):
    """SIGTERM or SIGHUP reached the launch while no backend was handling it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    """SIGTERM/SIGHUP -> :class:`Interrupted` (a batch job's scancel, a closed terminal), so
    the MLflow run and the outcome are still recorded. Backends that forward signals to
    their ranks install their own handlers while they wait."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_job(backend: Backend, request: Request) -> LaunchResult:
    """Run ``request`` here until the job ends; the MLflow run covers it whole."""
    from aitrain.launcher.backends.local import register_foreground
    from aitrain.launcher.environment import detect

    spec = request.spec
    backend.check_ready(request)  # a cluster that cannot be reached: an error now, not after MLflow starts
    prepare_run_dir(spec)
    handle = register_foreground(spec, backend.name)
    tracker = start_tracker(spec, request)
    if tracker is not None:
        from aitrain.launcher.ghosts import record_launcher, recover_from_registry

        record_launcher(spec.run_dir)  # if this process is killed outright, the next command ends its run
        threading.Thread(target=recover_from_registry, kwargs={"store": tracker.state.get("uri")},
                         name="aitrain-ghosts", daemon=True).start()
    if tracker is not None and user_program(spec.config):
        # The user's code may log to MLflow itself: into this launch's run, not a second one.
        mlflow_env = tracker.rank_env()
        request.env.update(mlflow_env)
        request.env_reasons.update({k: "the launch's MLflow run, for the program's own MLflow logging"
                                    for k in mlflow_env})
    print(f"aitrain: {spec.world_size} rank(s), strategy {spec.config.strategy.name}, backend {backend.name}; "
          f"run dir {spec.run_dir}", flush=True)
    t0 = time.monotonic()
    outcome = Outcome(JobState.FAILED, 1, "the launch stopped before the job ended")
    try:
        with _signals_as_exceptions():
            try:
                outcome = backend.run(request)
            except KeyboardInterrupt:
                outcome = Outcome.interrupted(signal.SIGINT, "interrupted by SIGINT; every rank was stopped")
            except Interrupted as e:
                outcome = Outcome.interrupted(e.signum, f"interrupted by {e}; every rank was stopped")
    except AitrainError as e:  # could not run (a fabric error, a bad node): recorded, then reported
        outcome = Outcome(JobState.FAILED, e.exit_code, e.message, e.hint or "")
        raise
    finally:
        if tracker is not None:
            tracker.finish(outcome.state.mlflow_status)
        write_outcome(spec.run_dir, outcome)
        if detect().kind == "ray":  # the Jobs API's submitter reads it from the job's output
            from aitrain.launcher.backends.ray.jobs_api import OUTCOME_LINE

            print(OUTCOME_LINE + json.dumps(outcome.to_dict()), flush=True)
    if outcome.state is JobState.PREEMPTED:
        # Only now: requeueing ends this process, and the MLflow record must be complete first.
        backend.requeue(request)
    return LaunchResult(outcome, handle, tracker.run_id if tracker else None, tracker.uri if tracker else None,
                        time.monotonic() - t0)


def start_tracker(spec: JobSpec, request: Request) -> Tracker | None:
    """The MLflow run of this launch: provenance now, metrics as they come (see tracking.py)."""
    job = spec.config
    if not job.tracking.enabled:
        return None
    import yaml

    from aitrain.launcher.redact import redact_argv, redact_obj
    from aitrain.launcher.tracking import Tracker, flatten, resolve_tracking_uri
    from aitrain.launcher.util import private_dir, write_atomic

    host = socket.gethostname()
    run_dir = spec.run_dir
    clean = redact_obj({k: v for k, v in spec.resolved.items() if k != "run_dir"})
    # The YAML artifact: the config without secrets (and without the run dir, which is a tag).
    clean_yaml = private_dir(run_dir / "tracking") / "job.yaml"
    write_atomic(clean_yaml, yaml.safe_dump(clean, sort_keys=False))
    tags = {
        "strategy": job.strategy.name,
        "backend": job.backend.name,
        "world_size": str(spec.world_size),
        "nnodes": str(spec.nnodes),
        "nproc_per_node": str(spec.nproc_per_node),
        "host": host,
        "aitrain.version": __version__,
        "aitrain.run_dir": str(run_dir),
        "aitrain.command": shlex.join(redact_argv(["aitrain", "launch", *sys.argv[1:]])),
        "mlflow.source.name": job.script or job.module or "aitrain.launcher.train",
        "versions.python": platform.python_version(),
        "versions.aitrain": __version__,
        **request.tags,  # backend facts, e.g. slurm.job_id, slurm.restart_count, nodes
        **({"mlflow.parentRunId": job.tracking.parent_run_id} if job.tracking.parent_run_id else {}),
    }
    tracker = Tracker(
        uri=resolve_tracking_uri(job.tracking.uri, Path(job.run_root)),
        experiment=job.tracking.experiment,
        run_name=job.tracking.run_name or f"{job.strategy.name}-{run_dir.name}",
        run_dir=run_dir,
        params=flatten(clean),
        tags=tags,
        artifacts=[clean_yaml],
        code_dir=(spec.launch_dir / job.script).resolve().parent if job.script else spec.launch_dir,
    )
    _attach_documents(tracker, request, host)
    tracker.start(create_run_now=user_program(job))
    return tracker


def _attach_documents(tracker: Tracker, request: Request, host: str) -> None:
    """The ranks' env (user-set vs tuned), and this host's topology and findings when the
    preflight already ran (local jobs; multi-node backends record theirs as they go)."""
    env = {k: {"value": v, "source": "user-set (launch environment)"}
           for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
    for k, v in request.env.items():
        env[k] = {"value": v, "source": request.env_reasons.get(k) or "set by aitrain"}
    tracker.add_document(f"env/{host}", env)
    pf = getattr(request, "preflight", None)
    if pf is not None:
        for h in pf.hosts:
            tracker.add_document(f"topology/{host}", h.to_dict())
        if pf.findings:
            tracker.add_document("fabric/findings", [f.to_dict() for f in pf.findings])
