"""Slurm backend: sbatch from a login node, one node agent per node inside the allocation.

From outside an allocation, :meth:`SlurmBackend.dryrun` renders the complete sbatch script
(what ``dry_run=true`` prints) and :meth:`SlurmBackend.submit` hands it to ``sbatch``; the
script runs the job's relaunch command (``aitrain launch`` with the same overrides) inside
the allocation. Inside an allocation (that script, ``salloc``, or the wrapper in
``slurm/``), :meth:`SlurmBackend.run` runs the pipeline over the allocation's nodes
(:class:`SlurmNodes`: the probe is one ``srun`` task per node), takes the rendezvous as the
first node's address on its tuned interface (never a hostname), and starts one node agent
per node with ``srun --kill-on-bad-exit``, so a rank failing on one node stops the others.

Preemption: Slurm sends ``backend.signal`` (USR1) ``signal_lead_s`` before the time limit
to every job step; node agents forward it to their ranks, which save a checkpoint and
leave a marker (``launcher/preemption.py``). ``run`` then returns a PREEMPTED outcome, and
the launch requeues the job (:meth:`SlurmBackend.requeue`) once tracking has finished,
until ``backend.max_requeues`` is reached; the next attempt resumes (``resume=auto``).

Clients are constructor arguments: ``runner`` runs Slurm commands (tests swap it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from aitrain.errors import BackendError, ConfigError
from aitrain.launcher.agent import AgentRequest, AgentResult
from aitrain.launcher.backends.api import (
    Backend,
    JobRegistry,
    JobState,
    JobStatus,
    Outcome,
    Request,
    read_outcome,
)
from aitrain.launcher.backends.local import follow_files, rank_log
from aitrain.launcher.backends.slurm.sbatch import render_sbatch
from aitrain.launcher.config import JobConfig
from aitrain.launcher.container import agent_argv, agent_container, check_ready
from aitrain.launcher.environment import SlurmEnvironment, detect
from aitrain.launcher.failures import RankExit, describe, exit_code_of, failures
from aitrain.launcher.job import JobSpec, user_program
from aitrain.launcher.pipeline import AgentNodes, Preflight, run_preflight, smoke_step
from aitrain.launcher.preemption import ENV as PREEMPT_ENV
from aitrain.launcher.preemption import MARKER as PREEMPTED_MARKER
from aitrain.launcher.util import port_on, private_dir, write_atomic

Runner = Callable[..., "subprocess.CompletedProcess[str]"]

HANDLE_RE = re.compile(r"^slurm://(?P<cluster>[^/]*)/(?P<jobid>\d+)$")
FINAL_STATE_FILE = "slurm-final-state"  # written by earlier versions; read when there is no outcome.json

# Slurm's job states (squeue(1), JOB STATE CODES) -> JobState.
STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING, "CONFIGURING": JobState.PENDING, "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING, "REQUEUE_FED": JobState.PENDING, "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.PENDING, "SPECIAL_EXIT": JobState.PENDING,
    "RUNNING": JobState.RUNNING, "COMPLETING": JobState.RUNNING, "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING, "STAGE_OUT": JobState.RUNNING, "STOPPED": JobState.RUNNING,
    "COMPLETED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED, "NODE_FAIL": JobState.FAILED, "OUT_OF_MEMORY": JobState.FAILED,
    "TIMEOUT": JobState.FAILED, "BOOT_FAIL": JobState.FAILED, "DEADLINE": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED, "REVOKED": JobState.CANCELLED,
    "PREEMPTED": JobState.PREEMPTED,  # with --requeue (always, in our scripts) it comes back
}


def run_command(argv: Sequence[str], *, check: bool = True, timeout: float | None = 60,
                env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The default runner: a Slurm command, output captured; errors say what failed."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                           env=None if env is None else {**os.environ, **env})
    except FileNotFoundError as e:
        raise BackendError(f"`{argv[0]}` is not installed or not on PATH",
                           "run aitrain where the Slurm client commands are available (a login node)") from e
    except subprocess.TimeoutExpired as e:
        raise BackendError(f"`{shlex.join(argv)}` did not answer in {timeout}s",
                           "is slurmctld reachable? try `sinfo`") from e
    if check and r.returncode != 0:
        raise BackendError(f"`{shlex.join(argv)}` failed (exit {r.returncode}): {r.stderr.strip() or r.stdout.strip()}",
                           "check the Slurm options (backend.*) and `sinfo`")
    return r


def parse_handle(handle: str) -> tuple[str, str]:
    m = HANDLE_RE.match(handle.strip())
    if m:
        return m.group("cluster"), m.group("jobid")
    if handle.strip().isdigit():
        return "", handle.strip()
    raise ConfigError(f"{handle!r} is not a Slurm job handle",
                      "use the handle `aitrain launch backend=slurm` printed (slurm://<cluster>/<jobid>) or a job id")


# -- requests ------------------------------------------------------------------------


@dataclass
class SbatchRequest(Request):
    """Dry run from outside an allocation: the script `submit` hands to sbatch."""

    script: str = ""
    # The values of the script's *** arguments, for sbatch's environment (never shown or written).
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)
    remote: ClassVar[bool] = True

    @property
    def script_path(self) -> Path:
        return self.spec.run_dir / "aitrain.sbatch"

    def __str__(self) -> str:
        from aitrain.launcher.redact import redact_argv

        image = "".join(f"\n{line}" for line in self.spec.container.describe()) if self.spec.container else ""
        return (f"backend: slurm (submit with sbatch; on submission the script is written to "
                f"{self.script_path})\nranks run: {shlex.join(redact_argv(list(self.spec.argv)))}    "
                f"# on every node, in {self.spec.cwd}{image}\n--- sbatch script ---\n{self.script}")


@dataclass
class AllocationRequest(Request):
    """Dry run inside an allocation: one node agent per node, started with srun."""

    slurm: SlurmEnvironment | None = None
    srun: list[str] = field(default_factory=list)
    agents: list[AgentRequest] = field(default_factory=list)

    def __str__(self) -> str:
        from aitrain.launcher.redact import redact_argv, redact_value

        assert self.slurm is not None
        lines = [f"backend: slurm, inside allocation {self.slurm.job_id} on {', '.join(self.slurm.nodes)}",
                 f"agents:  {shlex.join(self.srun)}",
                 f"command: {shlex.join(redact_argv(list(self.spec.argv)))}",
                 f"cwd:     {self.spec.cwd}"]
        if self.spec.container is not None:
            lines += self.spec.container.describe()
        for node, a in zip(self.slurm.nodes, self.agents, strict=False):
            lines.append(f"node {node} (node_rank {a.node_rank}): rendezvous {a.master_addr}:{a.master_port}, "
                         f"{a.nproc_per_node} ranks")
            if self.spec.container is not None and self.spec.container.wraps_ranks:
                lines.append(f"    each rank: {shlex.join(redact_argv(a.argv))}")
            for k in sorted(a.env):
                reason = self.env_reasons.get(k, "")
                lines.append(f"    {k}={redact_value(k, a.env[k])}" + (f"    # {reason}" if reason else ""))
        return "\n".join(lines)


# -- the allocation's nodes, as the pipeline reaches them -------------------------------


class SlurmNodes(AgentNodes):
    """The allocation's nodes: one ``srun`` task per node runs a command on each."""

    def __init__(self, backend: SlurmBackend, slurm: SlurmEnvironment, spec: JobSpec) -> None:
        self.backend, self.slurm, self.spec = backend, slurm, spec
        self.names = tuple(slurm.nodes)
        self.where = f"on {len(self.names)} node(s)"
        self.ranks_per_node = spec.nproc_per_node

    def prefix(self, name: str) -> list[str]:
        return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={name}", "--overlap", "--quiet",
                "--job-name=aitrain-smoke"]

    def probe(self, *, cache: bool = False, write_cache: bool = True) -> dict[str, dict[str, Any]]:
        """``python -m aitrain.fabric.probe`` on every node (one srun task per node)."""
        from aitrain.launcher.nodes import probe_argv

        out_dir = self.spec.run_dir / "probe"
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("*.json"):
            old.unlink()
        # %n is the node's index in the step (0..N-1): unlike %N (the hostname) it is unique
        # even where every node has the same hostname.
        cmd = self.backend.srun(self.slurm, [f"--output={out_dir}/%n.json", "--error=" + str(out_dir / "%n.err")]) + \
            probe_argv(host_check=True, cache=True, python=self.backend.python)
        r = subprocess.run(cmd, env=dict(self.backend.environ), capture_output=True, text=True, timeout=300)
        docs: dict[str, dict[str, Any]] = {}
        for i, node in enumerate(self.names):
            path = out_dir / f"{i}.json"
            try:
                docs[node] = json.loads(path.read_text())
            except (OSError, ValueError):
                err = out_dir / f"{i}.err"
                detail = err.read_text().strip()[-2000:] if err.exists() else r.stderr.strip()[-2000:]
                raise BackendError(f"the fabric probe failed on node {node}: {detail or 'no output'}",
                                   f"run `srun -w {node} aitrain fabric probe` by hand") from None
        return docs


# -- the backend ---------------------------------------------------------------------


class SlurmBackend(Backend):
    name = "slurm"
    scheme = "slurm"

    def __init__(self, *, runner: Runner = run_command, environ: Mapping[str, str] | None = None,
                 **options: Any) -> None:
        from aitrain.launcher.config import SlurmBackendConfig, backend_options

        self.runner = runner
        self.environ = os.environ if environ is None else environ
        self.opts = backend_options(SlurmBackendConfig, options, "Slurm")

    def in_allocation(self) -> bool:
        return detect(self.environ).kind == "slurm"

    @property
    def python(self) -> str:
        import sys

        return self.opts.python or sys.executable

    def relaunch_settings(self, job: JobConfig) -> tuple[dict[str, str], dict[str, str]]:
        return {}, {"resume": "auto"}  # a requeued attempt picks up the latest checkpoint

    def dryrun(self, spec: JobSpec) -> Request:
        if self.in_allocation():
            return self._allocation_request(spec)
        from aitrain.launcher.redact import split_secrets

        return SbatchRequest.of(spec, script=render_sbatch(self.opts, spec, cwd=str(spec.launch_dir)),
                                secret_env=split_secrets(spec.relaunch)[1])

    # -- from a login node ---------------------------------------------------------

    def submit(self, request: Request) -> str:
        if not isinstance(request, SbatchRequest):
            raise BackendError("inside a Slurm allocation the job runs here, it is not submitted again",
                               "run `aitrain launch backend=slurm` (without submitting) inside the allocation")
        path = request.script_path
        private_dir(path.parent)
        write_atomic(path, request.script, mode=0o700)
        # sbatch hands its environment to the batch job: the secret arguments travel there, not in the script.
        extra = {"env": request.secret_env} if request.secret_env else {}
        out = self.runner(["sbatch", "--parsable", str(path)], **extra).stdout.strip()
        jobid, _, cluster = out.partition(";")
        if not jobid.isdigit():
            raise BackendError(f"sbatch answered {out!r}, not a job id", "check `sbatch --parsable` by hand")
        cluster = cluster or self._cluster_name()
        handle = f"slurm://{cluster}/{jobid}"
        JobRegistry().remember(handle, backend=self.name, run_dir=request.spec.run_dir)
        write_atomic(request.spec.run_dir / "slurm-handle", handle + "\n")
        return handle

    def _cluster_name(self) -> str:
        r = self.runner(["scontrol", "show", "config"], check=False)
        m = re.search(r"^ClusterName\s*=\s*(\S+)", r.stdout, re.M)
        return m.group(1) if m else "slurm"

    def _show_job(self, jobid: str) -> dict[str, str]:
        r = self.runner(["scontrol", "show", "job", "-o", jobid], check=False)
        if r.returncode != 0 or not r.stdout.strip():
            return {}
        fields: dict[str, str] = {}
        for m in re.finditer(r"(\w[\w:/]*)=(\S*)", r.stdout):
            fields.setdefault(m.group(1), m.group(2))
        return fields

    def _run_dir(self, handle: str, job: dict[str, str]) -> str:
        entry = JobRegistry().get(handle)
        if entry.get("run_dir"):
            return str(entry["run_dir"])
        out = job.get("StdOut", "")
        return str(Path(out).parent) if out else ""

    def status(self, handle: str) -> JobStatus:
        cluster, jobid = parse_handle(handle)
        handle = f"slurm://{cluster or self._cluster_name()}/{jobid}"
        job = self._show_job(jobid)
        run_dir = self._run_dir(handle, job)
        native = job.get("JobState", "")
        exit_code = job.get("ExitCode", "").split(":")[0]
        st = JobStatus(handle, STATES.get(native, JobState.UNKNOWN), self.name, native, run_dir,
                       job.get("NodeList", "") if job.get("NodeList") not in (None, "(null)") else "",
                       int(job.get("Restarts", "0") or 0), int(exit_code) if exit_code.isdigit() else None,
                       job.get("Reason", "") if job.get("Reason") not in (None, "None") else "")
        outcome = read_outcome(run_dir) if run_dir else None
        if not job:
            if outcome is not None:
                st.state = outcome.state if outcome.state is not JobState.PREEMPTED else JobState.FAILED
                st.message = "slurmctld no longer knows the job; state from the run directory"
            else:
                legacy = _legacy_final_state(run_dir)
                st.state = STATES.get(legacy, JobState.UNKNOWN)
                st.native_state = legacy
                st.message = ("slurmctld no longer knows the job; state from the run directory" if run_dir else
                              "unknown job (slurmctld forgot it and no run directory is registered)")
        if run_dir and st.state is not JobState.SUCCEEDED:
            st.failures = _failure_dicts(outcome.failures if outcome and outcome.failures else
                                         node_exits(Path(run_dir)))
        return st

    def logs(self, handle: str, *, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        """The job's output (every rank, prefixed), or one rank's; --follow until the job ends."""
        st = self.status(handle)
        if not st.run_dir:
            raise BackendError(f"no run directory known for {handle}",
                               "logs live in <run dir>/slurm-<jobid>.out; was it submitted from this account?")
        _, jobid = parse_handle(handle)
        path = Path(st.run_dir) / f"slurm-{jobid}.out"

        def done() -> bool:
            return not follow or self.status(handle).done

        if rank is not None:
            # The rank's own full log (the job's output folds lines repeated across ranks).
            own = rank_log(Path(st.run_dir), rank)
            if own is not None:
                return follow_files({own: ""}, done)
            prefix = f"[rank{rank}]:"
            return (line for line in follow_files({path: ""}, done) if line.startswith(prefix))
        return follow_files({path: ""}, done)

    def _cancel(self, handle: str, status: JobStatus) -> None:
        _, jobid = parse_handle(handle)
        self.runner(["scancel", jobid], check=False)

    # -- inside an allocation ---------------------------------------------------------

    def srun(self, slurm: SlurmEnvironment, extra: Sequence[str] = ()) -> list[str]:
        n = str(slurm.nnodes)
        return ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                "--job-name=aitrain-agents", *self.opts.srun_args, *extra]

    def _agents_srun(self, spec: JobSpec, slurm: SlurmEnvironment, extra: Sequence[str] = ()) -> list[str]:
        """The step that starts one node agent per node (reading their requests from agents.json)."""
        plan = spec.container
        if plan is not None and plan.runtime == "pyxis":  # agents and ranks in the image (Pyxis's srun flags)
            return self.srun(slurm, [*extra, *plan.srun_flags()]) + [
                plan.python, "-m", "aitrain.launcher.agent", "--slurm", str(spec.run_dir / "agents.json")]
        return self.srun(slurm, extra) + [self.python, "-m", "aitrain.launcher.agent", "--slurm",
                                          str(spec.run_dir / "agents.json")]

    def _allocation_request(self, spec: JobSpec) -> AllocationRequest:
        slurm = SlurmEnvironment.from_env(self.environ)
        if slurm.in_step:
            raise BackendError("aitrain launch backend=slurm is running inside a job step (srun)",
                               "run it in the batch script or the salloc shell, not under srun")
        check_allocation(spec, slurm)
        if spec.container is not None:  # on the batch host, one of the job's nodes
            check_ready(spec.container, needs_aitrain=not user_program(spec.config))
        req: AllocationRequest = AllocationRequest.of(spec, slurm=slurm)
        # Ranks checkpoint and stop on Slurm's pre-time-limit signal (launcher/preemption.py).
        req.env[PREEMPT_ENV] = self.opts.signal
        req.env_reasons[PREEMPT_ENV] = (f"Slurm sends SIG{self.opts.signal} {self.opts.signal_lead_s}s "
                                        "before the time limit: checkpoint, stop, requeue")
        req.tags.update({"slurm.job_id": slurm.job_id, "slurm.restart_count": str(slurm.restart_count),
                         "slurm.cluster": slurm.cluster, "nodes": ",".join(slurm.nodes),
                         "world_size": str(slurm.nnodes * spec.nproc_per_node), "nnodes": str(slurm.nnodes)})
        req.srun = self._agents_srun(spec, slurm)
        # The fabric is probed per node in `run`; the dry run shows the plan without touching nodes.
        req.agents = self._agent_requests(req, slurm, rendezvous="<node-0 address on the tuned interface>",
                                          port=0, node_env={})
        return req

    def _agent_requests(self, req: AllocationRequest, slurm: SlurmEnvironment, *, rendezvous: str, port: int,
                        node_env: Mapping[str, Mapping[str, str]], smoke: dict[str, Any] | None = None
                        ) -> list[AgentRequest]:
        from aitrain.launcher.node.services import services_options
        from aitrain.launcher.preemption import agent_grace_s
        from aitrain.launcher.resources import plan_node
        spec = req.spec
        resources: dict[str, Any] = {}
        if spec.resources.active:
            plan = plan_node(spec.resources, nproc=spec.nproc_per_node, run_dir=spec.run_dir,
                             metrics_file=spec.metrics_file)
            plan.cpu_sets = []  # each node's agent works out its own from its own CPUs
            resources = plan.to_dict()
        reqs = []
        for i, node in enumerate(slurm.nodes):
            env = dict(req.env)
            env.update(node_env.get(node, {}))
            env["AITRAIN_NODE"] = node
            reqs.append(AgentRequest(
                run_id=f"{spec.name}-{slurm.job_id}-{slurm.restart_count}",
                argv=agent_argv(spec, env, i),
                container=agent_container(spec, i),
                fork_server=not spec.needs_trampoline and spec.container is None,
                smoke=dict(smoke or {}),
                nproc_per_node=spec.nproc_per_node,
                master_addr=rendezvous,
                master_port=port,
                log_dir=str(spec.log_dir / node),
                result_file=str(spec.run_dir / f"agent-result-{node}.json"),
                env=env,
                nnodes=slurm.nnodes,
                node_rank=i,
                resources=resources,
                services=services_options(spec, env),
                cwd=str(spec.cwd),
                shutdown_timeout=agent_grace_s(spec.config, 5),  # a checkpoint on scancel's SIGTERM
            ))
        return reqs

    def run(self, request: Request) -> Outcome:
        """The pipeline over the allocation's nodes, then one agent per node."""
        assert isinstance(request, AllocationRequest) and request.slurm is not None
        from aitrain.launcher.tracking import WORLD_FILE

        spec, slurm = request.spec, request.slurm
        marker = spec.run_dir / PREEMPTED_MARKER
        marker.unlink(missing_ok=True)
        (spec.run_dir / WORLD_FILE).unlink(missing_ok=True)  # a requeued attempt starts on every node again
        self._record_queue_wait(slurm, spec.run_dir)
        nodes = SlurmNodes(self, slurm, spec)
        # The smoke all_reduce runs in the node agents, just before their ranks: they import torch
        # anyway (a separate smoke step costs one more interpreter per node). Only when it fails
        # does the pipeline's own smoke test run, to bisect and name the bad node(s).
        in_agents = bool(spec.config.fabric.smoke) and slurm.nnodes > 1 and \
            not (spec.container is not None and spec.container.runtime == "pyxis")
        pf = run_preflight(nodes, spec.config, job_env=request.env, run_dir=spec.run_dir, smoke=not in_agents)
        request.env_reasons.update(pf.reasons)
        returncode, smoke_failed = self._start_agents(request, slurm, pf, smoke=in_agents)
        if smoke_failed:
            smoke_step(pf, nodes, spec.config, request.env, spec.run_dir)  # names the bad nodes, or leaves them out
            returncode, _ = self._start_agents(request, slurm, pf, smoke=False)
        exits = node_exits(spec.run_dir)
        if marker.exists():
            if slurm.restart_count >= self.opts.max_requeues:
                return Outcome(JobState.FAILED, 1,
                               f"preempted after {slurm.restart_count} requeue(s); backend.max_requeues="
                               f"{self.opts.max_requeues} reached, not requeueing again",
                               "raise backend.max_requeues or backend.time; the latest checkpoint is kept "
                               "(resume=auto)")
            return Outcome(JobState.PREEMPTED, 0, f"checkpoint saved on SIG{self.opts.signal}")
        failed = failures(exits)
        results = _node_results(spec.run_dir)
        if returncode != 0 or failed or any(not r.ok for r in results.values()):
            message = describe(exits) if failed else "\n".join(
                f"node {n}: {r.message}" for n, r in results.items() if not r.ok) or \
                f"the job failed: srun exited with code {returncode}"
            return Outcome(JobState.FAILED, exit_code_of(exits) if failed else (returncode or 1), message,
                           f"per-rank output: {spec.log_dir}/<node>/; `aitrain status slurm://"
                           f"{slurm.cluster}/{slurm.job_id}` shows it too", tuple(failed))
        return Outcome.succeeded()

    def _start_agents(self, request: AllocationRequest, slurm: SlurmEnvironment, pf: Preflight, *,
                      smoke: bool) -> tuple[int, bool]:
        """One node agent per node of ``pf.nodes``, until they end: (srun's exit code, whether the
        agents' smoke all_reduce failed, in which case no rank started)."""
        from aitrain.launcher.tracking import record_world

        spec = request.spec
        srun = request.srun
        if pf.excluded:  # bad nodes were left out (fabric.exclude_bad_nodes=true)
            record_world(spec.run_dir, nnodes=len(pf.nodes), nproc_per_node=spec.nproc_per_node,
                         excluded=pf.excluded)
            slurm = replace(slurm, nodes=tuple(pf.nodes))
            srun = self._agents_srun(spec, slurm, [f"--nodelist={','.join(pf.nodes)}"])
        rendezvous = pf.rendezvous
        port = port_on(rendezvous)
        smoke_dir = spec.run_dir / "smoke" / "agents"
        smoke_req: dict[str, Any] = {}
        if smoke:
            shutil.rmtree(smoke_dir, ignore_errors=True)
            smoke_port = port_on(rendezvous)
            while smoke_port == port:
                smoke_port = port_on(rendezvous)
            smoke_req = {"port": smoke_port, "timeout": float(spec.config.fabric.smoke_timeout_s),
                         "dir": str(smoke_dir)}
        agents = self._agent_requests(request, slurm, rendezvous=rendezvous, port=port, node_env=pf.env,
                                      smoke=smoke_req)
        write_atomic(spec.run_dir / "agents.json", json.dumps([asdict(a) for a in agents]), mode=0o600)
        for a in agents:
            Path(a.result_file).unlink(missing_ok=True)
        print(f"aitrain: {slurm.nnodes} nodes ({', '.join(slurm.nodes)}), rendezvous {rendezvous}:{port}, "
              f"attempt {slurm.restart_count + 1}", flush=True)
        proc = subprocess.Popen(srun, env={**self.environ, "SLURM_KILL_BAD_EXIT": "1"})
        try:
            if smoke:
                _follow_agents_smoke(proc, smoke_dir, slurm.nodes, spec.run_dir)
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        failed = smoke and any(not d.get("ok") for d in _smoke_docs(smoke_dir).values())
        return proc.returncode, failed

    def _record_queue_wait(self, slurm: SlurmEnvironment, run_dir: Path) -> None:
        """phase/queue_wait_s: from submission to the start of this attempt (scontrol's times)."""
        from datetime import datetime

        from aitrain.launcher.tracking import record_phase

        job = self._show_job(slurm.job_id)
        try:
            submit = datetime.fromisoformat(job["SubmitTime"])
            start = datetime.fromisoformat(job["StartTime"])
        except (KeyError, ValueError):
            return
        record_phase(run_dir, "queue_wait", max(0.0, (start - submit).total_seconds()))

    def requeue(self, request: Request) -> None:
        """Put this job back in the queue (ends this batch script); the next attempt resumes."""
        assert isinstance(request, AllocationRequest) and request.slurm is not None
        slurm = request.slurm
        print(f"aitrain: checkpoint saved on SIG{self.opts.signal}; requeueing job {slurm.job_id} "
              f"(restart {slurm.restart_count + 1} of at most {self.opts.max_requeues})", flush=True)
        self.runner(["scontrol", "requeue", slurm.job_id])
        time.sleep(60)  # scontrol requeue terminates this script; don't report success before it does


def _smoke_docs(directory: Path) -> dict[str, dict[str, Any]]:
    docs = {}
    for p in directory.glob("*.json"):
        try:
            docs[p.stem] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    return docs


def _follow_agents_smoke(proc: subprocess.Popen[bytes], directory: Path, nodes: Sequence[str], run_dir: Path) -> None:
    """Until every node agent has its smoke outcome (or srun ends): then, if they all passed,
    say so and record the smoke phase as the pipeline's smoke test does."""
    from aitrain.launcher.pipeline import SMOKE_FILE
    from aitrain.launcher.tracking import record_phase

    docs: dict[str, dict[str, Any]] = {}
    while proc.poll() is None:
        docs = _smoke_docs(directory)
        if len(docs) >= len(nodes) or any(not d.get("ok") for d in docs.values()):
            break
        time.sleep(0.05)
    if len(docs) < len(nodes) or not all(d.get("ok") for d in docs.values()):
        return
    seconds = max(float(d.get("seconds", 0.0)) for d in docs.values())
    record_phase(run_dir, "smoke_test", seconds)
    summary = f"smoke all_reduce ok on {len(nodes)} node(s)"
    write_atomic(run_dir / SMOKE_FILE, json.dumps({"ok": True, "summary": summary, "in_agents": True,
                                                   "nodes": list(nodes), "seconds": seconds}, indent=1))
    print(f"aitrain: {summary} (in the node agents, {seconds:.1f}s)", flush=True)


def _nnodes_given(spec: JobSpec) -> bool:
    """``nnodes`` on the command line (the sbatch wrapper in slurm/ leaves it out: all nodes)."""
    return any(o.lstrip("+~").partition("=")[0] == "nnodes" for o in spec.overrides)


def check_allocation(spec: JobSpec, slurm: SlurmEnvironment) -> None:
    """The job's nnodes and nproc_per_node against the allocation it runs in.

    nnodes left out means the whole allocation; given, it must be the allocation's node
    count (the job is not quietly spread over more nodes, or fewer, than asked for).
    nproc_per_node is compared with the GPUs Slurm gave each node (SLURM_GPUS_ON_NODE) when
    the ranks use them: more ranks than GPUs would share GPUs. It is not compared with
    SLURM_NTASKS_PER_NODE: aitrain runs one task per node (its node agent), which starts the
    ranks, so the allocation's task count says nothing about them.
    """
    shown = ", ".join(slurm.nodes[:8]) + (f", ... ({slurm.nnodes} in all)" if slurm.nnodes > 8 else "")
    if spec.nnodes != slurm.nnodes and (spec.nnodes != 1 or _nnodes_given(spec)):
        n = spec.nnodes
        raise ConfigError(
            f"nnodes={n} but Slurm allocation {slurm.job_id} has {slurm.nnodes} node(s) ({shown})",
            f"set nnodes={slurm.nnodes} (or leave it out) to use the whole allocation, or run in an "
            f"allocation of {n} node(s): `salloc -N {n}` / `sbatch -N {n}`, or `aitrain launch backend=slurm "
            f"nnodes={n}` from a login node, which submits one")
    gpus = slurm.gpus_on_node
    if gpus and spec.config.device != "cpu" and spec.nproc_per_node > gpus:
        raise ConfigError(
            f"nproc_per_node={spec.nproc_per_node} but Slurm allocation {slurm.job_id} gives each node {gpus} "
            f"GPU(s) (SLURM_GPUS_ON_NODE={gpus}): ranks would share GPUs",
            f"set nproc_per_node={gpus} (or nproc_per_node=gpu: one rank per allocated GPU), ask for "
            f"{spec.nproc_per_node} GPUs per node (--gpus-per-node={spec.nproc_per_node}; from a login node "
            f"backend.gpus_per_node={spec.nproc_per_node}), or train on CPUs with device=cpu")


def _node_results(run_dir: Path) -> dict[str, AgentResult]:
    out = {}
    for path in sorted(run_dir.glob("agent-result-*.json")):
        res = AgentResult.read(path)
        if res is not None:
            out[path.stem[len("agent-result-"):]] = res
    return out


def node_exits(run_dir: Path) -> list[RankExit]:
    """Every node agent's rank exits, root cause first; a node whose agent failed before its
    ranks ended counts as one failed entry named after the node."""
    exits: list[RankExit] = []
    for node, res in _node_results(run_dir).items():
        if res.ok:
            continue
        if res.ranks:
            exits += [r if r.node else replace(r, node=node) for r in res.ranks]
        else:
            exits.append(RankExit(-1, node=node, exit_code=res.exit_code or 1, error=res.message.splitlines()[0]
                                  if res.message else "", stopped=res.interrupted))
    return failures(exits)


def _failure_dicts(exits: Sequence[RankExit]) -> list[dict[str, Any]]:
    out = []
    for e in failures(exits):
        d = e.to_dict()
        if e.rank < 0:  # the node's agent, not one rank
            d["message"] = f"node {e.node}: {e.error or e.how()}"
        out.append(d)
    return out


def _legacy_final_state(run_dir: str) -> str:
    try:
        return Path(run_dir, FINAL_STATE_FILE).read_text().strip()
    except OSError:
        return ""
