"""Ray backend: one actor per rank in a placement group, on any Ray cluster.

Where the job runs is ``backend.address`` (else ``RAY_ADDRESS``; see :mod:`.address`):
a running local cluster or a Ray started for this job, a GCS address, the Ray client
(``ray://``), or the Jobs API (``http://head:8265``), to which :meth:`RayBackend.submit`
hands the job's relaunch command (:mod:`.jobs_api`).

The driver (:mod:`.group`) places one bundle per node, starts the rank actors
(:mod:`.worker`), runs the pipeline over the Ray nodes (each probed by its first actor,
checked and tuned together, the smoke all_reduce between them), and prints every rank's
output with a ``[rank<N> <node>]:`` prefix. A failing rank takes the group down (actors
killed, placement group removed); ``backend.max_failures`` restarts it from the latest
checkpoint.

Ray is imported only when a job actually runs or a handle is queried; ``dryrun`` needs no
Ray at all. The Ray module and the Jobs API client are constructor arguments, so tests can
swap them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from aitrain.errors import ConfigError
from aitrain.launcher.backends.api import Backend, JobRegistry, JobState, JobStatus, Outcome, Request
from aitrain.launcher.backends.ray.address import (
    SERVER_SIDE_INIT_FAILURE,
    RayAddress,
    check_reachable,
    connection_error,
    ensure_token_auth,
    find_token,
    import_ray,
    parse_address,
)
from aitrain.launcher.backends.ray.jobs_api import JobsApi, jobs_client, parse_handle
from aitrain.launcher.config import JobConfig, RayBackendConfig
from aitrain.launcher.failures import describe, exit_code_of
from aitrain.launcher.job import JobSpec

__all__ = ["RayAddress", "RayBackend", "connection_error", "ensure_token_auth", "find_token", "parse_address",
           "parse_handle"]


# -- requests (what dry_run prints) -------------------------------------------------------------


@dataclass
class RayRequest(Request):
    """Run the job from this process: placement group, one actor per rank."""

    address: RayAddress = field(default_factory=lambda: RayAddress("local"))
    opts: RayBackendConfig = field(default_factory=RayBackendConfig)
    bundles: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        from aitrain.launcher.backends.ray.group import STRATEGIES, rank_slots, worker_resources
        from aitrain.launcher.redact import redact_argv, redact_obj, redact_value

        spec, o = self.spec, self.opts
        lines = [f"backend: ray ({self.address})",
                 f"run dir: {spec.run_dir}",
                 f"placement group: {len(self.bundles)} bundle(s), one per node, {STRATEGIES[o.placement]}: "
                 f"{self.bundles[0] if self.bundles else {}}",
                 f"workers: one actor per rank, {worker_resources(o)} each; {spec.world_size} rank(s) "
                 f"({spec.nnodes} node(s) x {spec.nproc_per_node})",
                 f"failures: a failed rank stops the group; restarts: {o.max_failures} "
                 "(from the latest checkpoint, resume=auto)",
                 f"command: {shlex.join(redact_argv(list(spec.argv)))}",
                 "fabric: probed on every Ray node (one task each), checked and tuned per node at launch; "
                 "rendezvous = node 0's address on its tuned interface"]
        if o.runtime_env:
            lines.append(f"runtime_env: {json.dumps(redact_obj(o.runtime_env), sort_keys=True)}")
        if spec.container is not None:
            lines += spec.container.describe()
        lines += [f"note: {n}" for n in self.notes]
        for s in rank_slots(spec.nnodes, spec.nproc_per_node):
            lines.append(f"rank {s.rank}: {s.node} local_rank {s.local_rank}  "
                         f"[output prefix [rank{s.rank} {s.node}]:, log {spec.log_dir}/{s.node}/rank{s.rank}.log]")
        lines.append("env of every rank (plus RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, "
                     "MASTER_PORT and the node's tuned env):")
        for k in sorted(self.env):
            reason = self.env_reasons.get(k)
            lines.append(f"    {k}={redact_value(k, self.env[k])}" + (f"    # {reason}" if reason else ""))
        return "\n".join(lines)


@dataclass
class RayJobRequest(Request):
    """Submit through the Jobs API: the cluster runs ``aitrain launch`` of the same job."""

    address: RayAddress = field(default_factory=lambda: RayAddress("local"))
    entrypoint: str = ""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # The values of the entrypoint's *** arguments, added to runtime_env's env_vars on
    # submission (never shown; the entrypoint's `aitrain launch` takes them back).
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)
    remote: ClassVar[bool] = True

    def __str__(self) -> str:
        from aitrain.launcher.redact import redact_argv, redact_obj

        lines = [f"backend: ray (submit to {self.address}; the cluster runs the job and tracks it)",
                 f"entrypoint: {self.entrypoint}",
                 f"ranks run: {shlex.join(redact_argv(list(self.spec.argv)))}"]
        if self.runtime_env:
            lines.append(f"runtime_env: {json.dumps(redact_obj(self.runtime_env), sort_keys=True)}")
        lines.append(f"metadata: {json.dumps(self.metadata, sort_keys=True)}")
        return "\n".join(lines)


# -- the backend ---------------------------------------------------------------------------------


class RayBackend(Backend):
    name = "ray"
    scheme = "ray"

    def __init__(self, *, ray_module: Any = None, jobs_client: Callable[[str], Any] = jobs_client,
                 environ: Mapping[str, str] | None = None, **options: Any) -> None:
        from aitrain.launcher.backends.ray.group import STRATEGIES
        from aitrain.launcher.config import RayBackendConfig, backend_options

        self.opts = backend_options(RayBackendConfig, options, "Ray")
        self._ray = ray_module
        self.jobs_client = jobs_client
        self.environ = os.environ if environ is None else environ
        self.jobs = JobsApi(lambda dashboard: self.jobs_client(dashboard), self.environ)
        if self.opts.placement not in STRATEGIES:
            raise ConfigError(f"backend.placement={self.opts.placement!r} is not one of {', '.join(STRATEGIES)}",
                              "spread puts each node's bundle on its own Ray node where it can; pack fills "
                              "Ray nodes first")
        if self.opts.max_failures < 0:
            raise ConfigError(f"backend.max_failures={self.opts.max_failures} is negative",
                              "0 means a failure ends the job; N restarts the group up to N times")

    @property
    def address(self) -> RayAddress:
        return parse_address(self.opts.address, self.environ)

    def submits_to_jobs_api(self) -> bool:
        """A Jobs API address from outside a Ray job: the job is submitted, not driven from here."""
        from aitrain.launcher.environment import detect

        return self.address.kind == "jobs" and detect(self.environ).kind != "ray"

    def check_ready(self, request: Request) -> None:
        addr = self.address
        if self._ray is None and addr.kind in ("client", "gcs") and addr.value not in (None, "auto"):
            import_ray()
            check_reachable(addr)

    def relaunch_settings(self, job: JobConfig) -> tuple[dict[str, str], dict[str, str]]:
        if parse_address(getattr(job.backend, "address", None), self.environ).kind != "jobs":
            return {}, {}
        # On the cluster: drive the job there, with run directories where this machine put them.
        return {"backend.address": "auto", "run_root": str(Path(job.run_root).resolve())}, {}

    def dryrun(self, spec: JobSpec) -> Request:
        from aitrain.launcher.backends.ray.group import node_bundles

        addr = self.address
        tags = {"ray.address": addr.value or "local", "ray.placement": self.opts.placement}
        if self.submits_to_jobs_api():
            from aitrain.launcher.redact import split_secrets

            entrypoint, secret_env = split_secrets(spec.relaunch)
            return RayJobRequest.of(spec, tags=tags, address=addr, entrypoint=shlex.join(entrypoint),
                                    runtime_env=dict(self.opts.runtime_env or {}), secret_env=secret_env,
                                    metadata={"aitrain.run_dir": str(spec.run_dir), "aitrain.name": spec.name})
        if spec.nproc_per_node < 1 or spec.nnodes < 1:
            raise ConfigError(f"nnodes={spec.nnodes}, nproc_per_node={spec.nproc_per_node}: need 1 or more of each",
                              "set nnodes and nproc_per_node to 1 or more")
        req: RayRequest = RayRequest.of(spec, tags=tags, address=addr, opts=self.opts,
                                        bundles=node_bundles(self.opts, spec.nnodes, spec.nproc_per_node))
        cfg = spec.config
        if cfg.binding != "none" or cfg.resources.cgroup or cfg.profile != "none":
            req.notes.append("binding, resources.cgroup and profile are applied by the local backend only; "
                             "Ray places and limits the workers (backend.cpus_per_worker, ...)")
        if spec.nnodes > 1:
            req.notes.append("several nodes: the run directory (config, checkpoints, logs, metrics) must be on a "
                             "filesystem every node shares; the job config is also shipped to each node")
        return req

    # -- handing the job over ------------------------------------------------------------------

    def submit(self, request: Request) -> str:
        """The Jobs API for a ``http://`` address; otherwise a detached driver on this machine."""
        if not isinstance(request, RayJobRequest):
            from aitrain.launcher.backends.local import launch_detached

            return launch_detached(request.spec, self.name)
        client = self.jobs_client(request.address.dashboard)
        runtime_env = dict(request.runtime_env)
        if request.secret_env:  # the entrypoint's secret arguments, in its environment
            runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **request.secret_env}
        try:
            sid = client.submit_job(entrypoint=request.entrypoint, runtime_env=runtime_env or None,
                                    metadata=request.metadata)
        except Exception as e:
            raise connection_error(request.address, e) from e
        handle = f"ray://{request.address.dashboard}/{sid}"
        JobRegistry().remember(handle, backend=self.name, run_dir=request.spec.run_dir)
        with contextlib.suppress(OSError):
            request.spec.run_dir.mkdir(parents=True, exist_ok=True)
            (request.spec.run_dir / "ray-handle").write_text(handle + "\n")
        return handle

    def status(self, handle: str) -> JobStatus:
        return self.jobs.status(handle)

    def logs(self, handle: str, *, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        """The job's output (every rank, prefixed), or one rank's; --follow until the job ends."""
        if rank is not None:
            own = self._rank_log(handle, rank)
            if own is not None:  # the rank's own full log (the job's output folds repeated lines)
                from aitrain.launcher.backends.local import follow_files

                return follow_files({own: ""}, lambda: not follow or self.status(handle).done)
        return self.jobs.logs(handle, follow=follow, rank=rank)

    def _rank_log(self, handle: str, rank: int) -> Path | None:
        """``<run dir>/logs/<node>/rank<N>.log`` when the run dir is on this machine (shared FS)."""
        from aitrain.launcher.backends.local import rank_log

        try:
            run_dir = self.status(handle).run_dir
        except Exception:  # noqa: BLE001 - fall back to the job's output
            return None
        return rank_log(Path(run_dir), rank) if run_dir else None

    def _cancel(self, handle: str, status: JobStatus) -> None:
        self.jobs.cancel(handle)

    # -- driving the job from this process ------------------------------------------------------

    @contextlib.contextmanager
    def connect(self, spec: JobSpec) -> Iterator[Any]:
        """``ray.init`` for this job (ours to shut down after), or the caller's connection."""
        addr = self.address
        if addr.kind == "jobs":  # inside a Ray job (RAY_JOB_ID set): that job's cluster
            addr = RayAddress("gcs", "auto")
        ensure_token_auth()
        embedded = addr.kind == "local" and _no_running_cluster()
        if embedded and "ray" not in sys.modules:
            # Ray's single-machine mode: every Ray process binds and registers 127.0.0.1 (it would
            # otherwise take this machine's network address, even with _node_ip_address=127.0.0.1).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray = self._ray
        if ray is None:
            ray = import_ray()  # the lazy import: only when the backend runs a job
            check_reachable(addr)  # seconds, not Ray's minute of retries, when nothing listens there
        if ray.is_initialized():
            yield ray
            return
        kwargs: dict[str, Any] = {"namespace": "aitrain", "log_to_driver": False, "logging_level": logging.WARNING}
        from aitrain.launcher.environment import detect

        if self.opts.runtime_env and detect(self.environ).kind != "ray":
            # (inside a Jobs API job the job already has it: the submission's runtime_env)
            kwargs["runtime_env"] = dict(self.opts.runtime_env)
        if embedded:
            from aitrain.launcher.backends.ray.group import worker_resources

            need = worker_resources(self.opts)
            world = spec.world_size
            kwargs.update(
                num_cpus=int(self.opts.num_cpus or max(os.cpu_count() or 1, math.ceil(need.get("CPU", 0) * world))),
                include_dashboard=False,
            )
            custom = {k: v * world for k, v in need.items() if k not in ("CPU", "GPU")}
            if custom:
                kwargs["resources"] = custom
            print(f"aitrain: ray: no cluster given or running; starting a local Ray instance for this job "
                  f"({kwargs['num_cpus']} CPUs)", flush=True)
        else:
            kwargs["address"] = addr.value if addr.kind != "local" else None
        _quiet_ray_logs()
        for attempt in (1, 2):
            try:
                ray.init(**kwargs)
                break
            except Exception as e:  # ConnectionError, RuntimeError, AuthenticationError, TimeoutError
                if attempt == 1 and addr.kind == "client" and SERVER_SIDE_INIT_FAILURE in str(e):
                    # The head's client server failed to start our session (slow on a busy head):
                    # a new session usually starts fine.
                    print(f"aitrain: ray: {connection_error(addr, e).message.split(': ', 1)[1]}; trying once more",
                          flush=True)
                    with contextlib.suppress(Exception):
                        ray.shutdown()
                    continue
                raise connection_error(addr, e) from e
        try:
            yield ray
        finally:
            with contextlib.suppress(Exception):
                ray.shutdown()

    def run(self, request: Request) -> Outcome:
        """Drive the job: place, preflight, run the ranks; restart up to max_failures times."""
        assert isinstance(request, RayRequest)
        from aitrain.launcher.backends.ray.group import (
            Interrupted,
            NodesExcluded,
            job_config_for_attempt,
            run_group,
        )
        from aitrain.launcher.tracking import record_world

        spec = request.spec
        config_file = spec.config_file
        files = {str(config_file): config_file.read_text()} if config_file.is_file() else {}
        cwd = None if (self.opts.runtime_env or {}).get("working_dir") else str(spec.cwd)
        argv = list(spec.argv)
        nnodes = spec.nnodes
        excluded: list[str] = []  # Ray nodes the smoke test proved bad (fabric.exclude_bad_nodes=true)
        excluded_labels: list[str] = []
        with self.connect(spec) as ray:
            for attempt in range(self.opts.max_failures + 1):
                if attempt and str(config_file) in argv:
                    path, text = job_config_for_attempt(config_file, attempt, spec.config.resume)
                    path.write_text(text)
                    files = {str(path): text}
                    argv = [str(path) if a == str(config_file) else a for a in spec.argv]
                try:
                    while True:
                        try:
                            exits = run_group(ray, request, self.opts, attempt=attempt, argv=argv, files=files,
                                              cwd=cwd, exclude_nodes=excluded, nnodes=nnodes)
                            break
                        except NodesExcluded as e:
                            # Placed again without them: not a failure of the job, no restart used.
                            excluded += e.ray_node_ids
                            excluded_labels += e.labels
                            nnodes -= e.job_nodes
                            record_world(spec.run_dir, nnodes=nnodes, nproc_per_node=spec.nproc_per_node,
                                         excluded=excluded_labels)
                except (Interrupted, KeyboardInterrupt) as e:
                    signum = e.signum if isinstance(e, Interrupted) else 2
                    name = "SIGINT" if signum == 2 else str(e)
                    return Outcome.interrupted(signum, f"interrupted by {name}; every rank was stopped, the "
                                                       "actors and the placement group removed")
                if not exits:
                    return Outcome.succeeded()
                if attempt == self.opts.max_failures:
                    return Outcome(JobState.FAILED, exit_code_of(exits), describe(exits, attempts=attempt + 1),
                                   f"each rank's full output is under {spec.log_dir}/<node>/rank<N>.log on its node",
                                   tuple(exits))
                print(f"aitrain: ray: {describe(exits).splitlines()[0].removeprefix('the job failed: ')}; "
                      f"restarting the group (restart {attempt + 1} of at most {self.opts.max_failures}) "
                      "from the latest checkpoint", flush=True)
        return Outcome.succeeded()


def _no_running_cluster() -> bool:
    """No RAY_ADDRESS and no cluster started with `ray start` on this machine (the file
    `ray start` leaves and `ray stop` removes; what ``ray.init()`` itself looks at)."""
    if os.environ.get("RAY_ADDRESS"):
        return False
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return not (Path(tmp) / "ray" / "ray_current_cluster").exists()


def _quiet_ray_logs() -> None:
    # Ray's own INFO lines (and the auth banner) are noise next to the ranks' output.
    for name in ("ray", "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(name).setLevel(logging.ERROR)
