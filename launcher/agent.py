"""The node agent: one process per node that runs torch's elastic agent for its ranks.

``aitrain launch`` starts this process *before* composing the config, so the
agent imports torch (about a second) on one core while Hydra composes on the
other; it then reads the request on stdin. The request is plain JSON, so the
same agent serves one node of a Slurm or Ray job.

    python -m aitrain.launcher.agent            # reads one JSON request on stdin
    python -m aitrain.launcher.agent REQ.json   # or from a file
    python -m aitrain.launcher.agent --slurm REQS.json   # this node's entry (SLURM_NODEID)

The agent exits when its parent dies (PR_SET_PDEATHSIG), and on EOF without a
request (the launch was abandoned, e.g. a config error).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AgentRequest:
    """Everything the elastic agent on one node needs."""

    run_id: str
    argv: list[str]
    nproc_per_node: int
    master_addr: str
    master_port: int
    log_dir: str
    result_file: str
    env: dict[str, str] = field(default_factory=dict)
    nnodes: int = 1
    node_rank: int = 0
    max_restarts: int = 0
    monitor_interval: float = 0.1
    start_method: str = "spawn"
    shutdown_timeout: int = 5
    rdzv_timeout: int = 300
    services: dict[str, Any] = field(default_factory=dict)  # rank logs, system metrics, watchdog (node/services.py)
    resources: dict[str, Any] = field(default_factory=dict)  # NodePlan: binding, cgroup, profiler (resources.py)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class AgentResult:
    ok: bool
    exit_code: int = 0
    message: str = ""
    hint: str = ""
    failed_at: float | None = None  # when this node's first rank failed (orders root causes across nodes)

    @classmethod
    def read(cls, path: Path) -> "AgentResult | None":
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def run_agent(req: AgentRequest) -> AgentResult:
    """Run the ranks of one node under torch's elastic agent (blocks until they end)."""
    from aitrain.launcher.node.services import NodeServices

    # Rank log files and console, system metrics and the hang watchdog of this node.
    with NodeServices(req) as services:
        result = _run_elastic(req, services.logs_specs)
    hang = services.hang_result()  # the watchdog stopped the job: say so, not "interrupted by SIGTERM"
    return AgentResult(False, *hang) if hang else result


def _run_elastic(req: AgentRequest, logs_specs: Any) -> AgentResult:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, launch_agent

    # Ranks inherit the agent's environment; the agent adds the torch.distributed vars.
    os.environ.update(req.env)
    Path(req.log_dir).mkdir(parents=True, exist_ok=True)
    from aitrain.launcher.resources import NodeResources

    # The job's cgroup exists before the first rank starts; ranks get their part of the plan in the env.
    node = NodeResources.start(req.resources, nproc=req.nproc_per_node, node_rank=req.node_rank)
    os.environ.update(node.rank_env())
    config = LaunchConfig(
        min_nodes=req.nnodes,
        max_nodes=req.nnodes,
        nproc_per_node=req.nproc_per_node,
        run_id=req.run_id,
        rdzv_backend="static",
        rdzv_endpoint=f"{req.master_addr}:{req.master_port}",
        rdzv_configs={"rank": req.node_rank, "timeout": req.rdzv_timeout},
        max_restarts=req.max_restarts,
        monitor_interval=req.monitor_interval,
        start_method=req.start_method,
        log_line_prefix_template="[rank${rank}]:",
        logs_specs=logs_specs,
        local_addr=req.master_addr if req.nnodes == 1 else None,
        shutdown_timeout=req.shutdown_timeout,
    )
    try:
        launch_agent(config, req.argv[0], list(req.argv[1:]))
    except ChildFailedError as e:
        return AgentResult(False, 1, describe_failures(e, Path(req.log_dir), *node.oom_ranks(e.failures)),
                           f"each rank's full output is under {req.log_dir}", _first_failure_time(e))
    except SignalException as e:
        sig = signal.Signals(e.sigval)
        return AgentResult(False, 128 + int(e.sigval), f"interrupted by {sig.name}; all ranks were stopped")
    except Exception as e:  # rendezvous or agent failure
        return AgentResult(False, 1, f"the elastic agent failed: {type(e).__name__}: {e}",
                           f"see the rank logs under {req.log_dir}")
    finally:
        node.stop()  # kills and removes the job's cgroup: nothing of the job survives it
    return AgentResult(True)


def _first_failure_time(err: object) -> float:
    """When this agent saw its ranks fail (torch's own failure timestamps are whole seconds)."""
    return time.time()


def describe_failures(err: object, log_dir: Path, oom_ranks: set[int] | None = None, oom_reason: str = "") -> str:
    failures = getattr(err, "failures", {}) or {}
    lines = []
    for rank in sorted(failures):
        f = failures[rank]
        exitcode = getattr(f, "exitcode", None)
        if oom_ranks and rank in oom_ranks:
            how = f"was killed by the kernel OOM killer: {oom_reason}"
        elif exitcode is not None and exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-exitcode}"
        else:
            how = f"exited with code {exitcode}"
        lines.append(f"rank {rank} (pid {getattr(f, 'pid', '?')}) {how}")
    msg = "the job failed: " + "; ".join(lines)
    if oom_reason and not oom_ranks:
        msg += f" ({oom_reason})"
    try:
        root_rank, first = err.get_first_failure()  # type: ignore[attr-defined]
    except Exception:
        return msg
    message = _error_message(first)
    if not message or message == "<NONE>":
        message = _stderr_tail(log_dir, root_rank)
    if message:
        msg += f"\nfirst failure (rank {root_rank}):\n{message}"
    return msg


def _error_message(failure: object) -> str:
    data = getattr(failure, "error_file_data", None) or {}
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, dict):
        extra = message.get("extraInfo", {}) or {}
        return str(extra.get("py_callstack") or message.get("message", "")).rstrip()
    if isinstance(message, str):
        return message.rstrip()
    return str(getattr(failure, "message", "") or "").rstrip()


def _stderr_tail(log_dir: Path, rank: object, lines: int = 15) -> str:
    """The last lines a rank wrote (when it left no error file): its ``rank<N>.log``."""
    if rank is None:
        return ""
    from aitrain.launcher.node.logstream import flush_all

    flush_all()  # the streamer may still hold the rank's last lines
    try:
        text = (log_dir / f"rank{rank}.log").read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# -- the agent as a child process of the CLI ---------------------------------


class AgentProcess:
    """A started agent process waiting for its request (see module docstring)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aitrain.launcher.agent"],
            stdin=subprocess.PIPE,
            text=True,
            # Its own process group: a terminal Ctrl-C reaches only the CLI, which
            # forwards it once (two SIGINTs would interrupt the agent's teardown).
            start_new_session=True,
        )

    def run(self, req: AgentRequest) -> AgentResult:
        """Send the request and wait; SIGINT/SIGTERM/SIGHUP to the CLI are forwarded."""
        assert self.proc.stdin is not None
        forwarded: list[int] = []

        def forward(signum: int, _frame: Any) -> None:
            forwarded.append(signum)
            if self.proc.poll() is None:
                self.proc.send_signal(signum)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            try:
                self.proc.stdin.write(req.to_json() + "\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            code = self.proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        result = AgentResult.read(Path(req.result_file))
        if result is not None:
            return result
        if forwarded:
            sig = signal.Signals(forwarded[0])
            return AgentResult(False, 128 + int(sig), f"interrupted by {sig.name}; all ranks were stopped")
        return AgentResult(False, code or 1, f"the agent process exited with code {code} without a result",
                           f"see the rank logs under {req.log_dir}")

    def discard(self) -> None:
        """Stop an agent that never got a request (it has started nothing yet)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


_prespawned: AgentProcess | None = None


def prespawn() -> None:
    """Start an agent now so it imports torch while the caller composes the job."""
    global _prespawned
    if _prespawned is None:
        _prespawned = AgentProcess()


def take() -> AgentProcess:
    """The pre-started agent if there is one, else a new one."""
    global _prespawned
    agent, _prespawned = _prespawned, None
    return agent if agent is not None else AgentProcess()


def discard_prespawned() -> None:
    global _prespawned
    if _prespawned is not None:
        _prespawned.discard()
        _prespawned = None


def forward_to_ranks(signum: int) -> list[int]:
    """Send ``signum`` to this agent's direct children (its ranks); returns their pids."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            try:
                os.kill(int(entry), signum)
                pids.append(int(entry))
            except ProcessLookupError:
                pass
    return pids


def _install_preemption_forwarding() -> None:
    """SIGUSR1/SIGUSR2 (Slurm's --signal before the time limit) go to the ranks, which
    checkpoint and stop; by default they would kill the agent."""

    def handler(signum: int, _frame: Any) -> None:
        pids = forward_to_ranks(signum)
        print(f"aitrain.agent: forwarded {signal.Signals(signum).name} to ranks {pids}", file=sys.stderr,
              flush=True)

    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, handler)


def _slurm_request(path: str) -> AgentRequest:
    """This node's request from a file holding one request per node: by node name
    (SLURMD_NODENAME; robust when some nodes of the allocation were left out), else by
    SLURM_NODEID."""
    reqs = json.loads(Path(path).read_text())
    name = os.environ.get("SLURMD_NODENAME")
    for r in reqs:
        if name and r.get("env", {}).get("AITRAIN_NODE") == name:
            return AgentRequest(**r)
    node_rank = int(os.environ.get("SLURM_NODEID", "0"))
    if not 0 <= node_rank < len(reqs):
        raise SystemExit(f"aitrain.agent: node {name or node_rank} has no entry among the {len(reqs)} "
                         f"node requests in {path}")
    return AgentRequest(**reqs[node_rank])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from aitrain.launcher.supervise import die_with_parent

    _install_preemption_forwarding()
    if not argv:
        die_with_parent()
        import torch.distributed.launcher.api  # noqa: F401  (the slow part, done while waiting)

        line = sys.stdin.readline()
        if not line.strip():
            return 0  # abandoned: the launch failed before it needed us
        req = AgentRequest(**json.loads(line))
    elif argv[0] == "--slurm":
        req = _slurm_request(argv[1])
    else:
        req = AgentRequest(**json.loads(Path(argv[0]).read_text()))
    result = run_agent(req)
    Path(req.result_file).write_text(json.dumps(asdict(result)))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
