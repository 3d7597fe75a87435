"""A checkpoint on SIGTERM and Ctrl-C (#16 item 3): when the built-in job checkpoints, the
ranks agree on a step, save it and stop, within checkpoint.save_timeout_s; a second Ctrl-C
stops at once; resume=auto continues from that checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aitrain.launcher.config import CheckpointConfig, JobConfig
from aitrain.launcher.preemption import Stop, Stopper, agent_grace_s
from aitrain.strategies import checkpoint as ckpt

from aitrain_testing import aitrain_argv, all_gone, wait_until
from losses_reference import tiny_overrides

# A rank's view: the stop signal arrives, a save takes SAVE_S, maybe another signal meanwhile.
RANK = """
import os, signal, sys, time
from aitrain.launcher.preemption import Stopper
timeout, first, then, save_s = float(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
s = Stopper(terminate=True, save_timeout_s=timeout)
os.kill(os.getpid(), signal.Signals[first])
time.sleep(0.05)
assert s.stopping
print("saving", flush=True)
if then == "peer-died":
    s.end_as_signalled()
elif then != "-":
    os.kill(os.getpid(), signal.Signals[then])
t0 = time.monotonic()
while time.monotonic() - t0 < save_s:
    time.sleep(0.01)
s.saved()
print("saved", flush=True)
"""


def _rank(timeout: float, first: str, then: str, save_s: float) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", RANK, str(timeout), first, then, str(save_s)],
                       capture_output=True, text=True, timeout=30)
    return r, time.monotonic() - t0


@pytest.mark.parametrize("first,then,ends", [
    ("SIGINT", "SIGTERM", -signal.SIGTERM),  # a second Ctrl-C: the agent sends SIGTERM
    ("SIGINT", "SIGINT", -signal.SIGINT),  # a second Ctrl-C straight to the rank
    ("SIGTERM", "peer-died", -signal.SIGTERM),  # the save cannot happen: ends as SIGTERM would have
], ids=["ctrl_c_then_agent_sigterm", "ctrl_c_twice", "peer_died"])
def test_a_second_stop_ends_the_rank_at_once(first: str, then: str, ends: int) -> None:
    r, took = _rank(30, first, then, save_s=20)
    assert r.returncode == ends and "saving" in r.stdout and "saved" not in r.stdout, r.stderr
    assert took < 10


def test_a_repeated_sigterm_lets_the_save_finish() -> None:
    """Slurm signals the ranks and their agent, which passes SIGTERM on: the same request twice."""
    r, _ = _rank(30, "SIGTERM", "SIGTERM", save_s=0.5)
    assert r.returncode == 0 and "saved" in r.stdout, r.stderr


def test_a_save_past_save_timeout_s_is_given_up() -> None:
    r, took = _rank(0.3, "SIGTERM", "-", save_s=20)
    assert r.returncode == 128 + signal.SIGTERM and "saved" not in r.stdout
    assert "no checkpoint within checkpoint.save_timeout_s=0.3s of SIGTERM; stopping without it" in r.stderr
    assert took < 10


def test_should_stop_says_which_signal() -> None:
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        s = Stopper(terminate=True)
        assert s.should_stop() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.should_stop() == Stop("SIGTERM", preempted=False)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # the next Ctrl-C stops at once
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    assert not Stopper().armed and Stopper().should_stop() is None  # nothing armed: no collective per step


def test_the_agent_waits_long_enough_for_the_save() -> None:
    ckpt_on = JobConfig(checkpoint=CheckpointConfig(every_n_steps=10, save_timeout_s=30))
    assert agent_grace_s(ckpt_on, 5) == 35
    assert agent_grace_s(JobConfig(), 5) == 5  # no checkpoints: nothing to wait for
    assert agent_grace_s(JobConfig(script="train.py", checkpoint=ckpt_on.checkpoint), 5) == 5  # the user's program


# ---------------------------------------------------------------------------
# Through `aitrain launch`, no periodic checkpoint in reach: SIGTERM, resume and Ctrl-C, resume
# and Ctrl-C twice.


class _Launch:
    def __init__(self, tmp_path: Path, name: str, root: Path, *extra: str) -> None:
        self.out = tmp_path / f"{name}.txt"
        args = ["launch", "+strategy=ddp", "nproc_per_node=2", *tiny_overrides(steps=100000), "train.log_every=1",
                f"checkpoint.dir={root}", "checkpoint.every_n_steps=100000", *extra,
                f"hydra.run.dir={tmp_path / name}"]
        with open(self.out, "w") as f:
            # Its own process group, as a terminal's foreground job: a Ctrl-C goes to the whole group.
            self.proc = subprocess.Popen(aitrain_argv() + args, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)

    def text(self) -> str:
        return self.out.read_text()

    def wait_for(self, line: str) -> None:
        wait_until(lambda: line in self.text() or self.proc.poll() is not None, 120, line)
        assert line in self.text(), self.text()[-3000:]

    def ranks(self) -> list[int]:
        return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_rank(p, self.out.parent)]

    def stop(self, sig: signal.Signals, *, again_after: float | None = None) -> tuple[int, float]:
        ranks = self.ranks()
        t0 = time.monotonic()
        os.killpg(self.proc.pid, sig)
        if again_after is not None:
            time.sleep(again_after)
            os.killpg(self.proc.pid, sig)
        try:
            code = self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        took = time.monotonic() - t0
        assert not all_gone(ranks, 10), "rank processes left behind"
        return code, took


def _is_rank(p: Path, cwd: Path) -> bool:
    try:
        return b"aitrain.launcher.train" in (p / "cmdline").read_bytes() and Path(os.readlink(p / "cwd")) == cwd
    except OSError:
        return False


def _stopped_at(text: str, *sigs: str) -> int:
    marker = "aitrain: stopping at step "
    line = next((x for x in text.splitlines() if marker in x
                 and any(x.endswith(f"on {sig}; checkpoint saved") for sig in sigs)), None)
    assert line is not None, text[-3000:]
    return int(line.split(marker)[1].split()[0])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_and_ctrl_c_save_a_checkpoint_that_resume_auto_continues_from(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    first = _Launch(tmp_path, "first", root)
    first.wait_for("[rank0]:step 3/")
    code, _ = first.stop(signal.SIGTERM)
    n = _stopped_at(first.text(), "SIGTERM")
    assert code == 128 + signal.SIGTERM and "interrupted by SIGTERM" in first.text()
    assert n >= 3 and ckpt.is_complete(root / f"step-{n:08d}") and ckpt.verify(root / f"step-{n:08d}") == []

    second = _Launch(tmp_path, "second", root, "resume=auto")
    second.wait_for(f"[rank0]:step {n + 2}/")
    assert f"aitrain: resumed from {root / f'step-{n:08d}'} (step {n}," in second.text()
    assert f"[rank0]:step {n + 1}/" in second.text() and f"[rank0]:step {n}/" not in second.text()
    code, _ = second.stop(signal.SIGINT)  # Ctrl-C: the ranks get SIGINT or SIGTERM, depending on the agent
    m = _stopped_at(second.text(), "SIGINT", "SIGTERM")
    assert code == 128 + signal.SIGINT and "interrupted by SIGINT" in second.text()
    assert m > n and ckpt.verify(root / f"step-{m:08d}") == []

    third = _Launch(tmp_path, "third", root, "resume=auto")
    third.wait_for(f"[rank0]:step {m + 1}/")
    assert f"aitrain: resumed from {root / f'step-{m:08d}'} (step {m}," in third.text()
    code, took = third.stop(signal.SIGINT, again_after=0.05)  # Ctrl-C twice: stop now, whatever the save
    assert code == 128 + signal.SIGINT and took < 8, third.text()[-3000:]
    assert all(ckpt.verify(d) == [] for _, d in ckpt.complete_checkpoints(root))  # never a damaged "complete" one
