"""Local backend: every rank on this machine, under torch's elastic agent.

The agent (``launcher/agent.py`` running ``torch.distributed.launcher.api.launch_agent``,
what torchrun runs) starts the ranks, gives them the torch.distributed environment,
prefixes each output line with its rank, and on any failure or signal stops all of them.

Handles: ``local://<host>/<id>`` names an ``aitrain launch`` process on this machine, run in
the foreground or submitted to run detached (``aitrain.submit``: it outlives the notebook
that started it; its console is ``<run dir>/launch.log``). ``status`` asks the process,
then the run dir's ``outcome.json``; ``cancel`` sends it SIGTERM (the ranks are stopped
and the job recorded as CANCELLED).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aitrain.errors import BackendError, ConfigError
from aitrain.launcher.agent import AgentRequest
from aitrain.launcher.agent import take as take_agent
from aitrain.launcher.backends.api import (
    Backend,
    JobRegistry,
    JobState,
    JobStatus,
    Outcome,
    Request,
    read_outcome,
)
from aitrain.launcher.container import agent_argv, agent_container, check_ready, remove_containers
from aitrain.launcher.job import JobSpec, user_program
from aitrain.launcher.node.services import services_options
from aitrain.launcher.pipeline import NodeSet, Preflight, record, run_preflight
from aitrain.launcher.redact import redact_argv, redact_value
from aitrain.launcher.resources import NodePlan, format_cpus, plan_node
from aitrain.launcher.util import free_port, process_alive, process_start

TORCH_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_LOG = "launch.log"  # the console of a detached launch
HANDLE_ENV = "AITRAIN_JOB_HANDLE"  # the handle a detached launch was submitted under


class ThisHost(NodeSet):
    """The one node of a local job: this machine, probed in this process (through the cache)."""

    where = "on this host"
    probe_rendezvous = "127.0.0.1"

    def __init__(self, nproc_per_node: int) -> None:
        self.names = (socket.gethostname(),)
        self.ranks_per_node = nproc_per_node

    def probe(self, *, cache: bool = False, write_cache: bool = True) -> dict[str, dict[str, Any]]:
        from aitrain.fabric.node import node_document

        doc = node_document(rendezvous=self.probe_rendezvous, host_check=True, cache=cache,
                            write_cache=write_cache)
        return {self.names[0]: doc}

    def fallback_address(self, name: str) -> str | None:
        return "127.0.0.1"


@dataclass
class LocalRequest(Request):
    """The dry-run result: exactly what `run` will start."""

    master_addr: str = "localhost"
    master_port: int = 0
    rank_env: list[dict[str, str]] = field(default_factory=list)
    node: NodePlan | None = None  # CPU binding, cgroup and profiler of this node (launcher/resources.py)
    preflight: Preflight | None = None  # this host's probe, findings and tuned env

    def __str__(self) -> str:
        spec = self.spec
        lines = [
            f"backend: local (torch elastic agent, static rendezvous at {self.master_addr}:{self.master_port})",
            f"run dir: {spec.run_dir}",
            f"ranks:   {spec.world_size} ({spec.nnodes} node x {spec.nproc_per_node} per node)",
            f"command: {shlex.join(redact_argv(list(spec.argv)))}",
            f"cwd:     {spec.cwd}",
        ]
        if spec.container is not None:
            lines += spec.container.describe()
            lines.append(f"    each rank: {shlex.join(redact_argv(agent_argv(spec, self.env)))}")
        if self.preflight is not None and self.preflight.findings:
            lines.append(f"preflight: {describe_findings(self.preflight)}")
        cpu_sets = self.node.cpu_sets if self.node else []
        lines += self.node.describe() if self.node else []
        for i, env in enumerate(self.rank_env):
            lines.append(f"rank {env['RANK']}:")
            if self.node is not None and i < len(cpu_sets):
                lines.append(f"    cpus: {format_cpus(cpu_sets[i])}    # binding={self.node.binding}")
            for k in sorted(env):
                reason = self.env_reasons.get(k)
                if k == "OMP_NUM_THREADS" and self.node and self.node.omp_threads:
                    reason = "one thread per CPU of the rank's set"
                lines.append(f"    {k}={redact_value(k, env[k])}" + (f"    # {reason}" if reason else ""))
        return "\n".join(lines)


def describe_findings(pf: Preflight) -> str:
    """``0 error(s), 1 warning(s), 3 other on this host (host-swap, rdma-none)``."""
    from aitrain.fabric.findings import Severity

    errors = sum(1 for f in pf.findings if f.severity is Severity.ERROR)
    warnings = sum(1 for f in pf.findings if f.severity is Severity.WARNING)
    other = len(pf.findings) - errors - warnings
    return (f"{errors} error(s), {warnings} warning(s), {other} other on this host "
            f"({', '.join(sorted({f.id for f in pf.findings}))})")


def _user_omp(spec: JobSpec) -> str | None:
    """OMP_NUM_THREADS as the user set it (fabric.env or the shell), which binding keeps."""
    return spec.config.fabric.env.get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"))


class LocalBackend(Backend):
    name = "local"
    scheme = "local"

    def __init__(self, *, max_restarts: int = 0, monitor_interval: float = 0.1,
                 start_method: str = "spawn", shutdown_timeout: int = 5,
                 agent_factory: Callable[[], Any] = take_agent) -> None:
        self.agent_factory = agent_factory  # tests swap it; default: the pre-started agent
        self.max_restarts = max_restarts
        self.monitor_interval = monitor_interval
        self.start_method = start_method
        self.shutdown_timeout = shutdown_timeout

    def dryrun(self, spec: JobSpec) -> LocalRequest:
        if spec.nnodes != 1:
            raise BackendError(
                f"the local backend runs on one node, but nnodes={spec.nnodes}",
                "use nnodes=1 with backend=local, or backend=slurm / backend=ray for several nodes",
            )
        if spec.nproc_per_node < 1:
            raise BackendError(f"nproc_per_node={spec.nproc_per_node} must be at least 1",
                               "set nproc_per_node=1 or more")
        req: LocalRequest = LocalRequest.of(spec)
        req.tags["nodes"] = socket.gethostname()
        if spec.container is not None:  # the runtime, the image and its Python, before anything starts
            check_ready(spec.container, needs_aitrain=not user_program(spec.config))
            req.tags["container.image"] = spec.container.image
        fabric = spec.config.fabric
        if fabric.check or fabric.tune:
            # This host is known now: probed (through the cache, storing nothing), checked and
            # tuned here, so the plan shows the env the ranks get. `run` records it.
            pf = run_preflight(ThisHost(spec.nproc_per_node), spec.config, trace_dir=str(spec.run_dir),
                               use_cache=True)
            req.preflight = pf
            req.env.update(pf.node_env(pf.nodes[0]))
            req.env_reasons.update(pf.reasons)
        if spec.nproc_per_node > 1 and "OMP_NUM_THREADS" not in req.env and "OMP_NUM_THREADS" not in os.environ:
            req.env["OMP_NUM_THREADS"] = "1"
            req.env_reasons["OMP_NUM_THREADS"] = "torchrun's value for more than one rank per node (not tuned)"
        # As torchrun on one node (--standalone): the rendezvous on localhost.
        addr = "localhost"
        req.master_addr, req.master_port = addr, free_port("127.0.0.1")
        if spec.resources.active:
            req.node = plan_node(spec.resources, nproc=spec.nproc_per_node, run_dir=spec.run_dir,
                                 metrics_file=spec.metrics_file, user_omp=_user_omp(spec))
        for local_rank in range(spec.nproc_per_node):
            env = dict(req.env)
            env.update(
                RANK=str(local_rank),
                LOCAL_RANK=str(local_rank),
                WORLD_SIZE=str(spec.world_size),
                LOCAL_WORLD_SIZE=str(spec.nproc_per_node),
                MASTER_ADDR=addr,
                MASTER_PORT=str(req.master_port),
            )
            if req.node and req.node.omp_threads:  # set by the rank's trampoline
                env["OMP_NUM_THREADS"] = str(req.node.omp_threads[local_rank])
            req.rank_env.append(env)
        return req

    def run(self, request: Request) -> Outcome:
        """Start the ranks and wait for them."""
        from aitrain.launcher.preemption import agent_grace_s

        assert isinstance(request, LocalRequest)
        spec = request.spec
        if request.preflight is not None:
            record(request.preflight, spec.run_dir)
        env = dict(request.env)
        agent_req = AgentRequest(
            run_id=spec.name,
            argv=agent_argv(spec, env),
            nproc_per_node=spec.nproc_per_node,
            master_addr=request.master_addr,
            master_port=request.master_port,
            log_dir=str(spec.log_dir),
            result_file=str(spec.run_dir / "agent-result.json"),
            env=env,
            max_restarts=self.max_restarts,
            monitor_interval=self.monitor_interval,
            start_method=self.start_method,
            # Long enough for the built-in job's checkpoint on SIGTERM/Ctrl-C when it checkpoints.
            shutdown_timeout=agent_grace_s(spec.config, self.shutdown_timeout),
            services=services_options(spec, env),
            resources=request.node.to_dict() if request.node else {},
            cwd=str(spec.cwd),
            container=agent_container(spec),
            # The built-in job (no trampoline, no container) is forked from the agent's zygote.
            fork_server=not spec.needs_trampoline and spec.container is None,
        )
        try:
            return self.agent_factory().run(agent_req).outcome()
        finally:
            if agent_req.container.get("runtime") == "podman":  # the agent was killed before it could
                remove_containers(agent_req.container["label"])

    # -- jobs as processes on this machine --------------------------------------------------

    def submit(self, request: Request) -> str:
        """Run the job detached: ``aitrain launch`` of it in its own session, its console in
        ``<run dir>/launch.log``; it outlives the process that submitted it."""
        return launch_detached(request.spec, self.name)

    def status(self, handle: str) -> JobStatus:
        host, _ = parse_handle(handle)
        entry = JobRegistry().get(handle)
        if not entry:
            where = "" if host == socket.gethostname() else f" (it ran on {host}: ask there)"
            return JobStatus(handle, JobState.UNKNOWN, self.name,
                             message=f"no job {handle} was launched from this machine{where}")
        run_dir, backend = str(entry.get("run_dir", "")), str(entry.get("backend") or self.name)
        st = JobStatus(handle, JobState.UNKNOWN, backend, run_dir=run_dir, submitted_at=entry.get("submitted"))
        outcome = read_outcome(run_dir) if run_dir else None
        if process_alive(int(entry.get("pid") or 0), entry.get("start")) and outcome is None:
            st.state = JobState.RUNNING
            return st
        if outcome is None:
            st.state = JobState.FAILED
            st.message = ("the launcher process ended without recording how the job ended (was it killed?); "
                          f"see {Path(run_dir) / 'logs'}")
            return st
        st.state, st.exit_code, st.message = outcome.state, outcome.exit_code, outcome.message
        st.failures = [f.to_dict() for f in outcome.failures if f.failed or f.stopped]
        return st

    def logs(self, handle: str, *, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        st = self.status(handle)
        if not st.run_dir:
            raise BackendError(f"no run directory known for {handle}", "was it launched from this machine?")
        run_dir = Path(st.run_dir)

        def done() -> bool:
            return not follow or self.status(handle).done

        if rank is not None:
            path = rank_log(run_dir, rank)
            if path is None:
                return iter(())
            return follow_files({path: ""}, done)
        console = run_dir / LAUNCH_LOG
        if console.exists():
            return follow_files({console: ""}, done)
        logs = {p: f"[rank{p.stem[4:]}]:" for p in sorted(run_dir.glob("logs/**/rank*.log"), key=_rank_of)}
        return follow_files(logs, done)

    def _cancel(self, handle: str, status: JobStatus) -> None:
        entry = JobRegistry().get(handle)
        pid, start = int(entry.get("pid") or 0), entry.get("start")
        if not pid or not process_alive(pid, start):
            return
        os.kill(pid, signal.SIGTERM)  # the launcher stops its ranks and records the job as CANCELLED
        deadline = time.monotonic() + 30
        while process_alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.2)
        if process_alive(pid, start):
            os.kill(pid, signal.SIGKILL)  # its agent and ranks die with it (parent-death signals)


def _rank_of(path: Path) -> int:
    try:
        return int(path.stem[len("rank"):])
    except ValueError:
        return 1 << 30


def rank_log(run_dir: Path, rank: int) -> Path | None:
    """``<run dir>/logs/rank<N>.log`` (local) or ``logs/<node>/rank<N>.log`` (several nodes)."""
    found = sorted(run_dir.glob(f"logs/rank{rank}.log")) + sorted(run_dir.glob(f"logs/*/rank{rank}.log"))
    return found[0] if found else None


def follow_files(prefixes: Mapping[Path, str], done: Callable[[], bool], poll_s: float = 0.5) -> Iterator[str]:
    """The lines of each file (with its prefix); then, until ``done()``, the lines added to them."""
    offsets = dict.fromkeys(prefixes, 0)
    partial = dict.fromkeys(prefixes, "")
    while True:
        finished = done()
        for path, prefix in prefixes.items():
            try:
                with open(path, errors="replace") as f:
                    f.seek(offsets[path])
                    chunk = f.read()
                    offsets[path] = f.tell()
            except OSError:
                continue
            lines = (partial[path] + chunk).split("\n")
            partial[path] = lines.pop()
            if finished and partial[path]:
                lines.append(partial[path])
                partial[path] = ""
            for line in lines:
                yield prefix + line
        if finished:
            return
        time.sleep(poll_s)


def parse_handle(handle: str) -> tuple[str, str]:
    """``local://host/3f9a2c1b`` -> (host, id)."""
    h = handle.strip()
    if h.startswith("local://") and h.count("/") == 3:
        host, _, job_id = h[len("local://"):].partition("/")
        if host and job_id:
            return host, job_id
    raise ConfigError(f"{handle!r} is not a local job handle",
                      "use the handle `aitrain launch` or aitrain.submit printed (local://<host>/<id>)")


def new_handle() -> str:
    return f"local://{socket.gethostname()}/{uuid.uuid4().hex[:8]}"


def launch_detached(spec: JobSpec, backend: str) -> str:
    """Start ``spec.relaunch`` as a detached process on this machine; its ``local://`` handle."""
    handle = new_handle()
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env[HANDLE_ENV] = handle
    env.pop("MLFLOW_RUN_ID", None)  # a notebook's active MLflow run is not this job's
    with open(spec.run_dir / LAUNCH_LOG, "ab") as log:
        # Its own session: a Ctrl-C or a kernel interrupt in the notebook is not meant for it.
        proc = subprocess.Popen(list(spec.relaunch), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    JobRegistry().remember(handle, backend=backend, run_dir=spec.run_dir, pid=proc.pid,
                           start=process_start(proc.pid))
    return handle


def register_foreground(spec: JobSpec, backend: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The handle of a launch that runs in this process (foreground): registered so that
    ``aitrain list`` shows it and ``aitrain cancel`` can stop it from another terminal. None
    for a Slurm job inside its allocation and inside a Ray job (the scheduler's handle names
    those), and inside a torchrun worker."""
    from aitrain.launcher.environment import detect

    env = os.environ if environ is None else environ
    handle = env.get(HANDLE_ENV)
    if handle:
        return handle  # submitted detached: registered by the submitter
    where = detect(env).kind
    if where in ("ray", "torchrun") or (where == "slurm" and backend == "slurm"):
        return None
    handle = new_handle()
    JobRegistry().remember(handle, backend=backend, run_dir=spec.run_dir, pid=os.getpid(),
                           start=process_start(os.getpid()))
    return handle
