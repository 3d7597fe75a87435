"""Rank-side progress records and the hang watchdog's judgement, without a job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from aitrain.launcher.node.watchdog import (
    HangWatchdog,
    RankReport,
    dump_stack_faulthandler,
    find_behind,
    render_text,
    waiting_collective,
)
from aitrain.launcher.progress import phase_durations, read_record

RANK_PROGRAM = textwrap.dedent("""
    import sys, time
    from aitrain.launcher import progress
    progress.mark("startup")
    progress.note(n_params=123)
    for step in range(1, 4):
        progress.step(step)
    progress.mark("checkpoint")
    if sys.argv[1:] == ["wait"]:
        def stuck_here():
            print("ready", flush=True)  # from inside: a signal after "ready" finds this frame
            time.sleep(60)
        stuck_here()
    progress.done()
""")


def run_rank(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full = dict(os.environ, RANK="3", LOCAL_RANK="1", AITRAIN_SPAWN_TIME=str(time.time()), **(env or {}))
    return subprocess.Popen([sys.executable, "-c", RANK_PROGRAM, *args], env=full, text=True,
                            stdout=subprocess.PIPE)


def test_progress_is_a_no_op_without_the_env(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AITRAIN_PROGRESS_DIR"}
    r = subprocess.run([sys.executable, "-c", RANK_PROGRAM], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_progress_record_and_phase_durations(tmp_path: Path) -> None:
    proc = run_rank(tmp_path, env={"AITRAIN_PROGRESS_DIR": str(tmp_path)})
    assert proc.wait(30) == 0
    rec = read_record(tmp_path / "rank3.json")
    assert rec is not None
    assert rec["rank"] == 3 and rec["local_rank"] == 1 and rec["step"] == 3 and rec["done"] is True
    assert rec["info"] == {"n_params": 123}
    assert set(rec["marks"]) == {"startup", "first_step", "checkpoint"}
    durations = phase_durations(rec)
    assert list(durations) == ["startup", "first_step", "checkpoint"]
    assert all(0 <= v < 30 for v in durations.values())


def test_faulthandler_stack_of_a_live_rank(tmp_path: Path) -> None:
    proc = run_rank(tmp_path, "wait", env={"AITRAIN_PROGRESS_DIR": str(tmp_path)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        rec = read_record(tmp_path / "rank3.json")
        assert rec and rec["stack_file"]
        stack = dump_stack_faulthandler(proc.pid, rec["stack_file"])
        assert stack is not None and "stuck_here" in stack
        assert proc.poll() is None  # the signal did not kill it
    finally:
        proc.kill()
        proc.wait()


def test_collective_detection() -> None:
    pyspy = ('Thread 7 (idle): "MainThread"\n    all_reduce (torch/distributed/distributed_c10d.py:2950)\n'
             '    _exception_logger.<locals>.wrapper (torch/distributed/c10d_logger.py:83)\n    <module> (job.py:40)\n')
    fh = ('Current thread 0x00007f (most recent call first):\n'
          '  File "/v/site-packages/torch/distributed/distributed_c10d.py", line 4800 in barrier\n'
          '  File "/v/site-packages/torch/distributed/c10d_logger.py", line 83 in wrapper\n'
          '  File "job.py", line 12 in <module>\n')
    assert waiting_collective(pyspy) == "all_reduce"
    assert waiting_collective(fh) == "barrier"
    assert waiting_collective('Thread 8 (idle): "MainThread"\n    <module> (job.py:38)\n') is None


def rr(rank: int, step: int | None, waiting: str | None = None, done: bool = False) -> RankReport:
    return RankReport(rank=rank, local_rank=rank, host=f"n{rank // 2}", pid=100 + rank, step=step,
                      seconds_since_progress=5.0, done=done, waiting_in=waiting, stack="..." if step else "")


def test_who_is_behind() -> None:
    # a rank at a lower step than the rest
    behind = find_behind([rr(0, 7, "all_reduce"), rr(1, 6), rr(2, 7, "all_reduce"), rr(3, 7, "all_reduce")])
    assert [(b["rank"], b["host"]) for b in behind] == [(1, "n0")] and "step 6" in behind[0]["reason"]
    # same step: the one not waiting in a collective
    behind = find_behind([rr(0, 7, "all_reduce"), rr(1, 7), rr(2, 7, "all_reduce"), rr(3, 7, "all_reduce")])
    assert [b["rank"] for b in behind] == [1] and "all_reduce" in behind[0]["reason"]
    # everyone waits: nobody on this node stands out
    assert find_behind([rr(0, 7, "all_reduce"), rr(1, 7, "all_reduce")]) == []
    # a rank that never reported a step
    assert [b["rank"] for b in find_behind([rr(0, 3, "barrier"), rr(1, None)])] == [1]
    # finished ranks are not behind
    assert find_behind([rr(0, 9, done=True), rr(1, 7)]) == []


def test_watchdog_fires_once_after_the_timeout(tmp_path: Path) -> None:
    progress = tmp_path / "progress"
    progress.mkdir()
    host = os.uname().nodename

    def beat(rank: int, step: int, age: float, done: bool = False) -> None:
        (progress / f"rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "local_rank": rank, "host": host, "pid": None, "step": step,
             "time": time.time() - age, "done": done, "marks": {}}))

    fired = []
    wd = HangWatchdog(progress_dir=progress, timeout_s=1.0, node=host, report_dir=tmp_path,
                      on_hang=fired.append, poll_s=0.05, processes=lambda: {})
    wd.start()
    time.sleep(0.3)
    assert not fired  # not armed: no heartbeat yet
    beat(0, 5, age=0.0)
    beat(1, 4, age=0.0)
    time.sleep(0.5)
    assert not fired  # progress is recent
    beat(0, 5, age=5.0)
    beat(1, 4, age=5.0)
    deadline = time.monotonic() + 5
    while not fired and time.monotonic() < deadline:
        time.sleep(0.05)
    wd.stop()
    assert len(fired) == 1
    report = fired[0]
    assert report.max_step == 5 and [b["rank"] for b in report.behind] == [1]
    saved = json.loads((tmp_path / f"hang-report-{host}.json").read_text())
    assert saved["behind"][0]["host"] == host and saved["summary"] == report.summary
    assert "rank 1" in (tmp_path / f"hang-report-{host}.txt").read_text()
    assert "rank 1 on" in render_text(report)


def test_watchdog_ignores_ranks_that_are_done(tmp_path: Path) -> None:
    progress = tmp_path / "progress"
    progress.mkdir()
    (progress / "rank0.json").write_text(json.dumps({"rank": 0, "host": os.uname().nodename, "step": 9,
                                                     "time": time.time() - 100, "done": True}))
    fired = []
    wd = HangWatchdog(progress_dir=progress, timeout_s=0.2, node=os.uname().nodename, report_dir=tmp_path,
                      on_hang=fired.append, poll_s=0.05, processes=lambda: {})
    wd.start()
    time.sleep(0.5)
    wd.stop()
    assert fired == []
