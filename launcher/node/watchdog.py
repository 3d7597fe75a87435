"""Hang watchdog of one node: when no rank makes progress, say where every rank is, then stop.

Ranks report progress through :mod:`aitrain.launcher.progress` (the built-in job does;
user scripts call ``progress.step(n)``). The watchdog arms at the first report of any
rank on this node. If ``timeout_s`` passes without any rank that is still training
reporting a step or a phase mark, it

1. reads each rank process from ``/proc`` (:func:`read_proc`): its state (``T (stopped)``,
   ``D (disk sleep)``, ...), ``wchan``, the system call it is in and, as root, its kernel
   stack; threads other than the main one that sit in ``D`` are listed too,
2. dumps the stack of every rank process of this node without its cooperation
   (``py-spy dump --native``: Python and native frames; a process that is stopped or in
   uninterruptible sleep cannot be suspended through ptrace, so for those
   ``py-spy dump --nonblocking`` reads its Python stack from memory as it is), else
   faulthandler for ranks that registered it through ``progress`` (a stopped or D-state
   process runs no signal handler, so it is not asked); each rank's ``notes`` say what
   was read and what could not be,
3. works out which ranks are behind, in this order: the ranks that cannot be running
   (stopped, traced, zombie, or in ``D`` in both samples taken ~1 s apart); else the
   ranks at a lower step than the others; else, when every rank is at the same step, the
   ranks that are *not* waiting inside a torch.distributed collective while others are
   (the ones the others wait for),
4. writes ``<run_dir>/hang-report-<node>.json`` and ``.txt`` (the tracker uploads them),
5. calls ``on_hang(report)``; the node agent then stops the job with a clear message. A
   stopped rank cannot act on the teardown's SIGTERM (it stays pending, and the agent
   would wait its whole grace period before SIGKILL), so once that signal is pending at a
   stopped rank the watchdog sends it SIGCONT.

When every rank's heartbeat stops because one rank stopped, the others are blocked in a
collective (state ``S``, waiting in ``all_reduce``...) and the stopped one is ``T``: the
state rule names it even when it was stopped inside the collective itself.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aitrain.launcher.progress import STACK_SIGNAL, read_record
from aitrain.launcher.zygote import real_pid

# Frames that mean "this rank waits for the others" (py-spy and faulthandler formats).
_COLLECTIVE_FILES = ("torch/distributed/distributed_c10d.py", "torch/distributed/c10d_logger.py",
                     "torch/distributed/_functional_collectives.py", "torch/distributed/device_mesh.py")
_PYSPY_FRAME = re.compile(r"^\s*(?P<func>[\w<>.]+) \((?P<file>[^:()]+):\d+\)")
_FH_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line \d+ in (?P<func>[\w<>.]+)')

# Process states (first letter of /proc/<pid>/status State) in which a process runs no code of its own.
NOT_RUNNING = {"T": "stopped by a signal (SIGSTOP, or SIGTSTP/SIGTTIN/SIGTTOU from job control)",
               "t": "held by a debugger or tracer (ptrace stop)",
               "Z": "a zombie: its main thread has exited (other threads may still run) and the process has not ended",
               "X": "dead, not yet gone"}
# States in which ptrace cannot suspend the process (py-spy's default) and no signal handler runs.
NO_PTRACE_STOP = set(NOT_RUNNING) | {"D"}
SECOND_SAMPLE_S = 1.0  # D must last from the first /proc sample to the second, this far apart, to count
# Signals whose default action ends a process: a teardown's request that a stopped rank cannot act on.
_TEARDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

# Syscall numbers of the calls a stuck process usually sits in (from the kernel's unistd headers).
_SYSCALLS = {
    "x86_64": {0: "read", 1: "write", 7: "poll", 16: "ioctl", 17: "pread64", 18: "pwrite64", 19: "readv",
               20: "writev", 23: "select", 24: "sched_yield", 26: "msync", 34: "pause", 35: "nanosleep",
               42: "connect", 43: "accept", 44: "sendto", 45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 56: "clone",
               58: "vfork", 61: "wait4", 62: "kill", 73: "flock", 74: "fsync", 75: "fdatasync",
               128: "rt_sigtimedwait", 130: "rt_sigsuspend", 162: "sync", 200: "tkill", 202: "futex",
               230: "clock_nanosleep", 232: "epoll_wait", 234: "tgkill", 257: "openat", 270: "pselect6",
               271: "ppoll", 281: "epoll_pwait", 288: "accept4", 426: "io_uring_enter", 435: "clone3",
               441: "epoll_pwait2"},
    "aarch64": {22: "epoll_pwait", 29: "ioctl", 32: "flock", 56: "openat", 63: "read", 64: "write", 65: "readv",
                66: "writev", 67: "pread64", 68: "pwrite64", 72: "pselect6", 73: "ppoll", 81: "sync", 82: "fsync",
                83: "fdatasync", 98: "futex", 101: "nanosleep", 115: "clock_nanosleep", 124: "sched_yield",
                129: "kill", 130: "tkill", 131: "tgkill", 133: "rt_sigsuspend", 137: "rt_sigtimedwait",
                202: "accept", 203: "connect", 206: "sendto", 207: "recvfrom", 211: "sendmsg", 212: "recvmsg",
                220: "clone", 227: "msync", 242: "accept4", 260: "wait4", 426: "io_uring_enter", 435: "clone3",
                441: "epoll_pwait2"},
}


@dataclass
class ProcInfo:
    """One sample of a process as ``/proc`` shows it (see :func:`read_proc`)."""

    state: str | None = None  # "T (stopped)", "D (disk sleep)", ...; None: no such process
    wchan: str | None = None  # the kernel function it sleeps in (None: running, or unreadable)
    syscall: str | None = None  # the system call it is in: "read", "futex", "#999" (not in our table); "running"
    user_pc: str | None = None  # its user-space instruction pointer as "<file>+0x<offset>" (from /proc syscall)
    kernel_stack: str = ""  # /proc/<pid>/stack: readable by root only
    d_threads: list[dict[str, Any]] = field(default_factory=list)  # other threads in D: tid, name, wchan, stack
    notes: list[str] = field(default_factory=list)

    @property
    def letter(self) -> str:
        return self.state[0] if self.state else ""


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _kernel_stack(text: str | None) -> str:
    """``[<0>] do_signal_stop+0x16f/0x210`` lines without the address column."""
    return "\n".join(line.split("] ", 1)[-1] for line in (text or "").splitlines() if line.strip())


def _wchan(text: str | None) -> str | None:
    text = (text or "").strip()
    return text if text and text != "0" else None


def _maps_location(maps: str | None, pc: int) -> str | None:
    """``libc.so.6+0x1162ec``: the file mapped at address ``pc`` and the offset in it."""
    for line in (maps or "").splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        try:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            offset = int(parts[2], 16)
        except ValueError:
            continue
        if start <= pc < end:
            name = parts[5].strip() if len(parts) > 5 else "[anon]"
            return f"{os.path.basename(name) or name}+{pc - start + offset:#x}"
    return None


def _syscall(text: str | None, maps: Callable[[], str | None], machine: str) -> tuple[str | None, str | None]:
    """(syscall name, user pc location) from /proc/<pid>/syscall: ``nr args... sp pc``, ``-1 sp pc``, ``running``."""
    fields = (text or "").split()
    if not fields:
        return None, None
    if fields[0] == "running":
        return "running", None
    try:
        nr, pc = int(fields[0]), int(fields[-1], 16)
    except ValueError:
        return None, None
    name = "none (not in a system call)" if nr < 0 else _SYSCALLS.get(machine, {}).get(nr, f"#{nr}")
    return name, _maps_location(maps(), pc)


def read_proc(pid: int, proc: Path = Path("/proc"), machine: str | None = None) -> ProcInfo:
    """What ``/proc`` says about process ``pid``: state, wchan, system call, kernel stack, threads in D."""
    d = proc / str(pid)
    status = _read(d / "status")
    if status is None:
        return ProcInfo(notes=[f"no process {pid} in {proc}"])
    info = ProcInfo()
    for line in status.splitlines():
        if line.startswith("State:"):
            info.state = line.split(":", 1)[1].strip()
    info.wchan = _wchan(_read(d / "wchan"))
    info.syscall, info.user_pc = _syscall(_read(d / "syscall"), lambda: _read(d / "maps"),
                                          machine or platform.machine())
    stack = _read(d / "stack")
    if stack is None:
        info.notes.append(f"kernel stack: /proc/{pid}/stack is readable by root only")
    info.kernel_stack = _kernel_stack(stack)
    try:
        tids = sorted(int(t.name) for t in (d / "task").iterdir() if t.name.isdigit())
    except OSError:
        tids = []
    for tid in tids:
        if tid == pid:
            continue
        stat = _read(d / "task" / str(tid) / "stat")
        if not stat or ")" not in stat:
            continue
        letter = stat.rsplit(")", 1)[1].split()[0]
        if letter == "D":
            t = d / "task" / str(tid)
            info.d_threads.append({"tid": tid, "name": stat[stat.find("(") + 1:stat.rfind(")")],
                                   "wchan": _wchan(_read(t / "wchan")),
                                   "kernel_stack": _kernel_stack(_read(t / "stack"))})
    return info


def stuck_reason(first: ProcInfo, second: ProcInfo) -> str | None:
    """Why a process cannot be making progress, from two samples; None when it may be running."""
    if first.letter in NOT_RUNNING and second.letter == first.letter:
        return NOT_RUNNING[second.letter]
    if first.letter == "D" and second.letter == "D":
        if "refrigerator" in (second.wchan or "") or "freezer" in (second.wchan or ""):
            return "frozen by a cgroup freezer"
        return (f"in uninterruptible sleep in two samples {SECOND_SAMPLE_S:g}s apart: blocked in the kernel (I/O to "
                "a hung filesystem or device, a vfork child that never execs), running no Python code")
    held = {t["tid"] for t in first.d_threads} & {t["tid"] for t in second.d_threads}
    threads = [t for t in second.d_threads if t["tid"] in held]
    if threads:
        names = ", ".join(f"{t['tid']} ({t['name']})" + (f" in {t['wchan']}" if t["wchan"] else "") for t in threads)
        return f"thread(s) {names} in uninterruptible sleep in two samples {SECOND_SAMPLE_S:g}s apart"
    return None


@dataclass
class RankReport:
    rank: int
    local_rank: int | None
    host: str
    pid: int | None
    step: int | None
    seconds_since_progress: float | None
    done: bool = False
    waiting_in: str | None = None  # the collective this rank waits in, if any
    stack_source: str | None = None  # py-spy | faulthandler | None
    stack: str = ""
    state: str | None = None  # /proc/<pid>/status State, e.g. "T (stopped)"
    wchan: str | None = None  # the kernel function the process sleeps in
    syscall: str | None = None  # the system call it is in
    user_pc: str | None = None  # where its user-space code is: "<file>+0x<offset>"
    kernel_stack: str = ""  # /proc/<pid>/stack (root)
    d_threads: list[dict[str, Any]] = field(default_factory=list)  # other threads in uninterruptible sleep
    stuck: str | None = None  # why the process cannot be running (see stuck_reason)
    notes: list[str] = field(default_factory=list)  # what was read and how, and what could not be


@dataclass
class HangReport:
    node: str
    timeout_s: float
    seconds_without_progress: float
    max_step: int | None
    behind: list[dict[str, Any]]
    ranks: list[RankReport] = field(default_factory=list)
    summary: str = ""
    json_path: str = ""
    text_path: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def waiting_collective(stack: str) -> str | None:
    """The torch.distributed function a stack is blocked in, or None.

    Both py-spy and faulthandler print the innermost frame first."""
    hits = []
    for line in stack.splitlines():
        m = _PYSPY_FRAME.match(line) or _FH_FRAME.match(line)
        if m and any(c in m.group("file") for c in _COLLECTIVE_FILES):
            hits.append(m.group("func"))
    named = [f for f in hits if f not in ("wrapper", "_fn", "inner")]
    return (named or hits or [None])[0]


def _entry(r: RankReport, reason: str) -> dict[str, Any]:
    return {"rank": r.rank, "host": r.host, "pid": r.pid, "step": r.step, "state": r.state, "wchan": r.wchan,
            "reason": reason}


def find_behind(ranks: list[RankReport]) -> list[dict[str, Any]]:
    """Which ranks the others wait for, with the reason (see module docstring)."""
    active = [r for r in ranks if not r.done]
    if not active:
        return []
    waiting = [r for r in active if r.waiting_in]
    stuck = [r for r in active if r.stuck]
    if stuck:
        others = [w for w in waiting if not w.stuck]
        tail = (f"; rank(s) {','.join(str(w.rank) for w in others)} wait in {others[0].waiting_in}"
                if others else "")
        return [_entry(r, f"{r.stuck}{tail}") for r in stuck]
    steps = [r.step for r in active if r.step is not None]
    if any(r.step is None for r in active) and steps:
        return [_entry(r, "has not reported a step yet") for r in active if r.step is None]
    if steps and min(steps) < max(steps):
        low = min(steps)
        return [_entry(r, f"at step {low} while others reached step {max(steps)}") for r in active if r.step == low]
    if waiting and len(waiting) < len(active):
        return [_entry(r, f"not in a collective while rank(s) {','.join(str(w.rank) for w in waiting)} "
                          f"wait in {waiting[0].waiting_in}")
                for r in active if not r.waiting_in and r.stack]
    return []


def rank_processes(parent: int | None = None, proc: Path = Path("/proc")) -> dict[int, dict[str, str]]:
    """{pid: {RANK, LOCAL_RANK}} of the rank processes started by this agent (its direct children)."""
    parent = os.getpid() if parent is None else parent
    out: dict[int, dict[str, str]] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(item.split("=", 1) for item in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:  # a rank forked by the agent's zygote: the rank, not its client
            out[real_pid(int(d.name), env)] = {"RANK": env["RANK"], "LOCAL_RANK": env.get("LOCAL_RANK", "")}
    return out


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def pyspy(pid: int, py_spy: str, flags: Sequence[str] = (), timeout: float = 30.0) -> tuple[str | None, str]:
    """(``py-spy dump`` output or None, why not: py-spy's error and its causes on one line, or "timed out")."""
    try:
        r = subprocess.run([py_spy, "dump", *flags, "--pid", str(pid)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:g}s"
    except OSError as e:
        return None, str(e)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout, ""
    # "Error: Failed to get stack traces", "Caused by:", "    0: Failed to suspend process", ..., "Stack backtrace:"
    text = (r.stderr or r.stdout).split("Stack backtrace:")[0]
    why = [re.sub(r"^(Error:|\d+:)\s*", "", line.strip()) for line in text.splitlines()]
    return None, ": ".join(w for w in why if w and w != "Caused by:") or f"exit code {r.returncode}"


def dump_stack_pyspy(pid: int, py_spy: str, timeout: float = 30.0) -> str | None:
    return pyspy(pid, py_spy, (), timeout)[0]


def catches_signal(pid: int, sig: int, proc: Path = Path("/proc")) -> bool:
    """Whether ``pid`` has a handler for ``sig`` (SigCgt in /proc/<pid>/status)."""
    return _signal_mask(pid, "SigCgt", proc) >> (int(sig) - 1) & 1 == 1


def _signal_mask(pid: int, key: str, proc: Path = Path("/proc")) -> int:
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def teardown_pending(pid: int, proc: Path = Path("/proc")) -> bool:
    """Whether a signal that ends the process (SIGTERM, ...) waits at ``pid`` (SigPnd/ShdPnd)."""
    pending = _signal_mask(pid, "ShdPnd", proc) | _signal_mask(pid, "SigPnd", proc)
    return any(pending >> (int(s) - 1) & 1 for s in _TEARDOWN_SIGNALS)


def dump_stack_faulthandler(pid: int, stack_file: str, wait_s: float = 3.0) -> str | None:
    path = Path(stack_file)
    if not catches_signal(pid, STACK_SIGNAL):
        return None  # the default action of the signal would kill the rank
    try:
        before = path.stat().st_size
        os.kill(pid, STACK_SIGNAL)
    except OSError:
        return None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            if path.stat().st_size > before:
                time.sleep(0.2)  # let it finish writing every thread
                return path.read_text(errors="replace")[before:]
        except OSError:
            return None
    return None


def dump_stack(r: RankReport, letter: str, py_spy: str | None, stack_file: str | None) -> None:
    """Fill ``r.stack`` by the best means the process's state allows; say in ``r.notes`` what was read."""
    assert r.pid is not None
    tried: list[str] = []
    # Time limits: the native frames of a process with large libraries (CUDA) take longest to
    # symbolize; all three together stay within the 40 s the report waits for a rank.
    if py_spy and letter not in NO_PTRACE_STOP:
        for flags, limit in ((("--native",), 20.0), ((), 10.0)):
            stack, err = pyspy(r.pid, py_spy, flags, limit)
            if stack:
                r.stack, r.stack_source = stack, "py-spy"
                r.notes.append(f"stack: py-spy dump {' '.join(flags)}".rstrip()
                               + (": Python and native frames" if flags else ": Python frames only"))
                return
            tried.append(f"py-spy dump {' '.join(flags)}".rstrip() + f": {err}")
    if py_spy:
        stack, err = pyspy(r.pid, py_spy, ("--nonblocking",), 10.0)
        if stack:
            r.stack, r.stack_source = stack, "py-spy"
            why = (f"the process is {r.state}: ptrace cannot suspend it, so its memory is read as it is"
                   if letter in NO_PTRACE_STOP else "; ".join(tried))
            r.notes.append(f"stack: py-spy dump --nonblocking, Python frames only ({why}); "
                           "native: see kernel_stack, syscall and user_pc")
            return
        tried.append(f"py-spy dump --nonblocking: {err}")
    else:
        tried.append("py-spy: not installed (pip install py-spy)")
    if letter in NO_PTRACE_STOP:
        tried.append(f"faulthandler: not asked (a process that is {r.state} runs no signal handler)")
    elif not stack_file:
        tried.append("faulthandler: not registered by this rank (aitrain.launcher.progress registers it)")
    else:
        stack = dump_stack_faulthandler(r.pid, stack_file)
        if stack:
            r.stack, r.stack_source = stack, "faulthandler"
            r.notes.append("stack: faulthandler, Python frames only")
            return
        tried.append("faulthandler: no dump within 3s")
    r.notes.append("no stack: " + "; ".join(tried))


class HangWatchdog:
    """Watches the heartbeats of this node's ranks in a thread (see module docstring)."""

    def __init__(self, *, progress_dir: Path, timeout_s: float, node: str, report_dir: Path,
                 on_hang: Callable[[HangReport], None], poll_s: float | None = None,
                 processes: Callable[[], dict[int, dict[str, str]]] = rank_processes,
                 proc: Path = Path("/proc")) -> None:
        self.progress_dir = Path(progress_dir)
        self.timeout_s = float(timeout_s)
        self.node = node
        self.report_dir = Path(report_dir)
        self.on_hang = on_hang
        self.poll_s = poll_s if poll_s is not None else max(0.1, min(1.0, self.timeout_s / 4))
        self.processes = processes
        self.proc = Path(proc)
        self.report: HangReport | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="aitrain-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)

    def heartbeats(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.progress_dir.glob("rank*.json")):
            rec = read_record(path)
            if rec and rec.get("host") in (None, self.node, os.uname().nodename):
                out.append(rec)
        return out

    def _main(self) -> None:
        while not self._stop.wait(self.poll_s):
            beats = self.heartbeats()
            active = [b for b in beats if not b.get("done")]
            if not active:
                continue  # not armed yet, or every rank is past its loop
            quiet = time.time() - max(float(b.get("time") or 0) for b in active)
            if quiet < self.timeout_s:
                continue
            try:
                self.report = self.investigate(beats, quiet)
            except Exception as e:  # the report is best effort; stopping the hung job is not
                self.report = HangReport(self.node, self.timeout_s, quiet, None, [],
                                         summary=f"no rank made progress for {quiet:.0f}s "
                                                 f"(the hang report failed: {type(e).__name__}: {e})")
            if not self._stop.is_set():
                self.on_hang(self.report)
                self._let_stopped_ranks_end(self.report)
            return

    def investigate(self, beats: list[dict[str, Any]], quiet: float) -> HangReport:
        now = time.time()
        by_rank = {int(b["rank"]): b for b in beats}
        procs = self.processes()
        for pid, env in procs.items():
            try:
                rank = int(env["RANK"])
            except (KeyError, ValueError):
                continue
            if rank not in by_rank:
                by_rank[rank] = {"rank": rank, "local_rank": int(env.get("LOCAL_RANK") or -1), "host": self.node,
                                 "pid": pid, "step": None, "time": None, "done": False}
            elif not by_rank[rank].get("pid"):
                by_rank[rank]["pid"] = pid
        reports = [RankReport(rank=r, local_rank=b.get("local_rank"), host=b.get("host") or self.node,
                              pid=b.get("pid"), step=b.get("step"),
                              seconds_since_progress=round(now - b["time"], 1) if b.get("time") else None,
                              done=bool(b.get("done")))
                   for r, b in sorted(by_rank.items())]
        sampled = time.monotonic()
        first = {r.rank: read_proc(r.pid, self.proc) for r in reports if r.pid is not None}
        for r in reports:
            if r.rank in first:
                r.state = first[r.rank].state
        self._dump_stacks(reports, by_rank, first)
        self._stop.wait(max(0.0, SECOND_SAMPLE_S - (time.monotonic() - sampled)))
        for r in reports:
            if r.pid is None:
                continue
            second = read_proc(r.pid, self.proc)
            r.state, r.wchan, r.syscall, r.user_pc = second.state, second.wchan, second.syscall, second.user_pc
            r.kernel_stack, r.d_threads = second.kernel_stack, second.d_threads
            r.notes = second.notes + r.notes
            if not r.done:
                r.stuck = stuck_reason(first[r.rank], second)
        for r in reports:
            r.waiting_in = waiting_collective(r.stack) if r.stack else None
        behind = find_behind(reports)
        steps = [r.step for r in reports if r.step is not None]
        report = HangReport(self.node, self.timeout_s, round(quiet, 1), max(steps) if steps else None, behind, reports)
        report.summary = summarize(report)
        self._write(report)
        return report

    def _dump_stacks(self, reports: list[RankReport], beats: dict[int, dict[str, Any]],
                     first: dict[int, ProcInfo]) -> None:
        py_spy = find_py_spy()

        def one(r: RankReport) -> None:
            if r.pid is None or r.done:
                return
            dump_stack(r, first[r.rank].letter, py_spy, beats.get(r.rank, {}).get("stack_file"))

        threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in reports]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)

    def _let_stopped_ranks_end(self, report: HangReport, wait_s: float = 60.0) -> None:
        """SIGCONT to each stopped rank once the teardown's SIGTERM waits at it (see module docstring)."""
        stopped = {r.pid for r in report.ranks if r.pid is not None and (r.state or "").startswith("T")}
        deadline = time.monotonic() + wait_s
        while stopped and time.monotonic() < deadline and not self._stop.wait(0.1):
            for pid in list(stopped):
                if not (self.proc / str(pid)).exists():
                    stopped.discard(pid)
                elif teardown_pending(pid, self.proc):
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except OSError:
                        pass
                    stopped.discard(pid)

    def _write(self, report: HangReport) -> None:
        self.report_dir.mkdir(parents=True, exist_ok=True)
        json_path = self.report_dir / f"hang-report-{self.node}.json"
        text_path = self.report_dir / f"hang-report-{self.node}.txt"
        report.json_path, report.text_path = str(json_path), str(text_path)
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        text_path.write_text(render_text(report))


def _where(b: dict[str, Any]) -> str:
    facts = [f"pid {b['pid']}"] if b.get("pid") else []
    if b.get("state"):
        facts.append(b["state"] + (f" in {b['wchan']}" if b.get("wchan") else ""))
    return f"rank {b['rank']} on {b['host']} ({', '.join([*facts, b['reason']])})"


def summarize(report: HangReport) -> str:
    head = (f"no rank on {report.node} made progress for {report.seconds_without_progress:.0f}s "
            f"(watchdog.timeout_s={report.timeout_s:g}"
            + (f", last step {report.max_step}" if report.max_step is not None else "") + ")")
    if report.behind:
        return f"{head}; behind: " + "; ".join(_where(b) for b in report.behind)
    waiting = [r for r in report.ranks if r.waiting_in]
    if waiting and len(waiting) == len([r for r in report.ranks if not r.done]):
        return f"{head}; every rank waits in {waiting[0].waiting_in}: suspect a rank on another node or the fabric"
    return f"{head}; no rank stands out: see the stacks"


def render_text(report: HangReport) -> str:
    lines = [f"aitrain hang report: {report.summary}", ""]
    for r in report.ranks:
        where = f"waiting in {r.waiting_in}" if r.waiting_in else "not in a collective"
        lines.append(f"=== rank {r.rank} (local {r.local_rank}) on {r.host}, pid {r.pid}, step {r.step}, "
                     f"{where}, last progress {r.seconds_since_progress}s ago, stack via {r.stack_source} ===")
        if r.state:
            lines.append(f"process: {r.state}, wchan {r.wchan or '-'}, syscall {r.syscall or '-'}"
                         + (f" at {r.user_pc}" if r.user_pc else ""))
        if r.stuck:
            lines.append(f"stuck: {r.stuck}")
        lines += [f"note: {n}" for n in r.notes]
        if r.kernel_stack:
            lines += ["kernel stack:", *(f"    {x}" for x in r.kernel_stack.splitlines())]
        for t in r.d_threads:
            lines.append(f"thread {t['tid']} ({t['name']}) in D, wchan {t['wchan'] or '-'}:")
            lines += [f"    {x}" for x in t["kernel_stack"].splitlines()]
        # C++ frame names (pybind11 templates) run to thousands of characters: the JSON has them whole.
        lines += [x if len(x) <= 200 else x[:197] + "..." for x in r.stack.rstrip().splitlines()] or ["(no stack)"]
        lines.append("")
    return "\n".join(lines)


def terminate_self() -> None:
    """Ask this agent to stop its ranks: the elastic agent turns SIGTERM into an orderly teardown."""
    os.kill(os.getpid(), signal.SIGTERM)
