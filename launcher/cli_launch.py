"""``aitrain launch``: Hydra composes the job, a backend plans and runs it.

Everything after ``launch`` is Hydra's command line (overrides, ``-m``,
``--cfg job``, ``--help``). Two things happen before Hydra sees it:

* ``+group=option`` for a group that is already in the defaults list
  (``+strategy=fsdp``, what users type) becomes ``group=option``; Hydra alone
  would fail with "Multiple values for strategy".
* every ``key=value`` is checked against the typed schema, so a misspelt key
  fails at once with the valid keys listed.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from aitrain import __version__
from aitrain.errors import AitrainError, ConfigError, JobFailedError
from aitrain.launcher.config import DEFAULT_GROUPS, FREE_FORM, JobConfig, register_configs, to_job_config, validate_overrides
from aitrain.launcher.redact import redact_uri

_ADD_GROUP = re.compile(r"^\+(%s)=" % "|".join(DEFAULT_GROUPS))


_FREE_FORM_KEY = re.compile(r"^(%s)\.[^=]+=" % "|".join(re.escape(p) for p in FREE_FORM))


def normalize_overrides(argv: list[str]) -> list[str]:
    """``+strategy=fsdp`` -> ``strategy=fsdp`` for groups in the defaults list, and
    ``fabric.env.X=v`` -> ``++fabric.env.X=v`` (free-form maps: add or override)."""
    out = []
    for a in argv:
        a = _ADD_GROUP.sub(r"\1=", a)
        if _FREE_FORM_KEY.match(a):
            a = "++" + a
        out.append(a)
    return out


def _quote_rank_list(arg: str) -> str:
    """``log.ranks=0,3`` -> ``log.ranks='0,3'`` (Hydra would read the comma as a sweep)."""
    key, sep, value = arg.partition("=")
    if sep and key.lstrip("+~") == "log.ranks" and "," in value and value[:1] not in "'\"[":
        return f"{key}='{value}'"
    return arg


_NO_AGENT_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "--info", "--resolve", "-i"}


def _will_start_local_ranks(argv: list[str]) -> bool:
    """Cheap guess, before any parsing, whether this launch will run ranks locally."""
    if any(a in _NO_AGENT_FLAGS or a.startswith(("--cfg=", "--info=")) for a in argv):
        return False
    for a in argv:
        key, _, value = a.lstrip("+~").partition("=")
        if key == "dry_run" and value.lower() in ("true", "1", "yes"):
            return False
        if key == "backend" and value != "local":
            return False
    return True


def run_launch(argv: list[str]) -> int:
    from aitrain.launcher import agent

    argv = [_quote_rank_list(a) for a in normalize_overrides(argv)]
    if _will_start_local_ranks(argv):
        # Let the node agent import torch on the other core while Hydra composes.
        agent.prespawn()
    try:
        return _run_launch(argv)
    finally:
        agent.discard_prespawned()


def _run_launch(argv: list[str]) -> int:
    from hydra._internal.utils import get_args_parser

    ns = get_args_parser().parse_args(argv)
    if not (ns.help or ns.hydra_help):
        validate_overrides(list(ns.overrides))
    register_configs()
    _hydra_main(argv)
    return 0


def _hydra_main(argv: list[str]) -> None:
    import hydra

    @hydra.main(config_path="pkg://aitrain.configs", config_name="config", version_base="1.3")
    def _task(cfg: Any) -> None:
        try:
            code = launch(cfg)
        except AitrainError as e:
            print(f"aitrain: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code) from None
        if code:
            raise SystemExit(code)

    saved = sys.argv
    sys.argv = ["aitrain launch", *argv]
    try:
        _task()
    finally:
        sys.argv = saved


def _resolved_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg, resolve=True)


def launch(cfg: Any) -> int:
    """Plan and run one composed job (one Hydra job; a multirun calls this per job)."""
    from omegaconf import OmegaConf

    from aitrain.launcher.backends import get_backend
    from aitrain.launcher.job import JobSpec, needs_trampoline, rank_program
    from aitrain.strategies.plan import ParallelPlan

    job: JobConfig = to_job_config(cfg)
    world = job.nnodes * job.nproc_per_node
    if world < 1:
        raise AitrainError(f"nnodes={job.nnodes} x nproc_per_node={job.nproc_per_node} gives no ranks",
                           "set nnodes and nproc_per_node to 1 or more")
    # Degrees are checked against the world size before any process starts.
    plan = ParallelPlan.resolve(world_size=world, **vars(job.parallel))
    # So are the strategy, its options, the built-in model against TP/PP and the batch splits (no torch import).
    from aitrain.strategies.options import StrategyOptions
    from aitrain.strategies.rules import preflight

    preflight(job.strategy.name, plan, StrategyOptions.from_config(job.strategy, job.pp),
              model=None if job.script else job.model, train=None if job.script else job.train)
    if job.script and not Path(job.script).is_file():
        raise AitrainError(f"script={job.script} does not exist (looked in {Path.cwd()})",
                           "give a path to a torchrun-compatible Python script")
    from aitrain.launcher.resources import ResourceRequest

    resources = ResourceRequest.from_config(job)

    run_dir = Path(job.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    config_file = run_dir / "job.yaml"
    config_file.write_text(_resolved_yaml(cfg))

    spec = JobSpec(
        name=f"aitrain-{run_dir.name}",
        run_dir=run_dir,
        argv=rank_program(job, config_file),
        needs_trampoline=needs_trampoline(job),
        nnodes=job.nnodes,
        nproc_per_node=job.nproc_per_node,
        config=job,
        resources=resources,
        overrides=_task_overrides(),
    )
    spec.env.update(
        AITRAIN_RUN_DIR=str(run_dir),
        AITRAIN_METRICS_FILE=str(spec.metrics_file),
        AITRAIN_PROGRESS_DIR=str(run_dir / "progress"),
        AITRAIN_STRATEGY=job.strategy.name,
        PYTHONUNBUFFERED="1",
    )
    for k, v in job.fabric.env.items():
        spec.env[k] = str(v)
        spec.env_reasons[k] = "user-set (fabric.env)"

    if spec.metrics_file.exists():
        # An earlier attempt in the same run dir (a requeued Slurm job): keep its metrics
        # apart, so this attempt's MLflow run gets only its own steps.
        spec.metrics_file.rename(spec.metrics_file.with_name(f"metrics-{int(time.time())}.jsonl"))
    backend = get_backend(job.backend)
    if backend.name == "local":
        # Multi-node backends probe, check and tune every node of the job themselves.
        host = None
        if job.fabric.check:
            spec.findings, host = _preflight_local(job, run_dir)
        if job.fabric.tune:
            _tune_local(job, spec, host)
    request = backend.dryrun(spec)
    if job.dry_run:
        from omegaconf import OmegaConf as _OC

        from aitrain.launcher.redact import redact_obj

        print("# resolved config")
        print(_OC.to_yaml(_OC.create(redact_obj(resolved))).rstrip())
        print("\n# plan (dry run: nothing was started)")
        print(request)
        return 0
    if hasattr(backend, "submit") and not backend.in_allocation():
        # From a login node: hand the job to the scheduler; it runs `aitrain launch`
        # again inside the allocation, which does the tracking.
        handle = backend.submit(request)
        print(f"aitrain: submitted {handle}\n"
              f"  aitrain status {handle}\n  aitrain logs {handle} --follow\n  aitrain cancel {handle}",
              flush=True)
        return 0

    tracker = _start_tracker(job, run_dir, resolved, config_file, spec)
    print(f"aitrain: {world} rank(s), strategy {job.strategy.name}, backend {backend.name}; "
          f"run dir {run_dir}", flush=True)
    status = "FAILED"
    t0 = time.monotonic()
    try:
        backend.run(request)
        # A job stopped to be requeued (preemption, time limit) was killed, not finished.
        status = "KILLED" if getattr(backend, "requeue_pending", False) else "FINISHED"
    except JobFailedError as e:
        status = "KILLED" if e.exit_code >= 128 else "FAILED"
        raise
    finally:
        if tracker is not None:
            tracker.finish(status)
    if getattr(backend, "requeue_pending", False):
        # Only now: requeueing ends this process, and the MLflow record must be complete first.
        backend.requeue()
        return 0
    print(f"aitrain: job finished in {time.monotonic() - t0:.1f}s; run dir {run_dir}"
          + (f"; MLflow run {tracker.run_id} at {redact_uri(tracker.uri)}" if tracker and tracker.run_id else ""),
          flush=True)
    return 0


def _preflight_local(job: JobConfig, run_dir: Path) -> tuple[list[Any], Any]:
    """Probe and check this host's fabric and kernel settings (cached per host fingerprint).

    Errors stop the launch unless fabric.on_error=warn; the rest is summarised in one line.
    """
    from aitrain.fabric.cache import FabricCache
    from aitrain.fabric.checks import CheckOptions
    from aitrain.fabric.findings import sort_findings
    from aitrain.fabric.host import HostPaths, check_host
    from aitrain.fabric.topology import Cluster
    from aitrain.launcher.fabric_nodes import gate_host_findings
    from aitrain.launcher.tracking import record_phase

    if job.fabric.on_error not in ("fail", "warn"):
        raise ConfigError(f"fabric.on_error={job.fabric.on_error!r} is not one of fail, warn",
                          "fabric.on_error=fail stops the launch on fabric errors; warn only reports them")
    cache = FabricCache()
    t0 = time.perf_counter()
    host, _ = cache.probe(rendezvous="127.0.0.1")
    t1 = time.perf_counter()
    cluster = Cluster(hosts=[host])
    fabric_findings, _ = cache.check(cluster, CheckOptions(expected_rate_gbps=job.fabric.expected_rate_gbps,
                                                           rendezvous="127.0.0.1"))
    findings = sort_findings(list(fabric_findings) + check_host(HostPaths()))
    record_phase(run_dir, "probe", t1 - t0)
    record_phase(run_dir, "check", time.perf_counter() - t1)
    (run_dir / "preflight.json").write_text(json.dumps(
        {"hosts": [host.to_dict()], "findings": [f.to_dict() for f in findings]}, indent=1))
    gate_host_findings(findings, job.fabric.on_error, "on this host")
    return findings, host


def _tune_local(job: JobConfig, spec: Any, host: Any) -> None:
    """This host's NCCL/Gloo/OMP env for the ranks, each value with its reason; user-set wins."""
    from aitrain.fabric import probe
    from aitrain.fabric.tune import tune_from_config

    from aitrain.launcher.tracking import record_phase

    t0 = time.perf_counter()
    if host is None:
        host = probe()
    tuned = next(iter(tune_from_config(host, job.fabric, nproc_per_node=job.nproc_per_node, multi_host=False,
                                       dist_backend=job.dist_backend, trace_dir=str(spec.run_dir)).values()))
    spec.topology = host.to_dict()
    record_phase(spec.run_dir, "tune", time.perf_counter() - t0)
    for key, value in tuned.env.items():
        spec.env[key] = value
        why = tuned.reasons.get(key, "")
        spec.env_reasons[key] = why if key in tuned.user_set else f"tuned: {why}"


def _task_overrides() -> list[str]:
    """This job's overrides as the user gave them (one job of a multirun: its own values)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra run (tests calling launch directly)
        return []


def _start_tracker(job: JobConfig, run_dir: Path, resolved: dict[str, Any], config_file: Path,
                   spec: Any = None) -> Any:
    """The MLflow run of this launch: provenance now, metrics as they come (see tracking.py)."""
    if not job.tracking.enabled:
        return None
    import platform
    import shlex

    import yaml

    from aitrain.launcher.redact import redact_argv, redact_obj
    from aitrain.launcher.tracking import Tracker, flatten, resolve_tracking_uri

    host = socket.gethostname()
    clean = redact_obj({k: v for k, v in resolved.items() if k != "run_dir"})
    # The YAML artifact has no secrets; the ranks read the real job.yaml in the run dir.
    clean_yaml = run_dir / "tracking" / "job.yaml"
    clean_yaml.parent.mkdir(exist_ok=True)
    clean_yaml.write_text(yaml.safe_dump(clean, sort_keys=False))
    tags = {
        "strategy": job.strategy.name,
        "backend": job.backend.name,
        "world_size": str(job.nnodes * job.nproc_per_node),
        "nnodes": str(job.nnodes),
        "nproc_per_node": str(job.nproc_per_node),
        "host": host,
        "aitrain.version": __version__,
        "aitrain.run_dir": str(run_dir),
        "aitrain.command": shlex.join(redact_argv(["aitrain", "launch", *sys.argv[1:]])),
        "mlflow.source.name": job.script or "aitrain.launcher.train",
        "versions.python": platform.python_version(),
        "versions.aitrain": __version__,
    }
    if job.backend.name == "local":
        tags["nodes"] = host
    if spec is not None:
        tags.update(spec.tags)  # backend facts, e.g. slurm.job_id, slurm.restart_count, nodes
    tracker = Tracker(
        uri=resolve_tracking_uri(job.tracking.uri, Path(job.run_root)),
        experiment=job.tracking.experiment,
        run_name=job.tracking.run_name or f"{job.strategy.name}-{run_dir.name}",
        run_dir=run_dir,
        params=flatten(clean),
        tags=tags,
        artifacts=[clean_yaml],
        code_dir=Path(job.script).resolve().parent if job.script else Path.cwd(),
    )
    if spec is not None:
        _attach_documents(tracker, spec, host)
    tracker.start()
    return tracker


# Inherited variables worth recording in the env document (the rest of the shell is noise).
_ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "TORCHELASTIC_", "PYTORCH_", "OMP_", "MKL_", "KMP_", "CUDA_",
                 "NVIDIA_", "UCX_", "FI_", "HF_", "MLFLOW_", "MASTER_")


def _attach_documents(tracker: Any, spec: Any, host: str) -> None:
    """This host's topology, the preflight findings and the ranks' env (user-set vs tuned)."""
    import os

    env = {k: {"value": v, "source": "user-set (launch environment)"}
           for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
    for k, v in spec.env.items():
        env[k] = {"value": v, "source": spec.env_reasons.get(k) or "set by aitrain"}
    tracker.add_document(f"env/{host}", env)
    topology = getattr(spec, "topology", None)
    if topology:
        tracker.add_document(f"topology/{host}", topology.to_dict() if hasattr(topology, "to_dict") else topology)
    findings = getattr(spec, "findings", None)
    if findings:
        tracker.add_document("fabric/findings", [f.to_dict() if hasattr(f, "to_dict") else f for f in findings])
