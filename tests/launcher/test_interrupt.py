"""Ctrl-C as a terminal sends it (SIGINT to the whole foreground process group): every rank
stops, no KeyboardInterrupt traceback from ranks that were told to stop, the launch says
what happened once; a second Ctrl-C stops at once, even ranks that ignore SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from aitrain_testing import REPO, aitrain_argv, all_gone, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
FAIL_SCRIPT = REPO / "tests" / "scripts" / "fail_rank.py"
STUBBORN = """\
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a rank that will not stop when asked
with open(os.path.join(os.environ["PID_DIR"], f"rank{os.environ['RANK']}.pid"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(600)
"""


def _start(tmp_path: Path, script: Path, n: int) -> tuple[subprocess.Popen[str], list[int]]:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = dict(os.environ, PID_DIR=str(pid_dir), MODE="sleep")
    proc = subprocess.Popen(aitrain_argv() + ["launch", "tracking=none", "fabric=off", f"nproc_per_node={n}", "--",
                                              str(script)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    files = wait_until(lambda: (lambda f: f if len(f) == n and all(p.read_text() for p in f) else None)(
        list(pid_dir.glob("rank*.pid"))), 60, "ranks")
    return proc, [int(p.read_text()) for p in files]


def test_ctrl_c_stops_every_rank_without_their_tracebacks(tmp_path: Path) -> None:
    proc, pids = _start(tmp_path, FAIL_SCRIPT, 2)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert err.count("aitrain: error: interrupted by SIGINT; all ranks were stopped") == 1, err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, out + err
    assert not all_gone(pids, 5)


def test_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    proc, pids = _start(tmp_path, script, 2)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None  # the ranks ignore SIGTERM: the first Ctrl-C waits for them
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 3
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert not all_gone(pids, 5), "a rank outlived the second Ctrl-C"
