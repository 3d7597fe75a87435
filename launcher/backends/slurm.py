"""Slurm backend: sbatch from a login node, one node agent per node inside the allocation.

From outside an allocation, :meth:`SlurmBackend.dryrun` renders the complete
sbatch script (what ``dry_run=true`` prints) and :meth:`submit` hands it to
``sbatch``; the script runs ``aitrain launch`` again inside the allocation with
the same overrides. Inside an allocation (that script, ``salloc``, or the
wrapper in ``slurm/``), :meth:`run` probes every node with ``srun`` (one task
per node), derives each node's socket interface and the rendezvous address (the
first node's address on it, never a hostname), and starts one node agent per
node with ``srun --kill-on-bad-exit``, so a rank failing on one node stops the
others.

Preemption: Slurm sends ``backend.signal`` (USR1) ``signal_lead_s`` before the
time limit to every job step; node agents forward it to their ranks, which save a
checkpoint and leave a ``preempted`` marker; the launcher then requeues the job
(``scontrol requeue``) until ``backend.max_requeues`` is reached, and the next
attempt resumes from the checkpoint (``resume=auto``).

Clients are constructor arguments: ``runner`` runs Slurm commands (tests swap it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from aitrain import __version__
from aitrain.errors import BackendError, ConfigError, JobFailedError
from aitrain.launcher.agent import AgentRequest, AgentResult
from aitrain.launcher.environment import SlurmEnvironment, detect
from aitrain.launcher.fabric_nodes import gate_host_findings, host_findings
from aitrain.launcher.job import JobSpec

Runner = Callable[..., "subprocess.CompletedProcess[str]"]

HANDLE_RE = re.compile(r"^slurm://(?P<cluster>[^/]*)/(?P<jobid>\d+)$")
PREEMPTED_MARKER = "preempted"
# Characters that #SBATCH option values may not contain (sbatch does not shell-parse them).
_UNSAFE_SBATCH = re.compile(r"[\s'\"\\$`;&|<>()]")


def run_command(argv: Sequence[str], *, check: bool = True, timeout: float | None = 60,
                env: dict[str, str] | None = None) -> "subprocess.CompletedProcess[str]":
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


# -- the sbatch script -------------------------------------------------------------


def _sbatch_value(key: str, value: object) -> str:
    text = str(value)
    if not text or _UNSAFE_SBATCH.search(text):
        raise ConfigError(f"backend.{key}={text!r} cannot go on an #SBATCH line (spaces, quotes and "
                          "shell characters are not allowed there)",
                          f"use a plain value for backend.{key}, or put a raw line in backend.extra_sbatch")
    return text


def sbatch_directives(opts: Any, spec: JobSpec) -> list[str]:
    """The #SBATCH lines, in a stable order."""
    name = opts.job_name or f"aitrain-{spec.config.strategy.name if spec.config else 'job'}"
    lines = [
        f"--job-name={_sbatch_value('job_name', name)}",
        f"--nodes={spec.nnodes}",
        "--ntasks-per-node=1",  # one node agent per node; it starts nproc_per_node ranks
    ]
    if opts.cpus_per_node:
        lines.append(f"--cpus-per-task={int(opts.cpus_per_node)}")
    if opts.gpus_per_node:
        lines.append(f"--gpus-per-node={int(opts.gpus_per_node)}")
    for key in ("partition", "account", "qos", "time", "mem", "constraint"):
        value = getattr(opts, key)
        if value:
            lines.append(f"--{key}={_sbatch_value(key, value)}")
    if opts.exclusive:
        lines.append("--exclusive")
    run_dir = str(spec.run_dir)
    if _UNSAFE_SBATCH.search(run_dir):
        raise ConfigError(f"the run directory {run_dir!r} has characters #SBATCH --output cannot take",
                          "use a run_root without spaces or shell characters")
    lines += [
        f"--output={run_dir}/slurm-%j.out",
        "--open-mode=append",
        f"--signal={_sbatch_value('signal', opts.signal)}@{int(opts.signal_lead_s)}",
        "--requeue",
    ]
    for raw in opts.extra_sbatch:
        if "\n" in raw or "\r" in raw:
            raise ConfigError(f"backend.extra_sbatch entry {raw!r} contains a newline",
                              "give one #SBATCH option per list entry")
        lines.append(raw if raw.startswith("-") else f"--{raw}")
    return lines


def render_sbatch(opts: Any, spec: JobSpec, *, overrides: Sequence[str], cwd: str, python: str) -> str:
    """The whole batch script. Every value placed in a shell line is shell-quoted."""
    for o in overrides:
        if "\n" in o or "\r" in o or "\x00" in o:
            raise ConfigError(f"override {o!r} contains a newline", "pass one override per argument")
    # dry_run is how the user looked at this script; the job itself must run.
    overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "dry_run"]
    inner = [python, "-m", "aitrain.launcher.cli", "launch", *overrides,
             f"hydra.run.dir={spec.run_dir}"]
    if not any(o.split("=", 1)[0].lstrip("+~") == "resume" for o in overrides):
        inner.append("resume=auto")  # a requeued attempt picks up the latest checkpoint
    body = [
        "#!/bin/bash",
        *[f"#SBATCH {line}" for line in sbatch_directives(opts, spec)],
        f"# Generated by aitrain {__version__}: the job runs `aitrain launch` again inside the",
        "# allocation with the same overrides; node agents start the ranks with srun.",
        "set -euo pipefail",
        "umask 077",
        f"cd {shlex.quote(cwd)}",
        "exec " + shlex.join(inner),
        "",
    ]
    return "\n".join(body)


# -- requests ------------------------------------------------------------------------


@dataclass
class SbatchRequest:
    """Dry run from outside an allocation: the script `submit` hands to sbatch."""

    spec: JobSpec
    script: str

    @property
    def script_path(self) -> Path:
        return self.spec.run_dir / "aitrain.sbatch"

    def __str__(self) -> str:
        return (f"backend: slurm (submit with sbatch; the script is written to {self.script_path})\n"
                f"--- sbatch script ---\n{self.script}")


@dataclass
class AllocationRequest:
    """Dry run inside an allocation: one node agent per node, started with srun."""

    spec: JobSpec
    slurm: SlurmEnvironment
    srun: list[str]
    agents: list[AgentRequest] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"backend: slurm, inside allocation {self.slurm.job_id} on {', '.join(self.slurm.nodes)}",
                 f"agents:  {shlex.join(self.srun)}"]
        for node, a in zip(self.slurm.nodes, self.agents):
            lines.append(f"node {node} (node_rank {a.node_rank}): rendezvous {a.master_addr}:{a.master_port}, "
                         f"{a.nproc_per_node} ranks")
            for k in sorted(a.env):
                reason = self.spec.env_reasons.get(k, "")
                lines.append(f"    {k}={a.env[k]}" + (f"    # {reason}" if reason else ""))
        return "\n".join(lines)


@dataclass
class JobStatus:
    handle: str
    state: str  # Slurm's JobState: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...
    nodes: str = ""
    restarts: int = 0
    exit_code: str = ""
    run_dir: str = ""
    reason: str = ""
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED",
                                  "SUSPENDED", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"{self.handle}: {self.state}" + (f" ({self.reason})" if self.reason and self.reason != "None" else ""),
                 f"  nodes:    {self.nodes or '-'}",
                 f"  restarts: {self.restarts}",
                 f"  run dir:  {self.run_dir or '-'}"]
        if self.exit_code:
            lines.append(f"  exit:     {self.exit_code}")
        for i, f in enumerate(self.failures):
            label = "failed:  " if i == 0 else "also:    "
            lines.append(f"  {label} node {f['node']}: {f['message'].splitlines()[0]}")
            if i == 0:
                lines.extend(f"            {line}" for line in f["message"].splitlines()[1:][-6:])
        return "\n".join(lines)


# -- the registry of submitted jobs (handle -> run dir) ------------------------------


def registry_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "aitrain" / "slurm-jobs.json"


def _registry() -> dict[str, Any]:
    try:
        return json.loads(registry_path().read_text())
    except (OSError, ValueError):
        return {}


def _remember(handle: str, run_dir: Path) -> None:
    reg = _registry()
    reg[handle] = {"run_dir": str(run_dir), "submitted": time.time()}
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(reg, indent=1))
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def parse_handle(handle: str) -> tuple[str, str]:
    m = HANDLE_RE.match(handle.strip())
    if m:
        return m.group("cluster"), m.group("jobid")
    if handle.strip().isdigit():
        return "", handle.strip()
    raise ConfigError(f"{handle!r} is not a Slurm job handle",
                      "use the handle `aitrain launch backend=slurm` printed (slurm://<cluster>/<jobid>) or a job id")


# -- the backend ---------------------------------------------------------------------


class SlurmBackend:
    name = "slurm"

    def __init__(self, *, runner: Runner = run_command, environ: dict[str, str] | None = None,
                 **options: Any) -> None:
        from aitrain.launcher.config import SlurmBackendConfig, backend_options

        self.runner = runner
        self.environ = os.environ if environ is None else environ
        self.opts = backend_options(SlurmBackendConfig, options, "Slurm")
        self.requeue_pending = False  # set by run() when the ranks stopped on the preemption signal
        self._slurm: SlurmEnvironment | None = None

    # The launch asks: does dryrun's result get submitted, or run here?
    def in_allocation(self) -> bool:
        return detect(self.environ).kind == "slurm"

    @property
    def python(self) -> str:
        return self.opts.python or sys.executable

    def dryrun(self, spec: JobSpec) -> SbatchRequest | AllocationRequest:
        if self.in_allocation():
            return self._allocation_request(spec)
        return SbatchRequest(spec, render_sbatch(self.opts, spec, overrides=spec.overrides,
                                                 cwd=os.getcwd(), python=self.python))

    # -- from a login node -------------------------------------------------------

    def submit(self, req: SbatchRequest) -> str:
        path = req.script_path
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(req.script)
        out = self.runner(["sbatch", "--parsable", str(path)]).stdout.strip()
        jobid, _, cluster = out.partition(";")
        if not jobid.isdigit():
            raise BackendError(f"sbatch answered {out!r}, not a job id", "check `sbatch --parsable` by hand")
        cluster = cluster or self._cluster_name()
        handle = f"slurm://{cluster}/{jobid}"
        _remember(handle, req.spec.run_dir)
        (req.spec.run_dir / "slurm-handle").write_text(handle + "\n")
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
        entry = _registry().get(handle, {})
        if entry.get("run_dir"):
            return entry["run_dir"]
        out = job.get("StdOut", "")
        return str(Path(out).parent) if out else ""

    def status(self, handle: str) -> JobStatus:
        cluster, jobid = parse_handle(handle)
        handle = f"slurm://{cluster or self._cluster_name()}/{jobid}"
        job = self._show_job(jobid)
        run_dir = self._run_dir(handle, job)
        st = JobStatus(handle, job.get("JobState", "UNKNOWN" if not job else ""), job.get("NodeList", ""),
                       int(job.get("Restarts", "0") or 0), job.get("ExitCode", ""), run_dir, job.get("Reason", ""))
        if not job:
            st.state = _final_state(run_dir) or "UNKNOWN"
            st.reason = "slurmctld no longer knows the job; state from the run directory" if run_dir else \
                "unknown job (slurmctld forgot it and no run directory is registered)"
        st.failures = node_failures(Path(run_dir)) if run_dir else []
        return st

    def logs(self, handle: str, *, follow: bool = False, rank: int | None = None,
             poll_s: float = 0.5) -> Iterator[str]:
        """The job's output (every rank, prefixed), or one rank's; --follow until the job ends."""
        st = self.status(handle)
        if not st.run_dir:
            raise BackendError(f"no run directory known for {handle}",
                               "logs live in <run dir>/slurm-<jobid>.out; was it submitted from this account?")
        _, jobid = parse_handle(handle)
        path = Path(st.run_dir) / f"slurm-{jobid}.out"
        prefix = None
        if rank is not None:
            # The rank's own full log (the job's output folds lines repeated across ranks).
            own = sorted(Path(st.run_dir, "logs").glob(f"*/rank{rank}.log"))
            if own:
                path = own[0]
            else:
                prefix = f"[rank{rank}]:"
        offset = 0
        while True:
            if path.exists():
                with open(path, errors="replace") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
                for line in chunk.splitlines():
                    if prefix is None or line.startswith(prefix):
                        yield line
            if not follow or self.status(handle).done:
                if follow and path.exists():  # the last lines after the job ended
                    with open(path, errors="replace") as f:
                        f.seek(offset)
                        for line in f.read().splitlines():
                            if prefix is None or line.startswith(prefix):
                                yield line
                return
            time.sleep(poll_s)

    def cancel(self, handle: str) -> str:
        """Idempotent: cancelling a finished or unknown job is not an error."""
        _, jobid = parse_handle(handle)
        job = self._show_job(jobid)
        if job and job.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                                               "NODE_FAIL", "BOOT_FAIL", "DEADLINE"):
            self.runner(["scancel", jobid], check=False)
            return f"cancelled {handle}"
        return f"{handle} is not running ({job.get('JobState', 'unknown to slurmctld')}); nothing to cancel"

    # -- inside an allocation ---------------------------------------------------------

    def _srun(self, slurm: SlurmEnvironment, extra: Sequence[str] = ()) -> list[str]:
        n = str(slurm.nnodes)
        return ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                "--job-name=aitrain-agents", *self.opts.srun_args, *extra]

    def _agents_srun(self, spec: JobSpec, slurm: SlurmEnvironment, extra: Sequence[str] = ()) -> list[str]:
        """The step that starts one node agent per node (reading their requests from agents.json)."""
        return self._srun(slurm, extra) + [self.python, "-m", "aitrain.launcher.agent", "--slurm",
                                           str(spec.run_dir / "agents.json")]

    def _allocation_request(self, spec: JobSpec) -> AllocationRequest:
        slurm = SlurmEnvironment.from_env(self.environ)
        if slurm.in_step:
            raise BackendError("aitrain launch backend=slurm is running inside a job step (srun)",
                               "run it in the batch script or the salloc shell, not under srun")
        if spec.nnodes not in (1, slurm.nnodes):
            raise ConfigError(f"nnodes={spec.nnodes} but allocation {slurm.job_id} has {slurm.nnodes} nodes "
                              f"({', '.join(slurm.nodes)})",
                              f"set nnodes={slurm.nnodes} or leave it out inside the allocation")
        spec.nnodes = slurm.nnodes
        # Ranks checkpoint and stop on Slurm's pre-time-limit signal (launcher/preemption.py).
        spec.env["AITRAIN_PREEMPT_SIGNAL"] = self.opts.signal
        spec.env_reasons["AITRAIN_PREEMPT_SIGNAL"] = (f"Slurm sends SIG{self.opts.signal} {self.opts.signal_lead_s}s "
                                                      "before the time limit: checkpoint, stop, requeue")
        spec.tags.update({"slurm.job_id": slurm.job_id, "slurm.restart_count": str(slurm.restart_count),
                          "slurm.cluster": slurm.cluster, "nodes": ",".join(slurm.nodes)})
        req = AllocationRequest(spec, slurm, self._agents_srun(spec, slurm))
        # The fabric is probed per node in `run`; the dry run shows the plan without touching nodes.
        req.agents = self._agent_requests(spec, slurm, rendezvous="<node-0 address on the tuned interface>",
                                          port=0, node_env={})
        return req

    def _agent_requests(self, spec: JobSpec, slurm: SlurmEnvironment, *, rendezvous: str, port: int,
                        node_env: dict[str, dict[str, str]]) -> list[AgentRequest]:
        from aitrain.launcher.node.services import services_options
        from aitrain.launcher.resources import plan_node
        from aitrain.launcher.supervise import trampoline_argv

        resources: dict[str, Any] = {}
        if spec.resources.active:
            plan = plan_node(spec.resources, nproc=spec.nproc_per_node, run_dir=spec.run_dir,
                             metrics_file=spec.metrics_file)
            plan.cpu_sets = []  # each node's agent works out its own from its own CPUs
            resources = plan.to_dict()
        argv = trampoline_argv(spec.argv) if spec.needs_trampoline else spec.argv
        reqs = []
        for i, node in enumerate(slurm.nodes):
            env = dict(spec.env)
            env.update(node_env.get(node, {}))
            env["AITRAIN_NODE"] = node
            reqs.append(AgentRequest(
                run_id=f"{spec.name}-{slurm.job_id}-{slurm.restart_count}",
                argv=argv,
                nproc_per_node=spec.nproc_per_node,
                master_addr=rendezvous,
                master_port=port,
                log_dir=str(spec.log_dir / node),
                result_file=str(spec.run_dir / f"agent-result-{node}.json"),
                env=env,
                nnodes=slurm.nnodes,
                node_rank=i,
                resources=resources,
                services=services_options(spec),
            ))
        return reqs

    def run(self, req: AllocationRequest) -> int:
        """Probe the nodes, pick the rendezvous, start the agents, requeue on preemption."""
        spec, slurm = req.spec, req.slurm
        marker = spec.run_dir / PREEMPTED_MARKER
        marker.unlink(missing_ok=True)
        from aitrain.launcher.tracking import WORLD_FILE, record_phase, record_world

        (spec.run_dir / WORLD_FILE).unlink(missing_ok=True)  # a requeued attempt starts on every node again

        cfg = spec.config
        self._record_queue_wait(slurm, spec.run_dir)
        t0 = time.perf_counter()
        docs = self.probe_nodes(spec, slurm)
        cluster = cluster_of(docs, slurm.nodes)
        t1 = time.perf_counter()
        self._check(cluster, cfg, spec.run_dir, host_findings(docs))
        t2 = time.perf_counter()
        tuning = tune_nodes(cluster, slurm.nodes, cfg, spec.nproc_per_node, trace_dir=str(spec.run_dir))
        for name, seconds in (("probe", t1 - t0), ("check", t2 - t1), ("tune", time.perf_counter() - t2)):
            record_phase(spec.run_dir, name, seconds)
        spec.env_reasons.update(tuning.reasons)
        node_env = tuning.env
        nodes = self._smoke_gate(spec, slurm, tuning)
        rendezvous = tuning.addresses[nodes[0]]
        if nodes != list(slurm.nodes):  # bad nodes were left out (fabric.exclude_bad_nodes=true)
            record_world(spec.run_dir, nnodes=len(nodes), nproc_per_node=spec.nproc_per_node,
                         excluded=[n for n in slurm.nodes if n not in nodes])
            slurm = replace(slurm, nodes=tuple(nodes))
            spec.nnodes = len(nodes)
            req.srun = self._agents_srun(spec, slurm, [f"--nodelist={','.join(nodes)}"])
        port = _free_port(rendezvous)
        agents = self._agent_requests(spec, slurm, rendezvous=rendezvous, port=port, node_env=node_env)
        agents_file = spec.run_dir / "agents.json"
        fd = os.open(agents_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([asdict(a) for a in agents], f)
        for a in agents:
            Path(a.result_file).unlink(missing_ok=True)
        print(f"aitrain: {slurm.nnodes} nodes ({', '.join(slurm.nodes)}), rendezvous {rendezvous}:{port}, "
              f"attempt {slurm.restart_count + 1}", flush=True)
        proc = subprocess.run(req.srun, env={**self.environ, **{"SLURM_KILL_BAD_EXIT": "1"}})
        failures = node_failures(spec.run_dir)
        if marker.exists():
            self._check_requeue_allowed(slurm)
            self.requeue_pending = True  # the launch calls requeue() once tracking is finished
            self._slurm = slurm
            return 0
        if proc.returncode != 0 or failures:
            detail = "\n".join(f"node {f['node']}: {f['message']}" for f in failures) or \
                f"srun exited with code {proc.returncode}"
            raise JobFailedError(f"the job failed on {len(failures) or 'some'} node(s):\n{detail}",
                                 f"per-rank output: {spec.log_dir}/<node>/; `aitrain status slurm://"
                                 f"{slurm.cluster}/{slurm.job_id}` shows it too",
                                 exit_code=proc.returncode or 1)
        _write_final_state(spec.run_dir, "COMPLETED")
        return 0

    @staticmethod
    def _check(cluster: Any, cfg: Any, run_dir: Path, host_checks: list[Any] | None = None) -> None:
        """Fabric and host checks across every node; errors stop the job unless fabric.on_error=warn."""
        from aitrain.fabric.cache import preflight

        fabric = getattr(cfg, "fabric", None)
        if fabric is not None and not fabric.check:
            return
        on_error = fabric.on_error if fabric is not None else "fail"
        result = preflight(cluster.hosts, on_error=on_error,
                           expected_rate_gbps=getattr(fabric, "expected_rate_gbps", None), use_cache=False)
        findings = list(result.findings) + list(host_checks or [])
        (run_dir / "preflight.json").write_text(json.dumps(
            {"hosts": [h.to_dict() for h in cluster.hosts], "findings": [f.to_dict() for f in findings]},
            indent=1))
        gate_host_findings(findings, on_error, f"on {len(cluster.hosts)} node(s)")

    def _smoke_gate(self, spec: JobSpec, slurm: SlurmEnvironment, tuning: NodeTuning) -> list[str]:
        """A short all_reduce over every node with its tuned env before the job; on failure
        bisection names the bad nodes (fabric.smoke, smoke_timeout_s, exclude_bad_nodes)."""
        from aitrain.launcher.fabric_nodes import Node, smoke_gate
        from aitrain.launcher.tracking import record_phase

        fabric = getattr(spec.config, "fabric", None)
        nodes = list(slurm.nodes)
        if len(nodes) < 2 or (fabric is not None and not fabric.smoke):
            return nodes
        t0 = time.perf_counter()
        gate = [Node(name=n, address=tuning.addresses.get(n) or None, env=tuning.env.get(n, {}),
                     prefix=["srun", "--nodes=1", "--ntasks=1", f"--nodelist={n}", "--overlap", "--quiet",
                             "--job-name=aitrain-smoke"]) for n in nodes]
        outcome = smoke_gate(gate, spec.run_dir / "smoke",
                             timeout=getattr(fabric, "smoke_timeout_s", 30.0),
                             exclude_bad_nodes=getattr(fabric, "exclude_bad_nodes", False), min_nodes=1)
        record_phase(spec.run_dir, "smoke_test", time.perf_counter() - t0)
        if outcome.excluded:
            print(f"aitrain: {outcome.message}", flush=True)
        return [n.name for n in outcome.nodes]

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

    def _check_requeue_allowed(self, slurm: SlurmEnvironment) -> None:
        if slurm.restart_count >= self.opts.max_requeues:
            raise JobFailedError(
                f"preempted after {slurm.restart_count} requeue(s); backend.max_requeues="
                f"{self.opts.max_requeues} reached, not requeueing again",
                "raise backend.max_requeues or backend.time; the latest checkpoint is kept (resume=auto)")

    def requeue(self) -> None:
        """Put this job back in the queue (ends this batch script); the next attempt resumes."""
        slurm = self._slurm
        print(f"aitrain: checkpoint saved on SIG{self.opts.signal}; requeueing job {slurm.job_id} "
              f"(restart {slurm.restart_count + 1} of at most {self.opts.max_requeues})", flush=True)
        self.runner(["scontrol", "requeue", slurm.job_id])
        time.sleep(60)  # scontrol requeue terminates this script; don't report success before it does

    def probe_nodes(self, spec: JobSpec, slurm: SlurmEnvironment) -> dict[str, dict[str, Any]]:
        """`aitrain fabric probe --json` on every node (one srun task per node) -> {node: host dict}."""
        out_dir = spec.run_dir / "probe"
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("*.json"):
            old.unlink()
        # %n is the node's index in the step (0..N-1): unlike %N (the hostname) it is unique
        # even where every node has the same hostname.
        cmd = self._srun(slurm, [f"--output={out_dir}/%n.json", "--error=" + str(out_dir / "%n.err")]) + [
            self.python, "-m", "aitrain.launcher.cli", "fabric", "probe", "--json", "--cache", "--host-check"]
        r = subprocess.run(cmd, env=dict(self.environ), capture_output=True, text=True, timeout=300)
        hosts: dict[str, dict[str, Any]] = {}
        for i, node in enumerate(slurm.nodes):
            path = out_dir / f"{i}.json"
            try:
                doc = json.loads(path.read_text())
                host = doc["hosts"][0] if "hosts" in doc else doc
            except (OSError, ValueError, KeyError, IndexError):
                err = (out_dir / f"{i}.err")
                detail = err.read_text().strip()[-2000:] if err.exists() else r.stderr.strip()[-2000:]
                raise BackendError(f"the fabric probe failed on node {node}: {detail or 'no output'}",
                                   f"run `srun -w {node} aitrain fabric probe` by hand") from None
            host["node"] = node  # hostnames may all be the same (or resolve to 127.0.0.1)
            hosts[node] = host
        return hosts


def _free_port(addr: str) -> int:
    """A free port on the rendezvous address when it is this host's (the batch script runs on
    the first node), else a random high port (the first node was excluded)."""
    import random

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
            return int(s.getsockname()[1])
    except OSError:
        return random.randint(20000, 45000)


def cluster_of(hosts: dict[str, dict[str, Any]], nodes: Sequence[str]) -> Any:
    """Probed host dicts -> a Cluster whose hosts are named by Slurm node name.

    Hostnames may all be the same (or resolve to 127.0.0.1); node names are unique.
    """
    from aitrain.fabric.topology import Cluster, HostTopology

    topo = []
    for node in nodes:
        h = HostTopology.from_dict(hosts[node])
        h.hostname = node
        topo.append(h)
    return Cluster(hosts=topo)


@dataclass
class NodeTuning:
    """Per-node tuned env, each node's address on its tuned interface, and the reasons."""

    env: dict[str, dict[str, str]]
    addresses: dict[str, str]
    reasons: dict[str, str]


def tune_nodes(cluster: Any, nodes: Sequence[str], cfg: Any, nproc_per_node: int, trace_dir: str | None = None
               ) -> NodeTuning:
    """Tuned env per node; the rendezvous is node 0's address on its tuned interface."""
    from aitrain.fabric.tune import tune_from_config

    fabric = cfg.fabric if cfg is not None else None
    tuned = tune_from_config(cluster, fabric, nproc_per_node=nproc_per_node, multi_host=len(nodes) > 1,
                             dist_backend=getattr(cfg, "dist_backend", "auto"), trace_dir=trace_dir)
    if not tuned[nodes[0]].address:
        raise BackendError(f"no usable interface with an address on {nodes[0]} for the rendezvous",
                           "check `aitrain fabric probe` on that node, or set fabric.interface=<name>")
    reasons: dict[str, str] = {}
    for n in nodes:
        for k, why in tuned[n].reasons.items():
            reasons.setdefault(k, f"{n}: {why}")
    return NodeTuning(env={n: dict(tuned[n].env) for n in nodes},
                      addresses={n: tuned[n].address or "" for n in nodes}, reasons=reasons)


# Errors a rank raises because a peer died first: collateral, not the root cause.
COLLATERAL = re.compile(r"Connection closed by peer|Connection reset by peer|remote worker crashing|"
                        r"killed by SIGTERM|killed by SIGKILL|interrupted by SIG|NCCL communicator was aborted|"
                        r"Broken pipe", re.I)


def node_failures(run_dir: Path) -> list[dict[str, Any]]:
    """Failed nodes, root cause first: failures that are not collateral damage from a dead
    peer, then the node whose ranks failed earliest."""
    out = []
    for path in sorted(run_dir.glob("agent-result-*.json")):
        res = AgentResult.read(path)
        if res is not None and not res.ok:
            out.append({"node": path.stem[len("agent-result-"):], "message": res.message,
                        "exit_code": res.exit_code, "failed_at": res.failed_at})
    out.sort(key=lambda f: (bool(COLLATERAL.search(f["message"])), f["failed_at"] is None,
                            f["failed_at"] or 0.0))
    return out


def _write_final_state(run_dir: Path, state: str) -> None:
    (run_dir / "slurm-final-state").write_text(state + "\n")


def _final_state(run_dir: str) -> str:
    try:
        return Path(run_dir, "slurm-final-state").read_text().strip()
    except OSError:
        return ""
