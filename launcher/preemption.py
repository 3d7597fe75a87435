"""Checkpoint-and-stop on a signal: the scheduler's warning, SIGTERM and Ctrl-C.

The Slurm backend arms the warning with ``AITRAIN_PREEMPT_SIGNAL=USR1`` (Slurm's
``--signal``); node agents forward it to every rank. The built-in job also arms SIGTERM
and SIGINT when it checkpoints (``checkpoint.every_n_steps > 0``): torch's elastic agent
stops ranks with the signal it got (SIGINT after a Ctrl-C to ``aitrain launch``, SIGTERM
after a SIGTERM or ``aitrain cancel``; Slurm and Ray send SIGTERM) and SIGKILLs them after
its shutdown timeout, which must cover ``checkpoint.save_timeout_s`` (:func:`agent_grace_s`).

Each rank notes the signal, and at the next step boundary all ranks agree (one tiny
all-reduce per step, only while armed) to save a checkpoint at the same step and stop.
After the warning, rank 0 leaves a marker in the run directory so the launcher requeues
the job instead of calling it finished; after SIGTERM/SIGINT it does not (a cancel).

Bounds: after SIGTERM/SIGINT a rank has ``checkpoint.save_timeout_s`` to finish its step
and the save, then it ends as the signal would have ended it, without that checkpoint (the
one before stays the newest complete one). A second Ctrl-C stops at once: after the first
signal SIGINT, and SIGTERM after a SIGINT, take their default action (the agent answers a
second Ctrl-C with SIGTERM). A repeated SIGTERM is the same request twice (Slurm signals
the ranks and their agent, which passes it on) and changes nothing.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aitrain.launcher.config import JobConfig

ENV = "AITRAIN_PREEMPT_SIGNAL"
MARKER = "preempted"
TERMINATE = (signal.SIGTERM, signal.SIGINT)
GRACE_MARGIN_S = 5  # beyond save_timeout_s: the rank's own deadline fires before the agent's SIGKILL


def agent_grace_s(cfg: JobConfig, default: int) -> int:
    """Seconds a node agent should wait between stopping ranks and killing them: ``default``,
    or enough for the built-in job's checkpoint on SIGTERM/Ctrl-C when it checkpoints."""
    builtin = cfg.script is None and cfg.module is None
    if not builtin or cfg.checkpoint.every_n_steps <= 0 or cfg.checkpoint.save_timeout_s <= 0:
        return default
    return max(default, math.ceil(cfg.checkpoint.save_timeout_s) + GRACE_MARGIN_S)


def _signum(name: str) -> signal.Signals:
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


@dataclass(frozen=True)
class Stop:
    """What every rank agreed on at a step boundary."""

    signal: str  # the signal that asked for it: SIGUSR1, SIGTERM, SIGINT, ...
    preempted: bool  # the scheduler's warning came (requeue after the checkpoint), not only a stop


class Stopper:
    """Notes the signals; :meth:`should_stop` is the collective agreement at a step boundary."""

    def __init__(self, signame: str | None = None, *, terminate: bool = False, save_timeout_s: float = 0.0) -> None:
        self._warn = _signum(signame) if signame else None
        self.armed = bool(signame) or terminate
        self.save_timeout_s = save_timeout_s
        self._preempt = False
        self._stop_sig = 0  # the first SIGTERM/SIGINT (0: none yet)
        self._deadline: threading.Timer | None = None
        self._old: dict[int, Any] = {}
        if self._warn is not None:
            self._old[self._warn] = signal.signal(self._warn, self._on_warning)
        if terminate:
            for sig in TERMINATE:
                self._old[sig] = signal.signal(sig, self._on_stop)

    @classmethod
    def from_env(cls, *, terminate: bool = False, save_timeout_s: float = 0.0) -> Stopper:
        return cls(os.environ.get(ENV) or None, terminate=terminate, save_timeout_s=save_timeout_s)

    @property
    def stopping(self) -> bool:
        """SIGTERM/SIGINT came: the rank is on its way out."""
        return bool(self._stop_sig)

    def _on_warning(self, signum: int, _frame: Any) -> None:
        self._preempt = True

    def _on_stop(self, signum: int, _frame: Any) -> None:
        if self._stop_sig:
            return  # a repeated SIGTERM: the same request delivered twice
        self._stop_sig = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops at once
        if signum == signal.SIGINT:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the agent's answer to a second Ctrl-C
        if self.save_timeout_s > 0:
            self._deadline = threading.Timer(self.save_timeout_s, self._give_up)
            self._deadline.daemon = True
            self._deadline.start()

    def _give_up(self) -> None:
        sig = signal.Signals(self._stop_sig)
        print(f"aitrain: rank {os.environ.get('RANK', '0')}: no checkpoint within checkpoint.save_timeout_s="
              f"{self.save_timeout_s:g}s of {sig.name}; stopping without it", file=sys.stderr, flush=True)
        self.end_as_signalled()

    def end_as_signalled(self) -> None:
        """End this process as the stop signal would have (its default action), e.g. when a
        peer died while the job was being stopped and the collective save cannot happen."""
        if not self._stop_sig:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            signal.signal(self._stop_sig, signal.SIG_DFL)
        except ValueError:  # not the main thread (the deadline): the shell's code for "ended by the signal"
            pass
        else:
            os.kill(os.getpid(), self._stop_sig)  # ends the process here
        os._exit(128 + self._stop_sig)

    def should_stop(self) -> Stop | None:
        """What every rank agreed on, once any rank got a signal (collective while armed)."""
        if not self.armed:
            return None
        import torch
        import torch.distributed as dist

        flags = torch.tensor([1.0 if self._preempt else 0.0, float(self._stop_sig)])
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                flags = flags.cuda()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        preempt, stop = (float(x) for x in flags.tolist())
        if not preempt and not stop:
            return None
        if stop:
            return Stop(signal.Signals(int(stop)).name, bool(preempt))
        assert self._warn is not None
        return Stop(self._warn.name, True)

    def saved(self) -> None:
        """The checkpoint of the stop is on disk: the deadline no longer applies."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def close(self) -> None:
        """The loop is over: the handlers it installed go, unless a stop is under way (a second
        Ctrl-C must still stop at once)."""
        if self._stop_sig:
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    @staticmethod
    def mark(run_dir: str | os.PathLike[str], step: int) -> None:
        Path(run_dir, MARKER).write_text(f"{step}\n")
