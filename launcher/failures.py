"""Failures as data: how each rank of a job ended, and which one failed first.

Every backend reports the end of its ranks as :class:`RankExit` records: the node agent
(local, Slurm) writes them into its result file, the Ray driver builds them from its
actors' answers. :func:`root_cause_first` orders them the same way for every backend,
and :func:`describe` turns them into the one message a user reads: the rank that failed
first, first, with its error and the last lines it printed.

Nothing here parses messages back: a rank that aitrain stopped because another one failed
is marked ``stopped`` when it is stopped, and the order comes from when each rank ended.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

TAIL_LINES = 15  # of the failing rank's output in the message


def signal_name(number: int) -> str:
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class RankExit:
    """How one rank ended."""

    rank: int
    node: str = ""  # the job node ("node2", "node0"); empty on a one-node local job
    exit_code: int | None = None  # the process's exit status; None: killed by a signal or never seen to end
    signal: str = ""  # "SIGTERM" when a signal ended it
    stopped: bool = False  # aitrain stopped it (another rank had failed, or the job was interrupted)
    ended_at: float | None = None  # wall-clock time the rank ended (its output closed), when known
    error: str = ""  # the rank's error line (the exception, from its error file or its last line)
    tail: tuple[str, ...] = ()  # its last lines of output (the traceback)
    pid: int | None = None
    oom: str = ""  # why the kernel's OOM killer is the cause, when it is
    lost: str = ""  # how the rank's process was lost without an exit status ("lost its Ray worker (...)")

    @property
    def failed(self) -> bool:
        return not self.stopped and (self.exit_code not in (0, None) or bool(self.signal) or bool(self.oom)
                                     or bool(self.lost))

    def how(self) -> str:
        """``exited with code 1``, ``was killed by SIGKILL``, ``was stopped (SIGTERM)``."""
        if self.lost:
            return self.lost
        if self.oom:
            return f"was killed by the kernel OOM killer: {self.oom}"
        if self.stopped:
            return f"was stopped{f' ({self.signal})' if self.signal else ''} after the failure"
        if self.signal:
            return f"was killed by {self.signal}"
        return f"exited with code {self.exit_code}"

    def label(self) -> str:
        """``rank 1 on node2 (pid 77)``: the node when the job names nodes, the pid when known."""
        return (f"rank {self.rank}" + (f" on {self.node}" if self.node else "")
                + (f" (pid {self.pid})" if self.pid else ""))

    def summary(self) -> str:
        text = f"{self.label()} {self.how()}"
        return f"{text}: {self.error}" if self.error and not self.stopped else text

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tail"] = list(self.tail)
        d["message"] = self.summary()  # what `aitrain status` shows
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankExit:
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        kw["tail"] = tuple(kw.get("tail") or ())
        return cls(**kw)


def exit_from_status(rank: int, status: int | None, **kw: Any) -> RankExit:
    """A RankExit from a ``Popen.returncode``-style status (negative: the signal)."""
    if status is not None and status < 0:
        return RankExit(rank, exit_code=None, signal=signal_name(-status), **kw)
    return RankExit(rank, exit_code=status, **kw)


def root_cause_first(exits: Iterable[RankExit]) -> list[RankExit]:
    """Failed ranks before the ones aitrain stopped; among them, the one that ended first
    first (ranks whose end time is unknown after those with one); then by rank."""
    return sorted(exits, key=lambda e: (not e.failed, e.stopped, e.ended_at is None, e.ended_at or 0.0, e.rank))


def failures(exits: Iterable[RankExit]) -> list[RankExit]:
    """The ranks that did not end well, root cause first (successful ranks left out)."""
    return [e for e in root_cause_first(exits) if e.failed or e.stopped]


def describe(exits: Sequence[RankExit], *, attempts: int = 1, limit: int = 4) -> str:
    """The failure message: ``the job failed: <root cause>``, then the others, then the last
    lines the root cause printed."""
    ordered = failures(exits)
    if not ordered:
        return "the job failed"
    root = ordered[0]
    after = f" (after {attempts} attempts)" if attempts > 1 else ""
    lines = [f"the job failed{after}: {root.summary()}"]
    lines += [f"also: {e.summary()}" for e in ordered[1:limit]]
    if len(ordered) > limit:
        lines.append(f"also: {len(ordered) - limit} more rank(s)")
    if root.tail:
        lines.append(f"last lines of rank {root.rank}:")
        lines += [f"  {t}" for t in root.tail[-TAIL_LINES:]]
    return "\n".join(lines)


def exit_code_of(exits: Sequence[RankExit]) -> int:
    """The launch's exit status for these exits: the root cause's code (128+N for signal N)."""
    ordered = failures(exits)
    if not ordered:
        return 0
    root = ordered[0]
    if root.exit_code:
        return root.exit_code
    if root.signal:
        try:
            return 128 + int(getattr(_signal.Signals, root.signal))
        except (AttributeError, ValueError):
            return 1
    return 1


def error_line(lines: Sequence[str]) -> str:
    """The error a rank printed last: its last non-blank line (Python ends a traceback with
    the exception), without a ``[rankN]:`` prefix torch may have put there."""
    for line in reversed(lines):
        text = line.strip()
        if text:
            if text.startswith("[rank") and "]:" in text:
                text = text.split("]:", 1)[1].strip()
            return text[:500]
    return ""


@dataclass
class NodeResult:
    """What one node agent writes when its ranks have ended (``agent-result*.json``)."""

    ok: bool
    exit_code: int = 0
    message: str = ""
    hint: str = ""
    node: str = ""
    ranks: list[RankExit] = field(default_factory=list)
    interrupted: bool = False  # a signal to the agent (Ctrl-C, SIGTERM, scancel) stopped the ranks

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "exit_code": self.exit_code, "message": self.message, "hint": self.hint,
                "node": self.node, "ranks": [r.to_dict() for r in self.ranks], "interrupted": self.interrupted}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeResult:
        return cls(ok=bool(d.get("ok")), exit_code=int(d.get("exit_code") or 0), message=str(d.get("message") or ""),
                   hint=str(d.get("hint") or ""), node=str(d.get("node") or ""),
                   ranks=[RankExit.from_dict(r) for r in d.get("ranks") or []],
                   interrupted=bool(d.get("interrupted")))
