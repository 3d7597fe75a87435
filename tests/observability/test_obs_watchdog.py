"""The hang watchdog names the rank that stopped making progress, with its host and its /proc state.

Real launches: one rank SIGSTOPped from outside at a random moment (maybe inside the collective),
at 2 and 4 ranks, 3 times each; a rank stuck in a C call (``read`` on a pipe through ctypes); a
rank in D state (the parent of a ``posix_spawn`` whose child blocks opening a FIFO: glibc's
posix_spawn is a vfork, whose parent sleeps uninterruptibly until the child execs). The /proc
reading also runs on fixture trees (a FUSE read in D, a thread in D, not root).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from aitrain.launcher.node import watchdog
from aitrain.launcher.node.watchdog import (
    HangReport,
    HangWatchdog,
    ProcInfo,
    RankReport,
    find_behind,
    find_py_spy,
    read_proc,
    stuck_reason,
)
from aitrain.launcher.progress import read_record

from aitrain_testing import REPO, aitrain_argv, alive, wait_until

JOB = REPO / "tests" / "scripts" / "progress_job.py"
HOST = os.uname().nodename
ROOT = os.geteuid() == 0
pytestmark = pytest.mark.timeout(300)

# Rank STUCK_RANK gets stuck by itself at step 4: in a C call (STUCK_HOW=native), or in D state (dstate).
STUCK_JOB = textwrap.dedent('''
    import ctypes, os, time

    import torch
    import torch.distributed as dist

    from aitrain.launcher import progress

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    how, stuck_rank = os.environ["STUCK_HOW"], int(os.environ["STUCK_RANK"])
    fifo = os.path.join(os.environ["AITRAIN_PROGRESS_DIR"], "stuck.fifo")

    def read_a_pipe_in_c():
        r, _w = os.pipe()
        ctypes.CDLL(None).read(r, ctypes.create_string_buffer(1), 1)  # no data ever comes

    def spawn_a_child_that_never_execs():
        # glibc's posix_spawn is a vfork: this thread sleeps in D until the child execs, and the
        # child first opens the FIFO, which blocks until a writer comes (the test, at the end).
        os.mkfifo(fifo)
        os.posix_spawn("/bin/true", ["/bin/true"], dict(os.environ),
                       file_actions=[(os.POSIX_SPAWN_OPEN, 3, fifo, os.O_RDONLY, 0)])

    for step in range(1, 100000):
        if rank == stuck_rank and step == 4:
            print(f"rank {rank} gets stuck ({how})", flush=True)
            read_a_pipe_in_c() if how == "native" else spawn_a_child_that_never_execs()
        t = torch.ones(1)
        dist.all_reduce(t)
        time.sleep(0.02)
        progress.step(step)
''')


# -- real launches ---------------------------------------------------------------------


def start_launch(cwd: Path, script: Path, nproc: int, env: dict[str, str]) -> subprocess.Popen[str]:
    """tracking.enabled=false: MLflow costs ~20 s a launch on this machine; the tags are checked from the
    report files through the tracker's own code (:func:`hang_tags`)."""
    cwd.mkdir(parents=True, exist_ok=True)
    full = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full.update(env)
    args = ["launch", f"script={script}", "fabric=off", f"nproc_per_node={nproc}", "watchdog.timeout_s=3",
            "tracking.enabled=false"]
    return subprocess.Popen(aitrain_argv() + args, cwd=cwd, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def heartbeat(cwd: Path, rank: int) -> dict | None:
    paths = sorted(cwd.glob(f"outputs/*/*/progress/rank{rank}.json"))
    return read_record(paths[-1]) if paths else None


def finish(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the launch did not end within {timeout}s: {err[-2000:]}") from None
    return proc.returncode, out, err


def hang_report(cwd: Path) -> dict:
    paths = sorted(cwd.glob(f"outputs/*/*/hang-report-{HOST}.json"))
    assert paths, f"no hang report under {cwd}"
    return json.loads(paths[-1].read_text())


def hang_tags(cwd: Path) -> dict[str, str]:
    """The aitrain.hang* tags the tracker sets on the MLflow run from this launch's report files."""
    from aitrain.launcher.tracking import Tracker

    tags: dict[str, str] = {}
    Tracker._hang_tags(SimpleNamespace(set_tags=tags.update), sorted(cwd.glob("outputs/*/*/hang-report-*.json")))
    return tags


def assert_named(report: dict, stderr: str, rank: int, state: str) -> dict:
    """The report, the console line and the behind entry name ``rank`` on this host in ``state``."""
    assert [(b["rank"], b["host"]) for b in report["behind"]] == [(rank, HOST)], report["summary"]
    b = report["behind"][0]
    assert b["state"] == state and b["pid"] and b["reason"]
    assert f"rank {rank} on {HOST} (pid {b['pid']}, {state}" in stderr, stderr[-3000:]
    assert report["summary"] in stderr
    ranks = {r["rank"]: r for r in report["ranks"]}
    if ROOT:
        assert ranks[rank]["kernel_stack"], "root reads /proc/<pid>/stack"
    for other, r in ranks.items():
        if other != rank:
            assert r["state"].startswith("S") and r["waiting_in"] == "all_reduce", r
            assert not r["stuck"]
    leftover = [r["pid"] for r in ranks.values() if alive(r["pid"])]
    assert not leftover, f"ranks left behind: {leftover}"
    return ranks[rank]


def processes_running(script: Path) -> list[int]:
    """The live processes whose command line names ``script`` (ranks, and children that did not exec)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(script).encode() in (d / "cmdline").read_bytes() and alive(int(d.name)):
                found.append(int(d.name))
        except OSError:
            continue
    return found


def end_stopped(pid: int | None) -> None:
    if pid and alive(pid):
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("nproc", [2, 4])
def test_a_sigstopped_rank_is_named_with_host_and_state_three_times_out_of_three(tmp_path: Path, nproc: int) -> None:
    """Stopped from outside at a random moment: between steps or inside the all_reduce itself."""
    times = []
    for attempt, rank in enumerate([nproc - 1, 0, nproc // 2]):
        t0 = time.monotonic()
        cwd = tmp_path / f"run{attempt}"
        proc = start_launch(cwd, JOB, nproc, {"STEPS": "100000", "STEP_SLEEP": "0.02"})
        pid = None
        try:
            beat = wait_until(lambda rank=rank, cwd=cwd: (b := heartbeat(cwd, rank)) and (b.get("step") or 0) >= 3
                              and b, 60, f"rank {rank} at step 3")
            pid = int(beat["pid"])
            os.kill(pid, signal.SIGSTOP)
            code, out, err = finish(proc)
            left = alive(pid)  # before the cleanup below
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            end_stopped(pid)
        assert code == 124, err[-3000:]
        assert not left, "the stopped rank outlived the launch"
        report = hang_report(cwd)
        stopped = assert_named(report, err, rank, "T (stopped)")
        assert report["behind"][0]["wchan"] == "do_signal_stop"
        assert "stopped by a signal" in report["behind"][0]["reason"]
        assert stopped["pid"] == pid and stopped["stuck"]
        if find_py_spy():
            # ptrace cannot suspend a stopped process: its Python stack is read as it is.
            assert stopped["stack_source"] == "py-spy" and "progress_job.py" in stopped["stack"]
            assert any("--nonblocking" in n for n in stopped["notes"]), stopped["notes"]
        tags = hang_tags(cwd)
        assert tags["aitrain.hang.behind"] == f"{rank}@{HOST}" and "T (stopped)" in tags["aitrain.hang.summary"]
        times.append(time.monotonic() - t0)
    print(f"{nproc} ranks: " + ", ".join(f"{t:.1f}s" for t in times))


def test_a_rank_stuck_in_a_c_call_is_named(tmp_path: Path) -> None:
    script = tmp_path / "stuck_job.py"
    script.write_text(STUCK_JOB)
    proc = start_launch(tmp_path / "run", script, 2, {"STUCK_HOW": "native", "STUCK_RANK": "1"})
    code, out, err = finish(proc)
    assert code == 124, err[-3000:]
    assert not processes_running(script)
    report = hang_report(tmp_path / "run")
    stuck = assert_named(report, err, 1, "S (sleeping)")
    assert "not in a collective while rank(s) 0 wait in all_reduce" in report["behind"][0]["reason"]
    assert stuck["syscall"] == "read" and stuck["user_pc"].startswith("libc.so")
    assert not stuck["stuck"]  # sleeping in read(): it could wake; the others' stacks name it
    if find_py_spy():
        assert "read (libc.so" in stuck["stack"] and "read_a_pipe_in_c" in stuck["stack"], stuck["stack"]
        assert stuck["notes"][-1].startswith("stack: py-spy dump --native")


def test_a_rank_in_uninterruptible_sleep_is_named(tmp_path: Path) -> None:
    script = tmp_path / "stuck_job.py"
    script.write_text(STUCK_JOB)
    proc = start_launch(tmp_path / "run", script, 2, {"STUCK_HOW": "dstate", "STUCK_RANK": "1"})
    try:
        code, out, err = finish(proc)
    finally:
        # The teardown's SIGTERM ends the rank (another of its threads takes it), but its vfork
        # child still waits on the FIFO with every signal blocked: a writer lets it exec
        # /bin/true, which then ends on the SIGTERM that waited for it.
        for fifo in (tmp_path / "run").glob("outputs/*/*/progress/stuck.fifo"):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as e:
                assert e.errno == errno.ENXIO, e  # no reader: the child was never spawned, or is gone
    wait_until(lambda: not processes_running(script), 10, f"every process of {script} to end")
    assert code == 124, err[-3000:]
    report = hang_report(tmp_path / "run")
    stuck = assert_named(report, err, 1, "D (disk sleep)")
    assert "uninterruptible sleep" in report["behind"][0]["reason"]
    assert stuck["syscall"] in ("clone3", "clone", "vfork")
    if ROOT:
        assert "clone" in stuck["kernel_stack"]
    if find_py_spy():
        assert "spawn_a_child_that_never_execs" in stuck["stack"]
        assert any("--nonblocking" in n and "D (disk sleep)" in n for n in stuck["notes"]), stuck["notes"]


# -- /proc and the judgement on their own ------------------------------------------------

LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
FUSE_READ_STACK = ("[<0>] request_wait_answer+0x135/0x210\n[<0>] fuse_simple_request+0x1a4/0x300\n"
                   "[<0>] fuse_do_readpage+0x120/0x1d0\n[<0>] vfs_read+0x9f/0x180\n[<0>] ksys_read+0x67/0xe0\n"
                   "[<0>] do_syscall_64+0x5b/0x110\n[<0>] entry_SYSCALL_64_after_hwframe+0x76/0x7e\n")


def fake_process(proc: Path, pid: int, state: str, *, wchan: str = "0", stack: str | None = "",
                 syscall: str = "running", threads: dict[int, tuple[str, str, str]] | None = None) -> None:
    """/proc/<pid> as the kernel shows it; ``threads``: {tid: (state letter, name, wchan)}; stack None: not root."""
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "status").write_text(f"Name:\tpython\nUmask:\t0022\nState:\t{state}\nTgid:\t{pid}\nPid:\t{pid}\n")
    (d / "wchan").write_text(wchan)
    if stack is not None:
        (d / "stack").write_text(stack)
    (d / "syscall").write_text(syscall + "\n")
    (d / "maps").write_text(f"55d0a0000000-55d0a0001000 r--p 00000000 fd:01 1 /usr/bin/python3.11\n"
                            f"7f5e1a028000-7f5e1a1bd000 r-xp 00028000 fd:01 2 {LIBC}\n")
    for tid, (letter, name, twchan) in {pid: (state[0], "python", wchan), **(threads or {})}.items():
        t = d / "task" / str(tid)
        t.mkdir(parents=True)
        (t / "stat").write_text(f"{tid} ({name}) {letter} 1 {pid} {pid} 0 -1 4194560 0 0 0 0 1 2 0 0 20 0 1 0\n")
        (t / "wchan").write_text(twchan)
        (t / "stack").write_text(FUSE_READ_STACK if letter == "D" else "")


def test_proc_of_a_rank_in_disk_sleep_on_a_hung_fuse_read(tmp_path: Path) -> None:
    fake_process(tmp_path, 4242, "D (disk sleep)", wchan="request_wait_answer", stack=FUSE_READ_STACK,
                 syscall="0 0x7 0x7f5e0c000b70 0x100000 0x0 0x0 0x0 0x7ffd2f3e1a58 0x7f5e1a11a25d")
    info = read_proc(4242, tmp_path, machine="x86_64")
    assert info.state == "D (disk sleep)" and info.letter == "D" and info.wchan == "request_wait_answer"
    assert info.syscall == "read" and info.user_pc == "libc.so.6+0x11a25d"
    assert info.kernel_stack.splitlines()[:2] == ["request_wait_answer+0x135/0x210", "fuse_simple_request+0x1a4/0x300"]
    assert info.d_threads == [] and info.notes == []
    reason = stuck_reason(info, read_proc(4242, tmp_path, machine="x86_64"))
    assert reason and "uninterruptible sleep" in reason
    # the same numbers on aarch64 are other calls; an unknown one is shown by number
    assert read_proc(4242, tmp_path, machine="aarch64").syscall == "#0"


def test_proc_not_root_a_thread_in_disk_sleep_and_a_gone_process(tmp_path: Path) -> None:
    fake_process(tmp_path, 7, "S (sleeping)", wchan="futex_wait_queue", stack=None,
                 syscall="202 0x7f 0x80 0x0 0x0 0x0 0x0 0x7ffd2f3e1a58 0x7f5e1a0a3f16",
                 threads={9: ("S", "gloo", "futex_wait_queue"), 11: ("D", "ckpt-writer", "request_wait_answer")})
    info = read_proc(7, tmp_path, machine="x86_64")
    assert info.syscall == "futex" and info.kernel_stack == ""
    assert info.notes == ["kernel stack: /proc/7/stack is readable by root only"]
    assert [(t["tid"], t["name"], t["wchan"]) for t in info.d_threads] == [(11, "ckpt-writer", "request_wait_answer")]
    assert info.d_threads[0]["kernel_stack"].startswith("request_wait_answer")
    assert stuck_reason(info, info) == ("thread(s) 11 (ckpt-writer) in request_wait_answer in uninterruptible sleep "
                                        "in two samples 1s apart")
    assert stuck_reason(info, ProcInfo(state="S (sleeping)")) is None  # the thread woke up
    gone = read_proc(8, tmp_path)
    assert gone.state is None and gone.notes == [f"no process 8 in {tmp_path}"]


def test_which_states_mean_not_running() -> None:
    def two(state: str, then: str | None = None) -> str | None:
        return stuck_reason(ProcInfo(state=state), ProcInfo(state=then or state))

    assert "SIGSTOP" in (two("T (stopped)") or "")
    assert "debugger" in (two("t (tracing stop)") or "") and "zombie" in (two("Z (zombie)") or "")
    assert two("D (disk sleep)") and two("D (disk sleep)", "S (sleeping)") is None  # D once: I/O that went on
    assert two("S (sleeping)") is None and two("R (running)") is None
    assert two("T (stopped)", "S (sleeping)") is None  # continued meanwhile


def rr(rank: int, step: int | None, waiting: str | None = None, state: str = "S (sleeping)",
       stuck: str | None = None) -> RankReport:
    return RankReport(rank=rank, local_rank=rank, host=f"n{rank // 2}", pid=100 + rank, step=step,
                      seconds_since_progress=5.0, waiting_in=waiting, stack="...", state=state, stuck=stuck)


def test_a_stuck_process_is_behind_before_steps_and_stacks() -> None:
    # stopped inside the all_reduce itself: its stack looks like everyone else's, its state does not
    behind = find_behind([rr(0, 7, "all_reduce"), rr(1, 7, "all_reduce", "T (stopped)", "stopped by a signal"),
                          rr(2, 7, "all_reduce"), rr(3, 7, "all_reduce")])
    assert [(b["rank"], b["host"], b["state"], b["pid"]) for b in behind] == [(1, "n0", "T (stopped)", 101)]
    assert behind[0]["reason"] == "stopped by a signal; rank(s) 0,2,3 wait in all_reduce"
    # a stuck rank wins over a lower step elsewhere (a step behind is where the stuck one holds it)
    behind = find_behind([rr(0, 6), rr(1, 7, "all_reduce"), rr(2, 7, None, "D (disk sleep)", "in D")])
    assert [b["rank"] for b in behind] == [2]
    # nothing stuck: the rules before (a lower step; the one outside the collective) still hold
    assert [b["rank"] for b in find_behind([rr(0, 7, "all_reduce"), rr(1, 6)])] == [1]
    assert [b["rank"] for b in find_behind([rr(0, 7, "all_reduce"), rr(1, 7)])] == [1]


def test_the_watchdog_names_the_rank_in_d_from_a_proc_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc, progress = tmp_path / "proc", tmp_path / "progress"
    progress.mkdir()
    futex = "202 0x7f 0x80 0x0 0x0 0x0 0x0 0x7ffd2f3e1a58 0x7f5e1a0a3f16"
    for rank in range(4):
        pid = 5000 + rank
        if rank == 2:
            fake_process(proc, pid, "D (disk sleep)", wchan="request_wait_answer", stack=FUSE_READ_STACK,
                         syscall="0 0x7 0x7f5e0c000b70 0x100000 0x0 0x0 0x0 0x7ffd2f3e1a58 0x7f5e1a11a25d")
        else:
            fake_process(proc, pid, "S (sleeping)", wchan="futex_wait_queue", syscall=futex)
        (progress / f"rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "local_rank": rank, "host": HOST, "pid": pid, "step": 9, "time": time.time() - 60,
             "done": False}))
    monkeypatch.setattr(watchdog, "find_py_spy", lambda: None)  # the fake pids may be real processes here
    fired: list[HangReport] = []
    wd = HangWatchdog(progress_dir=progress, timeout_s=1.0, node=HOST, report_dir=tmp_path, on_hang=fired.append,
                      poll_s=0.05, processes=lambda: {}, proc=proc)
    wd.start()
    wait_until(lambda: fired, 10, "the hang report")
    wd.stop()
    behind = fired[0].behind
    assert [(b["rank"], b["host"], b["state"], b["wchan"]) for b in behind] == [
        (2, HOST, "D (disk sleep)", "request_wait_answer")]
    assert f"rank 2 on {HOST} (pid 5002, D (disk sleep) in request_wait_answer, in uninterruptible" in fired[0].summary
    text = (tmp_path / f"hang-report-{HOST}.txt").read_text()
    assert "process: D (disk sleep), wchan request_wait_answer, syscall read at libc.so.6+0x11a25d" in text
    assert "    fuse_simple_request+0x1a4/0x300" in text
    assert "no stack: py-spy: not installed" in text


def python_sleeping() -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", "import time\nprint('ready', flush=True)\n"
                             "def held_here():\n    time.sleep(120)\nheld_here()\n"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.skipif(not find_py_spy(), reason="py-spy is not installed")
def test_the_stack_of_a_stopped_process_is_read_without_suspending_it() -> None:
    proc = python_sleeping()
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        wait_until(lambda: read_proc(proc.pid).letter == "T", 5, "the stop")
        r = RankReport(rank=0, local_rank=0, host=HOST, pid=proc.pid, step=1, seconds_since_progress=1.0,
                       state="T (stopped)")
        watchdog.dump_stack(r, "T", find_py_spy(), stack_file="/nonexistent")
        assert r.stack_source == "py-spy" and "held_here" in r.stack
        assert "--nonblocking" in r.notes[0] and "ptrace cannot suspend it" in r.notes[0]
        assert read_proc(proc.pid).letter == "T"  # still stopped
    finally:
        proc.kill()
        proc.wait()


def test_a_stopped_rank_is_continued_once_the_teardown_signal_waits_at_it(tmp_path: Path) -> None:
    proc = python_sleeping()
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        wait_until(lambda: read_proc(proc.pid).letter == "T", 5, "the stop")
        wd = HangWatchdog(progress_dir=tmp_path, timeout_s=1, node=HOST, report_dir=tmp_path, on_hang=lambda r: None)
        report = HangReport(HOST, 1, 1, 1, [], [RankReport(rank=0, local_rank=0, host=HOST, pid=proc.pid, step=1,
                                                           seconds_since_progress=1.0, state="T (stopped)")])
        wd._let_stopped_ranks_end(report, wait_s=0.5)
        assert read_proc(proc.pid).letter == "T"  # no teardown asked for: left as it is
        waiter = threading.Thread(target=wd._let_stopped_ranks_end, args=(report,))
        waiter.start()
        os.kill(proc.pid, signal.SIGTERM)  # what the agent's teardown sends
        assert proc.wait(10) == -signal.SIGTERM
        waiter.join(5)
        assert not waiter.is_alive()
    finally:
        end_stopped(proc.pid)
        proc.wait()
