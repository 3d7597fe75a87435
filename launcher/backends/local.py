"""Local backend: every rank on this machine, under torch's elastic agent.

The agent (``launcher/agent.py`` running ``torch.distributed.launcher.api.launch_agent``,
what torchrun runs) starts the ranks, gives them the torch.distributed environment,
prefixes each output line with its rank, and on any failure or signal stops all of them.
"""

from __future__ import annotations

import os
import shlex
import socket
from dataclasses import dataclass, field

from typing import Any, Callable

from aitrain.errors import BackendError, JobFailedError
from aitrain.launcher.agent import AgentRequest
from aitrain.launcher.agent import take as take_agent
from aitrain.launcher.job import JobSpec
from aitrain.launcher.node.services import services_options
from aitrain.launcher.redact import redact_value
from aitrain.launcher.resources import NodePlan, format_cpus, plan_node
from aitrain.launcher.supervise import trampoline_argv

TORCH_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class LocalRequest:
    """The dry-run result: exactly what `run` will start."""

    spec: JobSpec
    master_addr: str
    master_port: int
    rank_env: list[dict[str, str]] = field(default_factory=list)
    node: NodePlan | None = None  # CPU binding, cgroup and profiler of this node (launcher/resources.py)

    def __str__(self) -> str:
        lines = [
            f"backend: local (torch elastic agent, static rendezvous at {self.master_addr}:{self.master_port})",
            f"run dir: {self.spec.run_dir}",
            f"ranks:   {self.spec.world_size} ({self.spec.nnodes} node x {self.spec.nproc_per_node} per node)",
            f"command: {shlex.join(self.spec.argv)}",
        ]
        cpu_sets = self.node.cpu_sets if self.node else []
        lines += self.node.describe() if self.node else []
        for i, env in enumerate(self.rank_env):
            lines.append(f"rank {env['RANK']}:")
            if i < len(cpu_sets):
                lines.append(f"    cpus: {format_cpus(cpu_sets[i])}    # binding={self.node.binding}")  # type: ignore[union-attr]
            for k in sorted(env):
                reason = self.spec.env_reasons.get(k)
                if k == "OMP_NUM_THREADS" and self.node and self.node.omp_threads:
                    reason = "one thread per CPU of the rank's set"
                lines.append(f"    {k}={redact_value(k, env[k])}" + (f"    # {reason}" if reason else ""))
        return "\n".join(lines)


def _user_omp(spec: JobSpec) -> str | None:
    """OMP_NUM_THREADS as the user set it (fabric.env or the shell), which binding keeps."""
    user_env = spec.config.fabric.env if spec.config is not None else {}
    return user_env.get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"))


class LocalBackend:
    name = "local"

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
        addr = "127.0.0.1"
        port = free_port(addr)
        req = LocalRequest(spec=spec, master_addr=addr, master_port=port)
        if spec.resources.active:
            req.node = plan_node(spec.resources, nproc=spec.nproc_per_node, run_dir=spec.run_dir,
                                 metrics_file=spec.metrics_file, user_omp=_user_omp(spec))
        for local_rank in range(spec.nproc_per_node):
            env = dict(spec.env)
            env.update(
                RANK=str(local_rank),
                LOCAL_RANK=str(local_rank),
                WORLD_SIZE=str(spec.world_size),
                LOCAL_WORLD_SIZE=str(spec.nproc_per_node),
                MASTER_ADDR=addr,
                MASTER_PORT=str(port),
            )
            if req.node and req.node.omp_threads:  # set by the rank's trampoline
                env["OMP_NUM_THREADS"] = str(req.node.omp_threads[local_rank])
            req.rank_env.append(env)
        return req

    def run(self, req: LocalRequest) -> int:
        """Start the ranks and wait for them; raises JobFailedError when they fail."""
        spec = req.spec
        env = dict(spec.env)
        env.setdefault("OMP_NUM_THREADS", os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.nproc_per_node))))
        agent_req = AgentRequest(
            run_id=spec.name,
            argv=trampoline_argv(spec.argv) if spec.needs_trampoline else spec.argv,
            nproc_per_node=spec.nproc_per_node,
            master_addr=req.master_addr,
            master_port=req.master_port,
            log_dir=str(spec.log_dir),
            result_file=str(spec.run_dir / "agent-result.json"),
            env=env,
            max_restarts=self.max_restarts,
            monitor_interval=self.monitor_interval,
            start_method=self.start_method,
            shutdown_timeout=self.shutdown_timeout,
            services=services_options(spec),
            resources=req.node.to_dict() if req.node else {},
        )
        result = self.agent_factory().run(agent_req)
        if not result.ok:
            raise JobFailedError(result.message, result.hint or None, exit_code=result.exit_code)
        return 0
