"""Hang watchdog of one node: when no rank makes progress, say where every rank is, then stop.

Ranks report progress through :mod:`aitrain.launcher.progress` (the built-in job does;
user scripts call ``progress.step(n)``). The watchdog arms at the first report of any
rank on this node. If ``timeout_s`` passes without any rank that is still training
reporting a step or a phase mark, it

1. dumps the Python stack of every rank process of this node (``py-spy dump``, which
   needs no cooperation; else faulthandler, for ranks that registered it through ``progress``),
2. works out which ranks are behind: the ranks at a lower step than the others; when
   every rank is at the same step, the ranks that are *not* waiting inside a
   torch.distributed collective while others are (the ones the others wait for),
3. writes ``<run_dir>/hang-report-<node>.json`` and ``.txt`` (the tracker uploads them),
4. calls ``on_hang(report)``; the node agent then stops the job with a clear message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aitrain.launcher.progress import STACK_SIGNAL, read_record

# Frames that mean "this rank waits for the others" (py-spy and faulthandler formats).
_COLLECTIVE_FILES = ("torch/distributed/distributed_c10d.py", "torch/distributed/c10d_logger.py",
                     "torch/distributed/_functional_collectives.py", "torch/distributed/device_mesh.py")
_PYSPY_FRAME = re.compile(r"^\s*(?P<func>[\w<>.]+) \((?P<file>[^:()]+):\d+\)")
_FH_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line \d+ in (?P<func>[\w<>.]+)')


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


def find_behind(ranks: list[RankReport]) -> list[dict[str, Any]]:
    """Which ranks the others wait for, with the reason (see module docstring)."""
    active = [r for r in ranks if not r.done]
    if not active:
        return []
    steps = [r.step for r in active if r.step is not None]
    if any(r.step is None for r in active) and steps:
        return [{"rank": r.rank, "host": r.host, "step": r.step, "reason": "has not reported a step yet"}
                for r in active if r.step is None]
    if steps and min(steps) < max(steps):
        low = min(steps)
        return [{"rank": r.rank, "host": r.host, "step": r.step,
                 "reason": f"at step {low} while others reached step {max(steps)}"}
                for r in active if r.step == low]
    waiting = [r for r in active if r.waiting_in]
    if waiting and len(waiting) < len(active):
        return [{"rank": r.rank, "host": r.host, "step": r.step,
                 "reason": f"not in a collective while rank(s) {','.join(str(w.rank) for w in waiting)} "
                           f"wait in {waiting[0].waiting_in}"}
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
        if "RANK" in env:
            out[int(d.name)] = {"RANK": env["RANK"], "LOCAL_RANK": env.get("LOCAL_RANK", "")}
    return out


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def dump_stack_pyspy(pid: int, py_spy: str, timeout: float = 30.0) -> str | None:
    try:
        r = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 and r.stdout.strip() else None


def catches_signal(pid: int, sig: int, proc: Path = Path("/proc")) -> bool:
    """Whether ``pid`` has a handler for ``sig`` (SigCgt in /proc/<pid>/status)."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (int(sig) - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


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


class HangWatchdog:
    """Watches the heartbeats of this node's ranks in a thread (see module docstring)."""

    def __init__(self, *, progress_dir: Path, timeout_s: float, node: str, report_dir: Path,
                 on_hang: Callable[[HangReport], None], poll_s: float | None = None,
                 processes: Callable[[], dict[int, dict[str, str]]] = rank_processes) -> None:
        self.progress_dir = Path(progress_dir)
        self.timeout_s = float(timeout_s)
        self.node = node
        self.report_dir = Path(report_dir)
        self.on_hang = on_hang
        self.poll_s = poll_s if poll_s is not None else max(0.1, min(1.0, self.timeout_s / 4))
        self.processes = processes
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
        self._dump_stacks(reports, by_rank)
        for r in reports:
            r.waiting_in = waiting_collective(r.stack) if r.stack else None
        behind = find_behind(reports)
        steps = [r.step for r in reports if r.step is not None]
        report = HangReport(self.node, self.timeout_s, round(quiet, 1), max(steps) if steps else None, behind, reports)
        report.summary = summarize(report)
        self._write(report)
        return report

    def _dump_stacks(self, reports: list[RankReport], beats: dict[int, dict[str, Any]]) -> None:
        py_spy = find_py_spy()

        def one(r: RankReport) -> None:
            if r.pid is None:
                return
            stack = dump_stack_pyspy(r.pid, py_spy) if py_spy else None
            if stack:
                r.stack, r.stack_source = stack, "py-spy"
                return
            stack_file = beats.get(r.rank, {}).get("stack_file")
            stack = dump_stack_faulthandler(r.pid, stack_file) if stack_file else None
            if stack:
                r.stack, r.stack_source = stack, "faulthandler"

        threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in reports]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)

    def _write(self, report: HangReport) -> None:
        self.report_dir.mkdir(parents=True, exist_ok=True)
        json_path = self.report_dir / f"hang-report-{self.node}.json"
        text_path = self.report_dir / f"hang-report-{self.node}.txt"
        report.json_path, report.text_path = str(json_path), str(text_path)
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        text_path.write_text(render_text(report))


def summarize(report: HangReport) -> str:
    head = (f"no rank on {report.node} made progress for {report.seconds_without_progress:.0f}s "
            f"(watchdog.timeout_s={report.timeout_s:g}"
            + (f", last step {report.max_step}" if report.max_step is not None else "") + ")")
    if report.behind:
        who = "; ".join(f"rank {b['rank']} on {b['host']} ({b['reason']})" for b in report.behind)
        return f"{head}; behind: {who}"
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
        lines.append(r.stack.rstrip() if r.stack else "(no stack: py-spy unavailable and no faulthandler)")
        lines.append("")
    return "\n".join(lines)


def terminate_self() -> None:
    """Ask this agent to stop its ranks: the elastic agent turns SIGTERM into an orderly teardown."""
    os.kill(os.getpid(), signal.SIGTERM)
