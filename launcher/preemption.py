"""Checkpoint-and-stop on the scheduler's warning signal (Slurm's ``--signal``).

The Slurm backend arms this with ``AITRAIN_PREEMPT_SIGNAL=USR1``: node agents
forward the signal to every rank, each rank notes it, and at the next step
boundary all ranks agree (one tiny all-reduce, only while armed) to save a
checkpoint at the same step and stop; rank 0 leaves a marker in the run
directory so the launcher requeues the job instead of calling it finished.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

ENV = "AITRAIN_PREEMPT_SIGNAL"
MARKER = "preempted"


class Stopper:
    def __init__(self, signame: str | None) -> None:
        self.armed = bool(signame)
        self._got = False
        if signame:
            sig = getattr(signal, signame if signame.startswith("SIG") else f"SIG{signame}")
            signal.signal(sig, self._on_signal)

    @classmethod
    def from_env(cls) -> Stopper:
        return cls(os.environ.get(ENV) or None)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._got = True

    def should_stop(self) -> bool:
        """True on every rank once any rank got the signal (collective while armed)."""
        if not self.armed:
            return False
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            return self._got
        flag = torch.tensor([1.0 if self._got else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    @staticmethod
    def mark(run_dir: str | os.PathLike[str], step: int) -> None:
        Path(run_dir, MARKER).write_text(f"{step}\n")
