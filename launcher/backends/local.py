"""Local backend: every rank on this machine, under torch's elastic agent.

The agent (``torch.distributed.launcher.api.launch_agent``, what torchrun runs)
starts the ranks, gives them the torch.distributed environment, prefixes each
output line with its rank, and on any failure or signal stops all of them.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from aitrain.errors import BackendError, JobFailedError
from aitrain.launcher.job import JobSpec
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

    def __str__(self) -> str:
        lines = [
            f"backend: local (torch elastic agent, static rendezvous at {self.master_addr}:{self.master_port})",
            f"run dir: {self.spec.run_dir}",
            f"ranks:   {self.spec.world_size} ({self.spec.nnodes} node x {self.spec.nproc_per_node} per node)",
            f"command: {shlex.join(self.spec.argv)}",
        ]
        for env in self.rank_env:
            lines.append(f"rank {env['RANK']}:")
            for k in sorted(env):
                reason = self.spec.env_reasons.get(k)
                lines.append(f"    {k}={env[k]}" + (f"    # {reason}" if reason else ""))
        return "\n".join(lines)


class LocalBackend:
    name = "local"

    def __init__(self, *, max_restarts: int = 0, monitor_interval: float = 0.1,
                 start_method: str = "spawn", shutdown_timeout: int = 5) -> None:
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
            req.rank_env.append(env)
        return req

    def run(self, req: LocalRequest) -> int:
        """Start the ranks and wait for them; raises JobFailedError when they fail."""
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, launch_agent

        spec = req.spec
        # Ranks inherit the agent's environment; the agent adds the torch.distributed vars.
        os.environ.update(spec.env)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.nproc_per_node)))
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=spec.nproc_per_node,
            run_id=spec.name,
            rdzv_backend="static",
            rdzv_endpoint=f"{req.master_addr}:{req.master_port}",
            rdzv_configs={"rank": 0, "timeout": 60},
            max_restarts=self.max_restarts,
            monitor_interval=self.monitor_interval,
            start_method=self.start_method,
            log_line_prefix_template="[rank${rank}]:",
            logs_specs=DefaultLogsSpecs(log_dir=str(spec.log_dir), redirects=Std.ALL, tee=Std.ALL),
            local_addr=req.master_addr,
            shutdown_timeout=self.shutdown_timeout,
        )
        argv = trampoline_argv(spec.argv) if spec.needs_trampoline else spec.argv
        try:
            launch_agent(config, argv[0], list(argv[1:]))
        except ChildFailedError as e:
            raise JobFailedError(_describe_failures(e, spec.log_dir),
                                 f"each rank's full output is under {spec.log_dir}") from None
        except SignalException as e:
            sig = signal.Signals(e.sigval)
            raise JobFailedError(f"interrupted by {sig.name}; all ranks were stopped",
                                 exit_code=128 + int(e.sigval)) from None
        except Exception as e:  # rendezvous or agent failure
            raise BackendError(f"the local agent failed: {e}",
                               f"see the rank logs under {spec.log_dir}") from e
        return 0


def _describe_failures(err: object, log_dir: Path) -> str:
    failures = getattr(err, "failures", {}) or {}
    lines = []
    first = None
    for rank in sorted(failures):
        f = failures[rank]
        exitcode = getattr(f, "exitcode", None)
        if exitcode is not None and exitcode < 0:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        else:
            how = f"exited with code {exitcode}"
        lines.append(f"rank {rank} (pid {getattr(f, 'pid', '?')}) {how}")
        if first is None and getattr(f, "error_file_data", None):
            first = f
    root = getattr(err, "get_first_failure", None)
    root_rank = None
    if root is not None:
        try:
            root_rank, root_failure = root()
            first = root_failure
        except Exception:
            pass
    msg = "the job failed: " + "; ".join(lines)
    if first is not None:
        message = _error_message(first)
        if not message or message == "<NONE>":
            message = _stderr_tail(log_dir, getattr(first, "local_rank", root_rank))
        if message:
            msg += f"\nfirst failure (rank {root_rank if root_rank is not None else '?'}):\n{message}"
    return msg


def _stderr_tail(log_dir: Path, local_rank: object, lines: int = 15) -> str:
    """The last lines a rank wrote to stderr (when it left no error file)."""
    if local_rank is None:
        return ""
    files = sorted(log_dir.glob(f"*/attempt_*/{local_rank}/stderr.log"), key=lambda p: p.stat().st_mtime)
    if not files:
        return ""
    text = files[-1].read_text(errors="replace").rstrip().splitlines()
    return "\n".join(text[-lines:])


def _error_message(failure: object) -> str:
    data = getattr(failure, "error_file_data", None) or {}
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, dict):
        extra = message.get("extraInfo", {}) or {}
        text = message.get("message", "")
        tb = extra.get("py_callstack", "")
        return (tb or text).rstrip()
    if isinstance(message, str):
        return message.rstrip()
    return str(getattr(failure, "message", "") or "").rstrip()
