"""Ranks forked from a process that has already imported torch (a fork server).

A fresh rank spends about a second importing torch before it does anything. The node agent
imports torch anyway (while the launcher composes the job), so right after that import it
forks a *zygote*: a single-threaded process that imports the built-in job's modules and then
only forks. Each rank is then started by torch's elastic agent, as before, as a small client
process (``python -m aitrain.launcher.zygote PROGRAM...``, no torch) that hands the zygote
its argv, environment, working directory and stdin/stdout/stderr (SCM_RIGHTS) and gets back
a forked child running the program in a process that has torch loaded already. This is what
``multiprocessing``'s forkserver with ``set_forkserver_preload`` does, behind torch's agent.

Why it is safe (checked before every fork; a client is told to exec the program itself
otherwise): the zygote never initialises CUDA (``torch.cuda.is_initialized()`` is false: it
imports torch and never touches a device) and runs no Python thread. The one native thread
``import torch`` leaves is OpenBLAS's idle thread server (numpy's), which OpenBLAS shuts down
around ``fork`` (``pthread_atfork``); no lock is held by a thread across the fork.

What the client keeps, so the elastic agent sees an ordinary rank: it forwards SIGTERM,
SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the child, and ends as the child did (the
same exit code, or killed by the same signal). If the client dies (the agent's SIGKILL), the
zygote kills its child; if the zygote dies, its children die with it (PR_SET_PDEATHSIG). The
child's pid is written to ``<zygote dir>/<client pid>.pid`` so the node's services (hang
watchdog stacks, exit clock) look at the real rank (:func:`real_pid`).

Used for the built-in job on the local backend (no trampoline: no binding, cgroup, profiler,
container); ``AITRAIN_FORK_SERVER=0`` turns it off.
"""

from __future__ import annotations

import array
import json
import os
import selectors
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aitrain.launcher.warm import WARM_IMPORTS, program_of, run_here, warm_compatible

ENV = "AITRAIN_ZYGOTE"  # the zygote's directory (its socket is <dir>/sock), for the clients
OFF_ENV = "AITRAIN_FORK_SERVER"  # "0": start every rank as a fresh interpreter
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
PRELOAD = (*WARM_IMPORTS, "aitrain.launcher.train")


def enabled() -> bool:
    return os.environ.get(OFF_ENV, "1") != "0" and hasattr(os, "pidfd_open") and sys.platform == "linux"


def _send(sock: socket.socket, doc: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(doc).encode()
    msg = struct.pack("!I", len(data)) + data
    if fds:
        sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(msg)


def _recv(sock: socket.socket, with_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    fds = array.array("i")
    msg, anc, _, _ = sock.recvmsg(4, socket.CMSG_SPACE(with_fds * fds.itemsize) if with_fds else 0)
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
    if len(msg) < 4:
        return None, list(fds)
    (n,) = struct.unpack("!I", msg)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None, list(fds)
        data += chunk
    return json.loads(data), list(fds)


# -- in the node agent --------------------------------------------------------------------


class Zygote:
    """The fork server of one node agent: forked from it by :meth:`start`."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="aitrain-zygote-"))
        self.pid = 0

    @classmethod
    def start(cls, close_fds: Sequence[int] = ()) -> Zygote | None:
        """Fork the zygote now (the caller has imported torch and runs no other thread);
        ``close_fds``: the caller's descriptors the zygote must not hold open (a result pipe)."""
        import threading

        if not enabled() or threading.active_count() != 1:
            return None
        z = cls()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(z.dir / "sock"))
        listener.listen(128)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for fd in close_fds:
                    os.close(fd)
                _serve(listener)
            except BaseException:  # noqa: BLE001 - nothing may escape a forked process
                code = 1
            os._exit(code)
        listener.close()
        z.pid = pid
        return z

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """What the elastic agent starts as a rank: the client, then the program."""
        return [sys.executable, "-m", "aitrain.launcher.zygote", *argv]

    def env(self) -> dict[str, str]:
        return {ENV: str(self.dir)}

    def stop(self) -> None:
        """End the zygote (its children die with it) and remove its directory."""
        import shutil

        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = 0
        shutil.rmtree(self.dir, ignore_errors=True)


def real_pid(pid: int, environ: dict[str, str]) -> int:
    """The rank process behind a client ``pid`` (itself when it is not a client)."""
    where = environ.get(ENV)
    if not where:
        return pid
    try:
        return int((Path(where) / f"{pid}.pid").read_text())
    except (OSError, ValueError):
        return pid


# -- the zygote -----------------------------------------------------------------------------


def _safe() -> str:
    """Why forking now would not be safe ('' when it is)."""
    import threading

    if threading.active_count() != 1:
        return f"{threading.active_count()} Python threads"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialised"
    return ""


_ZYGOTE_ENV: dict[str, str] = {}  # the zygote's own env (what its imports saw)


def _serve(listener: socket.socket) -> None:
    from aitrain.launcher.supervise import set_parent_death_signal

    _ZYGOTE_ENV.update(os.environ)
    set_parent_death_signal(signal.SIGKILL)  # dies with the agent; its children die with it
    # The agent forwards signals to its children, and its process group may get them: they are
    # for the ranks (through their clients). The zygote ends by SIGKILL (stop, parent death).
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - the child imports it again and reports the error
            pass
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, ("accept", None))
    children: dict[int, tuple[socket.socket, int]] = {}  # pidfd -> (client conn, pid)
    while True:
        for key, _ in sel.select():
            kind, data = key.data
            if kind == "accept":
                conn, _ = listener.accept()
                _start_child(conn, listener, sel, children)
            elif kind == "client":  # the client went away (killed): its rank goes too
                conn, pid = data
                sel.unregister(conn)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            elif kind == "exit":
                pidfd = key.fd
                conn, pid = children.pop(pidfd)
                sel.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                doc = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else \
                    {"code": os.WEXITSTATUS(status)}
                try:
                    _send(conn, doc)
                except OSError:
                    pass
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass
                conn.close()


def _start_child(conn: socket.socket, listener: socket.socket, sel: selectors.BaseSelector,
                 children: dict[int, tuple[socket.socket, int]]) -> None:
    try:
        req, fds = _recv(conn, with_fds=3)
    except (OSError, ValueError):
        conn.close()
        return
    if req is None or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    why = _safe() or ("" if warm_compatible(req["argv"], _ZYGOTE_ENV, req["env"]) else
                      "the rank's env changes what Python or torch read at start-up")
    if why:
        _send(conn, {"exec": why})
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            sel.close()
            listener.close()
            for pidfd, (c, _) in children.items():
                c.close()
                os.close(pidfd)
            conn.close()
            code = _child(req, fds)
        except SystemExit as e:  # as the interpreter ends on it: sys.exit("message") prints it, exit 1
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:  # as the interpreter ends on it: the traceback, then killed by SIGINT
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001
                    pass
        os._exit(code)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    children[pidfd] = (conn, pid)
    sel.register(pidfd, selectors.EVENT_READ, ("exit", None))
    sel.register(conn, selectors.EVENT_READ, ("client", (conn, pid)))
    try:
        _send(conn, {"pid": pid})
    except OSError:
        os.kill(pid, signal.SIGKILL)


def _child(req: dict[str, Any], fds: list[int]) -> int:
    """In the forked child: become the rank the client would have exec'd, and run it."""
    import io

    from aitrain.launcher.supervise import set_parent_death_signal

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
    set_parent_death_signal(signal.SIGKILL)
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
        os.close(fd)
    # `python -u`: unbuffered binary stdout/stderr, line-buffered text, as the exec'd rank had.
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True, line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, line_buffering=True,
                                  errors="backslashreplace")
    return run_here(req["argv"], req["env"], req["cwd"])


def forkable(argv: Sequence[str]) -> bool:
    """A rank program the zygote can run: ``python [-u] (-m MODULE | SCRIPT) ARGS`` of this interpreter."""
    return len(argv) >= 2 and argv[0] == sys.executable and program_of(list(argv)) is not None


# -- the client (what torch's agent starts as the rank) ------------------------------------------


def client(argv: list[str]) -> int:
    where = os.environ.pop(ENV, "")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(Path(where) / "sock"))
        _send(sock, {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}, [0, 1, 2])
        reply, _ = _recv(sock)
    except (OSError, ValueError):
        reply = None
    if reply is None or "pid" not in reply:  # no zygote, or forking is not safe now: run it here
        sock.close()
        os.execv(argv[0], argv)
    pid = int(reply["pid"])
    try:
        (Path(where) / f"{os.getpid()}.pid").write_text(str(pid))
    except OSError:
        pass

    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    status, _ = _recv(sock)
    if status is None:
        print("aitrain: the rank's fork server went away", file=sys.stderr, flush=True)
        return 1
    if "signal" in status:
        signum = int(status["signal"])
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum
    return int(status.get("code", 1))


if __name__ == "__main__":
    sys.exit(client(sys.argv[1:]))
