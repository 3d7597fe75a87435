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

import errno
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aitrain.launcher.failures import (
    NodeResult,
    RankExit,
    describe,
    error_line,
    exit_code_of,
    exit_from_status,
    root_cause_first,
)
from aitrain.launcher.util import STORAGE_ERRNOS, write_atomic

if TYPE_CHECKING:
    from aitrain.launcher.backends.api import Outcome
    from aitrain.launcher.zygote import Zygote


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
    cwd: str = ""  # where the ranks run (default: the agent's own directory)
    container: dict[str, Any] = field(default_factory=dict)  # runtime, label, mkdirs (launcher/container.py)
    fork_server: bool = False  # start the ranks from the agent's zygote (launcher/zygote.py) where it can
    # The pre-launch smoke all_reduce over the job's nodes, run by the agents before their ranks:
    # {"port": rendezvous port, "timeout": seconds, "dir": where each node writes its outcome}.
    smoke: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


RESULT_FD_ENV = "AITRAIN_AGENT_RESULT_FD"


class AgentResult(NodeResult):
    """What the agent writes to ``result_file`` when its ranks have ended (one node's
    :class:`~aitrain.launcher.failures.NodeResult`: ok, exit code, message, hint, and how
    each rank ended)."""

    @classmethod
    def read(cls, path: Path) -> AgentResult | None:
        try:
            d = json.loads(path.read_text())
            res = cls.from_dict(d)
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        return cls(ok=res.ok, exit_code=res.exit_code, message=res.message, hint=res.hint, node=res.node,
                   ranks=res.ranks, interrupted=res.interrupted)

    def write(self, path: Path) -> None:
        write_atomic(path, json.dumps(self.to_dict()))

    def outcome(self) -> Outcome:
        """The job's outcome when this is its only node."""
        from aitrain.launcher.backends.api import JobState, Outcome

        if self.ok:
            return Outcome.succeeded()
        state = JobState.CANCELLED if self.interrupted else JobState.FAILED
        return Outcome(state, self.exit_code or 1, self.message, self.hint, tuple(self.ranks))


def run_agent(req: AgentRequest, zygote: Zygote | None = None) -> AgentResult:
    """Run the ranks of one node under torch's elastic agent (blocks until they end);
    with a ``zygote`` (launcher/zygote.py), ranks it can run are forked from it."""
    from aitrain.launcher.node.services import NodeServices
    from aitrain.launcher.zygote import forkable

    if req.smoke:  # the smoke all_reduce first: ranks start only on nodes that can talk to each other
        smoke = run_smoke(req, zygote)
        if not smoke["ok"]:
            return AgentResult(False, SMOKE_FAILED_EXIT, f"the smoke all_reduce failed on this node: {smoke['error']}",
                               "the launcher bisects the nodes to name the bad one(s)", node=_node_name(req))
    if zygote is not None and req.fork_server and forkable(req.argv):
        req = replace(req, argv=zygote.wrap(req.argv), env={**req.env, **zygote.env()})
    elif zygote is not None:
        zygote.stop()
    # Rank log files and console, system metrics and the hang watchdog of this node.
    with NodeServices(req) as services:
        result = _run_elastic(req, services)
    hang = services.hang_result()  # the watchdog stopped the job: say so, not "interrupted by SIGTERM"
    if hang:
        code, message, hint = hang
        return AgentResult(False, code, message, hint, node=result.node, ranks=result.ranks)
    return result


SMOKE_FAILED_EXIT = 3


def run_smoke(req: AgentRequest, zygote: Zygote | None) -> dict[str, Any]:
    """This node's part of the smoke all_reduce (``aitrain.fabric.bench_rank --mode smoke``, one
    rank per node, the tuned env), forked from the zygote where there is one (no second torch
    import); its outcome is written to ``<smoke dir>/<node>.json`` for the launcher."""
    import time

    timeout = float(req.smoke.get("timeout", 30))
    argv = [sys.executable, "-u", "-m", "aitrain.fabric.bench_rank", "--mode", "smoke", "--timeout", f"{timeout:g}"]
    env = {**os.environ, **req.env, "RANK": str(req.node_rank), "GROUP_RANK": str(req.node_rank),
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": str(req.nnodes),
           "MASTER_ADDR": req.master_addr, "MASTER_PORT": str(req.smoke["port"])}
    if zygote is not None:
        argv, env = zygote.wrap(argv), {**env, **zygote.env()}
    t0 = time.monotonic()
    try:
        out = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=timeout + 30, check=False)
        code, err = out.returncode, out.stderr
    except subprocess.TimeoutExpired as e:
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        code, err = -9, f"{tail}\nno answer within {timeout + 30:g}s"
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith(("W1", "I1"))]
    doc = {"node": _node_name(req) or str(req.node_rank), "ok": code == 0, "exit_code": code,
           "seconds": time.monotonic() - t0, "error": lines[-1] if code and lines else ("" if code == 0 else
                                                                                       f"exit {code}")}
    try:
        directory = Path(req.smoke["dir"])
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / f"{doc['node']}.json", json.dumps(doc))
    except OSError:
        pass
    return doc


def _node_name(req: AgentRequest) -> str:
    """The job node's name in failure messages: set by multi-node backends, empty on one node."""
    if req.nnodes <= 1 and not req.env.get("AITRAIN_NODE"):
        return ""
    return req.env.get("AITRAIN_NODE") or req.env.get("AITRAIN_NODE_NAME") or f"node{req.node_rank}"


def _run_elastic(req: AgentRequest, services: Any) -> AgentResult:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, launch_agent

    # Ranks inherit the agent's environment; the agent adds the torch.distributed vars.
    os.environ.update(req.env)
    if req.cwd:
        os.chdir(req.cwd)  # ranks inherit it (hydra.job.chdir=true: the run dir)
    Path(req.log_dir).mkdir(parents=True, exist_ok=True)
    from aitrain.launcher.resources import NodeResources

    node_name = _node_name(req)
    ranks = range(req.node_rank * req.nproc_per_node, (req.node_rank + 1) * req.nproc_per_node)
    # The job's cgroup exists before the first rank starts; ranks get their part of the plan in the env.
    node = NodeResources.start(req.resources, nproc=req.nproc_per_node, node_rank=req.node_rank)
    os.environ.update(node.rank_env())
    container = req.container.get("runtime", "")
    if container:
        from aitrain.launcher.container import CONTAINER_ENV

        os.environ[CONTAINER_ENV] = container
        for d in req.container.get("mkdirs", []):  # a bind mount's source must exist
            Path(d).mkdir(parents=True, exist_ok=True)
    config = LaunchConfig(
        min_nodes=req.nnodes,
        max_nodes=req.nnodes,
        nproc_per_node=req.nproc_per_node,
        run_id=req.run_id,
        role="default",  # torchrun's --role default (ROLE_NAME); LaunchConfig's own is "default_role"
        rdzv_backend="static",
        rdzv_endpoint=f"{req.master_addr}:{req.master_port}",
        rdzv_configs={"rank": req.node_rank, "timeout": req.rdzv_timeout},
        max_restarts=req.max_restarts,
        monitor_interval=req.monitor_interval,
        start_method=req.start_method,
        log_line_prefix_template="[rank${rank}]:",
        logs_specs=services.logs_specs,
        local_addr=req.master_addr if req.nnodes == 1 else None,
        shutdown_timeout=req.shutdown_timeout,
    )
    _tolerate_unreadable_error_files()
    try:
        launch_agent(config, req.argv[0], list(req.argv[1:]))
    except ChildFailedError as e:
        exits = rank_exits(e.failures, ranks, services, node_name, *node.oom_ranks(e.failures),
                           container=bool(container))
        hint = f"each rank's full output is under {req.log_dir}"
        storage = storage_hint(exits, Path(req.log_dir).parent)
        return AgentResult(False, exit_code_of(exits), describe(exits), f"{storage}; {hint}" if storage else hint,
                           node=node_name, ranks=exits)
    except SignalException as e:
        sig = signal.Signals(e.sigval)
        exits = [RankExit(r, node=node_name, signal=sig.name, stopped=True) for r in ranks]
        return AgentResult(False, 128 + int(e.sigval), f"interrupted by {sig.name}; all ranks were stopped",
                           node=node_name, ranks=exits, interrupted=True)
    except Exception as e:  # rendezvous or agent failure
        return AgentResult(False, 1, f"the elastic agent failed: {type(e).__name__}: {e}",
                           f"see the rank logs under {req.log_dir}", node=node_name)
    finally:
        if container == "podman":  # a rank whose `podman run` was killed leaves its container running
            from aitrain.launcher.container import remove_containers

            remove_containers(req.container["label"])
        node.stop()  # kills and removes the job's cgroup: nothing of the job survives it
    return AgentResult(True, node=node_name)


# What to do about each of STORAGE_ERRNOS, found by its text (os.strerror) in the rank's output.
_STORAGE_HINTS = {
    errno.ENOSPC: "the disk is full: free space there (df -h {path}) or set run_root=/checkpoint.dir= on another "
                  "filesystem",
    errno.EDQUOT: "the disk quota is used up: free space there or raise the quota",
    errno.EIO: "the storage failed (EIO): check the filesystem ({path}) and its server",
    errno.EROFS: "the filesystem is read-only: set run_root=/checkpoint.dir= elsewhere",
    errno.EACCES: "permission denied: check the path's owner and mode (ls -ld {path})",
}


def storage_hint(exits: list[RankExit], run_dir: Path | None = None) -> str:
    """What to do when the root cause is a storage fault: the rank's OSError line names it, or
    the run dir's filesystem is full (a library may turn ENOSPC into an error of its own:
    torch.save says "unexpected pos")."""
    import re

    if run_dir is not None:
        try:
            st = os.statvfs(run_dir)
            if st.f_bavail * st.f_frsize < (1 << 20):
                return (f"the disk under {run_dir} is full ({st.f_bavail * st.f_frsize} bytes free): free space "
                        f"there (df -h {run_dir}) or set run_root=/checkpoint.dir= on another filesystem")
        except OSError:
            pass
    for e in exits[:1]:  # the root cause
        text = " ".join([e.error, *e.tail[-3:]])
        for code in STORAGE_ERRNOS:
            if os.strerror(code) in text:
                m = re.search(r"\[Errno \d+\] [^:]+: '([^']+)'", text) or re.search(r" under (/\S+)", text)
                return _STORAGE_HINTS[code].format(path=m.group(1) if m else "the run dir")
    return ""


# Signals the elastic agent stops the other ranks with when one has failed.
_STOP_SIGNALS = ("SIGTERM", "SIGKILL")


def rank_exits(failures: dict[int, Any], ranks: Any, services: Any, node: str = "",
               oom_ranks: set[int] | None = None, oom_reason: str = "", container: bool = False) -> list[RankExit]:
    """How every rank of this node ended, from torch's failures and the node's services.

    torch reports the ranks that had ended badly when it looked; the others it then
    stopped (SIGTERM, then SIGKILL). A reported rank that was killed by one of those
    signals after the first failure was stopped too. Each rank's end time comes from the
    node's exit clock (``node/exits.py``), else torch's whole-second timestamp; its last
    lines from the rank streams. A rank in a ``container`` reports a signal as the shell
    does (128+N): that is the signal.
    """
    from aitrain.launcher.node.logstream import flush_all

    flush_all()  # the streamer may still hold the ranks' last lines
    exits: list[RankExit] = []
    for rank in ranks:
        f = failures.get(rank)
        ended = services.ended_at(rank) if services is not None else None
        tail = tuple(services.tail(rank)) if services is not None else ()
        if f is None:
            exits.append(RankExit(rank, node=node, signal="SIGTERM", stopped=True, ended_at=ended))
            continue
        code = getattr(f, "exitcode", None)
        if container and isinstance(code, int) and 128 < code < 128 + 65:
            code = -(code - 128)
        error, trace = _error_file(f)
        if ended is None:
            ended = float(getattr(f, "timestamp", 0) or 0) or None
        base = exit_from_status(rank, code, node=node, ended_at=ended, pid=getattr(f, "pid", None),
                                tail=tuple(trace.splitlines()) if trace else tail)
        error = error or error_line(services.err_tail(rank) if services is not None else tail)
        oom = oom_reason if oom_ranks and rank in oom_ranks else ""
        exits.append(replace(base, error=error, oom=oom))
    own = [e for e in exits if e.failed and e.signal not in _STOP_SIGNALS and e.ended_at is not None]
    first = min((e.ended_at for e in own if e.ended_at is not None), default=None)
    if first is not None:  # killed by the agent's own stop signals after the first failure: stopped
        exits = [replace(e, stopped=True) if e.signal in _STOP_SIGNALS and not e.oom and e.ended_at is not None
                 and e.ended_at >= first else e for e in exits]
    if oom_reason and not oom_ranks:
        exits = [replace(e, error=e.error or oom_reason) if e.failed else e for e in exits]
    return root_cause_first(exits)


def _tolerate_unreadable_error_files() -> None:
    """Make torch read a rank's error file that does not parse as no error file at all.

    ``@record`` writes TORCHELASTIC_ERROR_FILE in the run dir; on a disk that just filled up
    it is left empty or cut off, and torch's agent raises while reading it (json.load in
    ``ProcessFailure.__post_init__``), losing every rank's failure. Treated as missing, the
    rank's failure is reported from its stderr, as for a rank without ``@record``.
    """
    from torch.distributed.elastic.multiprocessing import errors

    cls = errors.ProcessFailure
    if getattr(cls.__post_init__, "aitrain_tolerant", False):
        return
    read = cls.__post_init__

    def post_init(self: Any) -> None:
        if os.path.isfile(self.error_file) and not _error_file_readable(self):
            self.error_file = errors._NOT_AVAILABLE  # what torch sets when a rank wrote none
        read(self)

    post_init.aitrain_tolerant = True  # type: ignore[attr-defined]
    cls.__post_init__ = post_init  # type: ignore[method-assign]


def _error_file_readable(failure: Any) -> bool:
    """Whether torch can read ``failure.error_file``: JSON with the message torch looks for."""
    try:
        with open(failure.error_file) as f:
            failure._get_error_data(json.load(f))
        return True
    except Exception:  # noqa: BLE001 - whatever torch would raise on reading it
        return False


def _error_file(failure: object) -> tuple[str, str]:
    """(error line, traceback) from the rank's torchelastic error file (``@record``), if any."""
    data = getattr(failure, "error_file_data", None) or {}
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, dict):
        extra = message.get("extraInfo", {}) or {}
        return str(message.get("message") or "").strip(), str(extra.get("py_callstack") or "").rstrip()
    if isinstance(message, str) and message.strip() and message.strip() != "<NONE>":
        return message.strip().splitlines()[-1], message.rstrip()
    return "", ""


# -- the agent as a child process of the CLI ---------------------------------


class AgentProcess:
    """A started agent process waiting for its request (see module docstring)."""

    def __init__(self) -> None:
        # The result also comes back through a pipe: a full or failing disk must not lose it.
        self._result_r, result_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aitrain.launcher.agent"],
            stdin=subprocess.PIPE,
            text=True,
            # Its own process group: a terminal Ctrl-C reaches only the CLI, which
            # forwards it once (two SIGINTs would interrupt the agent's teardown).
            start_new_session=True,
            pass_fds=(result_w,),
            env={**os.environ, RESULT_FD_ENV: str(result_w)},
        )
        os.close(result_w)

    def _piped_result(self) -> AgentResult | None:
        os.set_blocking(self._result_r, False)  # the agent has exited: all there is, is there
        with os.fdopen(self._result_r, "rb") as r:
            try:
                data = r.read() or b""
            except BlockingIOError:
                data = b""
        try:
            return AgentResult.from_dict(json.loads(data)) if data.strip() else None  # type: ignore[return-value]
        except (ValueError, TypeError, AttributeError):
            return None

    def run(self, req: AgentRequest) -> AgentResult:
        """Send the request and wait; SIGINT/SIGTERM/SIGHUP to the CLI are forwarded."""
        assert self.proc.stdin is not None
        forwarded: list[int] = []

        def forward(signum: int, _frame: Any) -> None:
            forwarded.append(signum)
            if self.proc.poll() is not None:
                return
            if signum == signal.SIGINT and forwarded.count(signal.SIGINT) > 1:
                # A second Ctrl-C: stop at once (the ranks die with the agent: parent-death signal).
                self.proc.kill()
                return
            # Ctrl-C reaches the ranks as SIGTERM, which they were told to stop on (a checkpoint
            # if one is configured, no KeyboardInterrupt traceback from every rank).
            self.proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

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
        piped = self._piped_result()
        result = AgentResult.read(Path(req.result_file)) or piped
        if result is not None and forwarded and result.interrupted:
            sig = signal.Signals(forwarded[0])  # say what the user did (Ctrl-C), not what the ranks got
            result.exit_code = 128 + int(sig)
            result.message = f"interrupted by {sig.name}; all ranks were stopped"
        if result is not None:
            return result
        if forwarded:
            sig = signal.Signals(forwarded[0])
            return AgentResult(False, 128 + int(sig), f"interrupted by {sig.name}; all ranks were stopped",
                               interrupted=True)
        return AgentResult(False, code or 1, f"the agent process exited with code {code} without a result",
                           f"see the rank logs under {req.log_dir}")

    def discard(self) -> None:
        """Stop an agent that never got a request (it has started nothing yet)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        try:
            os.close(self._result_r)
        except OSError:
            pass
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
    result_fd = os.environ.pop(RESULT_FD_ENV, "")  # not for the ranks
    from aitrain.launcher.supervise import die_with_parent

    _install_preemption_forwarding()
    zygote = None
    if not argv:
        die_with_parent()
        import torch.distributed.launcher.api  # noqa: F401  (the slow part, done while waiting)

        from aitrain.launcher.zygote import Zygote

        # Now: torch is imported and no thread runs yet.
        zygote = Zygote.start(close_fds=[int(result_fd)] if result_fd.isdigit() else [])
        line = sys.stdin.readline()
        if not line.strip():
            if zygote is not None:
                zygote.stop()
            return 0  # abandoned: the launch failed before it needed us
        req = AgentRequest(**json.loads(line))
    elif argv[0] == "--slurm":
        req = _slurm_request(argv[1])
        if req.fork_server or req.smoke:  # the smoke rank is forked from the zygote too
            import torch.distributed.launcher.api  # noqa: F401, I001  (before the zygote forks from here)

            from aitrain.launcher.zygote import Zygote

            zygote = Zygote.start()
    else:
        req = AgentRequest(**json.loads(Path(argv[0]).read_text()))
    try:
        result = run_agent(req, zygote)
    finally:
        if zygote is not None:
            zygote.stop()
    try:
        result.write(Path(req.result_file))
    except OSError as e:
        from aitrain.launcher.util import describe_os_error

        print(f"aitrain.agent: {describe_os_error(e, req.result_file)}", file=sys.stderr, flush=True)
    if result_fd.isdigit():  # the launcher that started this agent reads it from the pipe if the file is missing
        try:
            with os.fdopen(int(result_fd), "wb") as w:
                w.write(json.dumps(result.to_dict()).encode())
        except OSError:
            pass
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
