"""What runs on the Ray workers of ``backend=ray``: one :class:`RankActor` per rank.

The actor is deliberately thin. It starts the rank program (the same argv the local
backend runs: the built-in job or the user's script) as a child process with the
torch.distributed env, the node's tuned fabric env and the job env; writes every line
the rank prints to ``<run_dir>/logs/<node>/rank<N>.log`` on its node; and hands the
lines to the driver, which prints them with a ``[rank<N> <node>]:`` prefix. The first
actor of each node also probes that node's fabric (an actor task: the probe runs in
the node's network namespace, where the ranks will run).

The rank process is in its own session (so a stop reaches whatever it started) and is
armed with PR_SET_PDEATHSIG on the thread that starts and reaps it, so when Ray kills
the actor (teardown, a dead driver, a dead node) the rank goes with it.

This module imports neither torch nor ray at import time: the driver wraps the class
with ``ray.remote`` when the backend is used.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from aitrain.launcher.warm import STARTUP_VARS, WARM_IMPORTS, run_here, warm_compatible  # noqa: F401

MAX_BUFFERED_LINES = 20000  # lines kept for the driver; older ones are only in the rank's log file
TAIL_LINES = 30  # lines kept for the error message when the rank fails
MAX_LINE = 64 * 1024


def _write_if_missing(path: Path, text: str) -> None:
    """Ship a file (the job config) to this node unless it is already there (shared FS)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _child_setup() -> None:
    os.setsid()  # a stop signals the rank's whole process group
    from aitrain.launcher.supervise import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)


class RankActor:
    """One rank of the job, pinned to its node's bundle of the placement group."""

    def __init__(self, rank: int, node_rank: int, node: str, local_rank: int,
                 job_env: dict[str, str] | None = None, prespawn: bool = True,
                 warm_imports: list[str] | None = None) -> None:
        os.umask(0o077)  # the rank's log, the shipped config and what the rank writes: its user's only
        # A Jobs API job's runtime_env reaches every actor: the driver's secret arguments are not the rank's.
        from aitrain.launcher.redact import SECRET_ARGS_ENV

        os.environ.pop(SECRET_ARGS_ENV, None)
        self.rank, self.node_rank, self.node, self.local_rank = rank, node_rank, node, local_rank
        self._cond = threading.Condition()
        self._lines: deque[tuple[bool, str]] = deque()
        self._base = 0  # index of self._lines[0] in the rank's whole output
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._proc: subprocess.Popen[bytes] | None = None
        self._exit: int | None = None
        self._exited_at: float | None = None
        self._stopping = False
        self._log_path: Path | None = None
        self._log_ready = threading.Event()
        self._warm: subprocess.Popen[bytes] | None = None
        self._once: dict[str, subprocess.Popen[bytes]] = {}
        self._once_stopped: set[str] = set()
        self._warm_env = {**os.environ, **(job_env or {})}
        self._warm_imports = ",".join(warm_imports) if warm_imports else DEFAULT_WARM_IMPORTS
        if prespawn:
            self._spawn_warm()

    # -- facts about where the actor landed ---------------------------------------

    def info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        try:
            gpus = [str(g) for g in ray.get_gpu_ids()]
        except Exception:  # no GPUs requested
            gpus = []
        return {"rank": self.rank, "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "hostname": socket.gethostname(), "pid": os.getpid(), "gpu_ids": gpus,
                "actor_id": ctx.get_actor_id(), "python": sys.executable, "cwd": os.getcwd()}

    def probe(self, name: str) -> dict[str, Any]:
        """This node's probe document (what ``python -m aitrain.fabric.probe --host-check``
        prints), the host named ``name``."""
        from aitrain.fabric.node import node_document

        return node_document(hostname=name, host_check=True)

    def free_port(self, address: str) -> int:
        from aitrain.launcher.util import free_port

        return free_port(address)

    # -- short programs before the rank (the pre-launch smoke all_reduce) -------------

    def run_once(self, key: str, args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
        """Run ``python args...`` on this node to completion (killed after ``timeout``); its exit
        code (None: timed out or stopped) and last lines. ``stop_once(key)`` stops it early."""
        if key in self._once_stopped:  # its group was stopped before this node got to start it
            return {"exit": None, "lines": [], "node": self.node}
        proc = subprocess.Popen([sys.executable, *args], env={**self._warm_env, **env}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_child_setup)
        with self._cond:
            self._once[key] = proc
            stopped = key in self._once_stopped
        if stopped:
            _kill_group(proc)
        try:
            out, _ = proc.communicate(timeout=timeout)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            code = None
        finally:
            with self._cond:
                self._once.pop(key, None)
        if key in self._once_stopped:
            code = None
        lines = out.decode(errors="replace").splitlines()
        return {"exit": code, "lines": lines[-TAIL_LINES:], "node": self.node}

    def stop_once(self, key: str) -> None:
        with self._cond:
            self._once_stopped.add(key)
            proc = self._once.get(key)
        if proc is not None:
            _kill_group(proc)

    # -- the rank process -----------------------------------------------------------

    def start(self, argv: list[str], env: dict[str, str], log_file: str, cwd: str | None = None,
              files: dict[str, str] | None = None, driver_python: str | None = None) -> int:
        """Start the rank program; returns once it is running (its pid)."""
        for path, text in (files or {}).items():
            _write_if_missing(Path(path), text)
        argv = list(argv)
        if driver_python and argv and argv[0] == driver_python:
            argv[0] = sys.executable  # the cluster's Python environment, wherever the driver ran
        full_env = dict(self._warm_env)
        full_env.update(env)
        full_env["AITRAIN_SPAWN_TIME"] = f"{time.time():.6f}"
        log = Path(log_file)
        log.parent.mkdir(parents=True, exist_ok=True)
        workdir = cwd if cwd and os.path.isdir(cwd) else os.getcwd()
        if self._warm is not None:
            if self._warm.poll() is None and warm_compatible(argv, self._warm_env, full_env):
                return self._start_warm(argv, full_env, workdir, log)
            self._discard_warm()
        started = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits: this
            # thread lives until the rank has exited, so only the actor's death kills it.
            try:
                self._proc = subprocess.Popen(argv, env=full_env, cwd=workdir, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              preexec_fn=_child_setup)
            except BaseException as e:  # noqa: BLE001 - reported to the driver
                failed.append(e)
                started.set()
                return
            started.set()
            self._pump(self._proc, log)

        threading.Thread(target=run, name=f"aitrain-rank{self.rank}", daemon=True).start()
        started.wait()
        if failed:
            raise RuntimeError(f"cannot start rank {self.rank} on {self.node}: {failed[0]}") from failed[0]
        assert self._proc is not None
        return self._proc.pid

    # -- the warm interpreter: torch imported while the driver probes and tunes ----------

    def _spawn_warm(self) -> None:
        started = threading.Event()

        def run() -> None:
            try:
                self._warm = subprocess.Popen(
                    [sys.executable, "-u", "-m", "aitrain.launcher.backends.ray.worker", "--warm"],
                    env={**self._warm_env, WARM_IMPORTS_ENV: self._warm_imports},
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_child_setup)
            except OSError:
                self._warm = None
                started.set()
                return
            started.set()
            self._log_ready.wait()  # the log file is known once start() is called
            if self._proc is self._warm and self._log_path is not None:
                self._pump(self._warm, self._log_path)

        self._warm_thread = threading.Thread(target=run, name=f"aitrain-rank{self.rank}-warm", daemon=True)
        self._warm_thread.start()
        started.wait()

    def _start_warm(self, argv: list[str], env: dict[str, str], cwd: str, log: Path) -> int:
        import json

        proc = self._warm
        assert proc is not None and proc.stdin is not None
        self._proc, self._log_path = proc, log
        self._log_ready.set()
        proc.stdin.write((json.dumps({"argv": argv, "env": env, "cwd": cwd}) + "\n").encode())
        proc.stdin.close()
        return proc.pid

    def _discard_warm(self) -> None:
        proc, self._warm = self._warm, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        self._log_ready.set()

    def _pump(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        sel = selectors.DefaultSelector()
        bufs: dict[int, bytes] = {}
        assert proc.stdout is not None and proc.stderr is not None
        for stream, is_err in ((proc.stdout, False), (proc.stderr, True)):
            os.set_blocking(stream.fileno(), False)
            sel.register(stream, selectors.EVENT_READ, is_err)
            bufs[stream.fileno()] = b""
        exited_at: float | None = None
        with open(log_path, "ab") as log:
            while sel.get_map():
                events = sel.select(timeout=0.5)
                for key, _ in events:
                    fd = key.fileobj.fileno()  # type: ignore[union-attr]
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(key.fileobj)
                        data, final = b"", True
                    else:
                        final = False
                    bufs[fd] = self._emit(bufs[fd] + data, key.data, log, final)
                log.flush()
                if proc.poll() is not None:
                    # A grandchild may hold the pipes open: give it a moment, then stop reading.
                    exited_at = exited_at or time.monotonic()
                    if not events and time.monotonic() - exited_at > 1.0:
                        break
        sel.close()
        code = proc.wait()
        with self._cond:
            self._exit = code
            self._exited_at = time.time()
            self._cond.notify_all()

    def _emit(self, data: bytes, is_err: bool, log: Any, final: bool) -> bytes:
        lines = data.split(b"\n")
        rest = lines.pop()
        if final and rest:
            lines.append(rest)
            rest = b""
        while len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        progress = _shown(rest) if b"\r" in rest else ""
        if not lines and not progress:
            return rest
        with self._cond:
            for raw in lines:
                log.write(raw + b"\n")
                text = _shown(raw)  # a \r-rewritten line ends as what a terminal shows
                self._lines.append((is_err, text))
                self._tail.append(text)
            if progress:  # a line still being rewritten with \r (a progress bar): its state now
                self._lines.append((is_err, PROGRESS_MARK + progress))
            while len(self._lines) > MAX_BUFFERED_LINES:
                self._lines.popleft()
                self._base += 1
            self._cond.notify_all()
        return rest

    def poll(self, cursor: int, wait_s: float = 0.5) -> dict[str, Any]:
        """Lines after ``cursor`` (waiting up to ``wait_s`` for some), and the exit code once exited."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while self._base + len(self._lines) <= cursor and self._exit is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            start = max(cursor - self._base, 0)
            lines = list(self._lines)[start:] if start < len(self._lines) else []
            return {"lines": lines, "cursor": self._base + len(self._lines),
                    "dropped": max(self._base - cursor, 0), "exit": self._exit,
                    "exited_at": self._exited_at, "pid": self._proc.pid if self._proc else None}

    def tail(self) -> list[str]:
        with self._cond:
            return list(self._tail)

    def stop(self, grace_s: float = 3.0) -> int | None:
        """SIGTERM the rank's process group, SIGKILL what is left after ``grace_s`` (idempotent)."""
        with self._cond:
            once = list(self._once.values())
        for p in once:
            _kill_group(p)
        proc = self._proc
        if proc is not self._warm:
            self._discard_warm()
        if proc is None:
            return None
        self._stopping = True
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        try:  # anything the rank left behind in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.poll()


# -- the warm interpreter ------------------------------------------------------------------

WARM_IMPORTS_ENV = "AITRAIN_WARM_IMPORTS"
DEFAULT_WARM_IMPORTS = ",".join(WARM_IMPORTS)

# Marks an entry of ``poll``'s lines that is the current state of a \r progress line.
PROGRESS_MARK = "\x00progress\x00"


def _shown(raw: bytes) -> str:
    """What a terminal shows of a line rewritten with ``\\r``: its last non-empty segment."""
    text = raw.decode(errors="replace").rstrip("\r")
    return next((seg for seg in reversed(text.split("\r")) if seg), "")


def warm_main() -> int:
    """``python -m aitrain.launcher.backends.ray.worker --warm``: import torch, then run the rank program
    the actor sends on stdin (``{"argv", "env", "cwd"}``) as ``python`` would."""
    import importlib
    import json
    import select

    # The slow part, done while the driver probes and tunes: torch, then (unless the rank's
    # request is already here) what DDP/FSDP import on first use (torch._dynamo: ~1.5 s).
    for i, name in enumerate(os.environ.get(WARM_IMPORTS_ENV, DEFAULT_WARM_IMPORTS).split(",")):
        if i >= 2 and select.select([sys.stdin], [], [], 0)[0]:
            break
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the program will import (and report) what it needs
            pass
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # discarded
    req = json.loads(line)
    return run_here(req["argv"], req["env"], req["cwd"])  # the rank's env (without AITRAIN_WARM_IMPORTS)


if __name__ == "__main__" and sys.argv[1:] == ["--warm"]:
    sys.exit(warm_main())
