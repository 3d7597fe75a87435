"""Profiling each rank: ``perf stat`` counters, or a py-spy flame graph.

``profile=perf|pyspy`` makes every rank start through the trampoline
(``supervise.py``), which calls :func:`run_profiled`: it forks the program,
attaches the profiler to it (``perf stat -p`` / ``py-spy record --pid``), waits
for it and exits exactly as the program did. The profiler is not the program's
parent because both tools hide how it ended (perf exits 0 after a SIGKILL,
py-spy exits 0 after any exit code), and a rank stopped by the OOM killer must
still be reported as such.

Files, under ``<run_dir>/profile/``:

- ``perf-rank<N>.csv``: ``perf stat -x,`` output of global rank N;
- ``perf.json``: every rank's counters, the events this machine could not count
  and why; each rank's counters are also appended to ``metrics.jsonl`` (step 0,
  keys ``perf/rank<N>/<event>``), which the tracker forwards to MLflow;
- ``flame-rank<N>.svg``: py-spy's flame graph of global rank N;
- ``perf-rank<N>.log`` / ``pyspy-rank<N>.log``: the profiler's own messages.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from aitrain.launcher.resources import RankProfile

PERF_EVENTS = ("cycles", "instructions", "cache-misses", "context-switches", "task-clock")
PR_SET_PDEATHSIG = 1
PR_SET_PTRACER = 0x59616D61  # Yama: let this process's tracer (py-spy, our child) attach


def find_perf() -> str | None:
    return shutil.which("perf")


def find_pyspy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")  # pip installs it next to the venv's python
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


# -- perf stat output -----------------------------------------------------------------


def _event_name(raw: str) -> str:
    """``cpu_core/cycles/`` -> ``cycles``; ``instructions:u`` -> ``instructions``."""
    name = raw.strip()
    if "/" in name:
        inner = [p for p in name.split("/") if p]
        name = inner[1] if len(inner) > 1 else inner[0]
    return name.split(":")[0]


def parse_perf_stat(text: str) -> tuple[dict[str, float], dict[str, str], list[str]]:
    """``perf stat -x,`` output -> (counters, units, events it could not count)."""
    counters: dict[str, float] = {}
    units: dict[str, str] = {}
    missing: list[str] = []
    for line in text.splitlines():
        fields = line.split(",")
        if line.startswith("#") or len(fields) < 3 or not fields[2].strip():
            continue
        event = _event_name(fields[2])
        value = fields[0].strip()
        if value.startswith("<"):  # <not supported> / <not counted>
            if event not in counters and event not in missing:
                missing.append(event)
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        counters[event] = counters.get(event, 0.0) + number  # hybrid CPUs: one row per core type
        units[event] = fields[1].strip()
        if event in missing:
            missing.remove(event)
    return counters, units, missing


def probe_perf_events(tool: str, events: Sequence[str] = PERF_EVENTS) -> tuple[list[str], list[str], str]:
    """(events this machine counts, events it cannot, perf's error when it cannot run at all)."""
    try:
        r = subprocess.run([tool, "stat", "-x,", "-e", ",".join(events), "--", "true"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], list(events), str(e)
    counters, _, missing = parse_perf_stat(r.stderr)
    if r.returncode != 0 or not counters:
        lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip() and "," not in ln]
        return [], list(events), (lines[0] if lines else f"perf stat exited with {r.returncode}")
    supported = [e for e in events if e in counters]
    return supported, [e for e in events if e not in counters], ""


def unsupported_note(unsupported: Sequence[str], supported: Sequence[str]) -> str:
    hw = [e for e in unsupported if e in ("cycles", "instructions", "cache-misses")]
    why = (" (no hardware performance counters: a VM or container without PMU access)" if hw else "")
    return (f"{', '.join(unsupported)} not supported on this machine{why}; "
            f"counting {', '.join(supported)}")


# -- the rank side: run the program under the profiler -------------------------------


_libc: Any = None


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        import ctypes

        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    return _libc


def _prctl(option: int, arg: int) -> None:
    libc = _load_libc()
    if libc:
        libc.prctl(option, arg, 0, 0, 0)


def _arm_pdeathsig() -> None:
    """In a child before exec: SIGKILL it when its parent (the trampoline) dies."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ProfilerError(Exception):
    pass


def _start_perf(prof: RankProfile, pid: int, out: Path, log: Any) -> subprocess.Popen[bytes]:
    ctl_r, ctl_w = os.pipe()
    ack_r, ack_w = os.pipe()
    argv = [prof.tool, "stat", "-x,", "-o", str(out), "-e", ",".join(prof.events or PERF_EVENTS),
            "-D", "-1", "--control", f"fd:{ctl_r},{ack_w}", "-p", str(pid)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(ctl_r, ack_w),
                                start_new_session=True, preexec_fn=_arm_pdeathsig)
    finally:
        os.close(ctl_r)
        os.close(ack_w)
    try:
        # Counters start disabled (-D -1); "enable" is acknowledged once perf is attached and counting.
        os.write(ctl_w, b"enable\n")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready, _, _ = select.select([ack_r], [], [], 0.1)
            if ready:
                if os.read(ack_r, 64).startswith(b"ack"):
                    return proc
                break
            if proc.poll() is not None:
                break
        _stop(proc, signal.SIGKILL, 5)
        raise ProfilerError(f"perf stat did not attach (see {log.name})")
    except OSError as e:
        _stop(proc, signal.SIGKILL, 5)
        raise ProfilerError(f"perf stat did not attach: {e}") from e
    finally:
        os.close(ctl_w)
        os.close(ack_r)


def _start_pyspy(prof: RankProfile, pid: int, out: Path, log: Any) -> subprocess.Popen[bytes]:
    argv = [prof.tool, "record", "--pid", str(pid), "--output", str(out), "--format", "flamegraph",
            "--rate", "100"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True, preexec_fn=_arm_pdeathsig)


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, wait: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except OSError:
        pass


def profile_files(prof_dir: Path, kind: str, rank: int) -> tuple[Path, Path]:
    """(the profile, the profiler's log) of one rank."""
    if kind == "perf":
        return prof_dir / f"perf-rank{rank}.csv", prof_dir / f"perf-rank{rank}.log"
    return prof_dir / f"flame-rank{rank}.svg", prof_dir / f"pyspy-rank{rank}.log"


def run_profiled(argv: list[str], prof: RankProfile, rank: int) -> NoReturn:
    """Run ``argv`` under the profiler and exit as it did (see the module docstring)."""
    out, log_path = profile_files(Path(prof.dir), prof.kind, rank)
    out.parent.mkdir(parents=True, exist_ok=True)
    _load_libc()  # before forking: the child only calls into it
    me = os.getpid()
    gate_r, gate_w = os.pipe()  # the child execs once perf counts (perf attaches before exec)
    exec_r, exec_w = os.pipe()  # close-on-exec: EOF here once the child has exec'd
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the program
        try:
            os.close(gate_w)
            os.close(exec_r)
            _arm_pdeathsig()
            if os.getppid() != me:
                os._exit(1)
            _prctl(PR_SET_PTRACER, me)  # py-spy is our sibling, a child of the trampoline
            if prof.kind == "perf":
                os.read(gate_r, 1)
            os.close(gate_r)
            os.execvp(argv[0], argv)
        except BaseException as e:  # noqa: BLE001 - report anything, then leave
            try:
                os.write(exec_w, f"cannot run {argv[0]}: {e}".encode())
            finally:
                os._exit(127)
    os.close(gate_r)
    os.close(exec_w)
    # The elastic agent signals the whole process group (this process and the program);
    # this process only waits for the program and then reports how it ended.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    proc = None
    with open(log_path, "ab") as log:
        try:
            if prof.kind == "perf":
                proc = _start_perf(prof, pid, out, log)
        except ProfilerError as e:
            print(f"aitrain: rank {rank}: {e}; this rank runs without profiling", file=sys.stderr, flush=True)
        try:
            os.write(gate_w, b"x")
        except OSError:
            pass
        os.close(gate_w)
        failed = b"".join(iter(lambda: os.read(exec_r, 4096), b""))
        os.close(exec_r)
        if failed:
            print(f"aitrain: rank {rank}: {failed.decode(errors='replace')}", file=sys.stderr, flush=True)
        elif prof.kind == "pyspy":
            proc = _start_pyspy(prof, pid, out, log)
        _, status = os.waitpid(pid, 0)
        if prof.kind == "perf":
            _stop(proc, signal.SIGINT, 10)  # perf writes the counters on SIGINT
        else:
            deadline = time.monotonic() + 30  # py-spy notices the exit and writes the SVG
            while proc is not None and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            _stop(proc, signal.SIGINT, 10)
    exit_like(status)


def exit_like(status: int) -> NoReturn:
    """Exit the way a child with wait status ``status`` did (same code, or same signal)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal that does not terminate
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


# -- the agent side: collect what the ranks left ------------------------------------


def _ranks_text(ranks: Sequence[int]) -> str:
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)) \
        else ",".join(map(str, ranks))


def collect(kind: str, prof_dir: Path, ranks: Sequence[int], metrics_file: Path | None,
            note: str = "", events: Sequence[str] = PERF_EVENTS) -> dict[str, Any]:
    """After the ranks: perf counters to ``perf.json`` and metrics.jsonl; list the flame graphs."""
    if kind == "pyspy":
        svgs = [profile_files(prof_dir, kind, r)[0] for r in ranks]
        have = [p for p in svgs if p.exists() and p.stat().st_size > 0]
        lost = [r for r, p in zip(ranks, svgs, strict=False) if p not in have]
        if have:
            print(f"aitrain: flame graphs: {', '.join(str(p) for p in have)}", flush=True)
        if lost:
            print(f"aitrain: no flame graph for rank(s) {_ranks_text(lost)} (stopped before py-spy "
                  f"took a sample, or py-spy failed: see {prof_dir}/pyspy-rank<N>.log)", flush=True)
        return {"flame_graphs": [str(p) for p in have]}
    report: dict[str, Any] = {"events": list(events), "unsupported": [e for e in PERF_EVENTS if e not in events],
                              "note": note, "units": {}, "ranks": {}}
    report_file = prof_dir / "perf.json"
    try:
        previous = json.loads(report_file.read_text())  # another node's ranks (shared run dir)
        report["ranks"].update(previous.get("ranks", {}))
    except (OSError, ValueError):
        pass
    records = []
    now = time.time()
    counted = []
    for r in ranks:
        path = profile_files(prof_dir, kind, r)[0]
        try:
            counters, units, _ = parse_perf_stat(path.read_text())
        except OSError:
            continue
        if not counters:
            continue
        if counters.get("cycles") and "instructions" in counters:
            counters["ipc"] = counters["instructions"] / counters["cycles"]
        report["ranks"][str(r)] = counters
        report["units"].update(units)
        counted.append(r)
        records.append({"step": 0, "time": now, **{f"perf/rank{r}/{k}": v for k, v in counters.items()}})
    report_file.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if metrics_file is not None and records:
        with open(metrics_file, "a") as f:
            f.write("".join(json.dumps(rec) + "\n" for rec in records))
    missing = [r for r in ranks if r not in counted]
    if counted:
        print(f"aitrain: perf counters of rank(s) {_ranks_text(counted)} in {report_file}"
              + (" and metrics.jsonl (perf/rank<N>/<event>)" if metrics_file is not None else ""), flush=True)
    if missing:
        print(f"aitrain: no perf counters for rank(s) {_ranks_text(missing)} "
              f"(see {prof_dir}/perf-rank<N>.log)", flush=True)
    return report
