"""Rank-side progress: step heartbeats and phase marks, for any torchrun-style program.

    from aitrain.launcher import progress

    progress.mark("pg_init")     # a phase ended now (after init_process_group)
    for step in range(n):
        ...
        progress.step(step + 1)  # this rank finished step `step + 1`
    progress.done()              # the loop is over: the hang watchdog stops watching this rank

Under ``aitrain launch`` each rank keeps one small JSON record,
``$AITRAIN_PROGRESS_DIR/rank<RANK>.json``, rewritten in place with one
``pwrite`` per call (a few microseconds; no network, no thread, no flush to a
server). The node agent's hang watchdog reads it; the launcher's tracker turns
the marks into phase timings. Without ``AITRAIN_PROGRESS_DIR`` (plain torchrun,
a notebook) every call is a no-op.

Phase durations are the gaps between consecutive marks of a rank, the first one
measured from the moment the agent spawned it (``AITRAIN_SPAWN_TIME``); the
first :func:`step` call marks ``first_step``. The built-in job marks
``startup`` (imports done), ``pg_init`` (process group up) and ``first_step``.

Under aitrain the rank also registers :mod:`faulthandler` on ``SIGRTMIN+3`` (unless
the program handles that signal itself), so the watchdog can get its Python stack
even without py-spy.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from typing import Any

PROGRESS_DIR_ENV = "AITRAIN_PROGRESS_DIR"
SPAWN_TIME_ENV = "AITRAIN_SPAWN_TIME"
# A real-time signal: SIGUSR1/SIGUSR2 mean "checkpoint and stop" to ranks under Slurm preemption.
STACK_SIGNAL = signal.SIGRTMIN + 3


class Heartbeat:
    """One rank's progress record, rewritten in place (see module docstring)."""

    def __init__(self, directory: str, rank: int, local_rank: int) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"rank{rank}.json")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._written = 0
        spawn = os.environ.get(SPAWN_TIME_ENV)
        self.record: dict[str, Any] = {
            "rank": rank,
            "local_rank": local_rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "spawn_time": float(spawn) if spawn else None,
            "step": None,
            "time": time.time(),
            "done": False,
            "marks": {},
            "info": {},
            "stack_file": self._register_stack_dump(directory, rank),
        }
        self._write()

    def _register_stack_dump(self, directory: str, rank: int) -> str | None:
        import faulthandler

        try:
            if signal.getsignal(STACK_SIGNAL) not in (signal.SIG_DFL, None):
                return None  # the program uses this signal itself
            path = os.path.join(directory, f"stack-rank{rank}.txt")
            self._stack_file = open(path, "w")  # kept open: faulthandler writes to its fd
            faulthandler.register(STACK_SIGNAL, file=self._stack_file, all_threads=True, chain=False)
            return path
        except (OSError, ValueError, RuntimeError):  # not the main interpreter, no signals here
            return None

    def _write(self) -> None:
        data = json.dumps(self.record, separators=(",", ":")).encode()
        if len(data) < self._written:
            data = data.ljust(self._written)  # cover the tail of a longer previous record
        os.pwrite(self._fd, data, 0)
        self._written = len(data)

    def step(self, step: int) -> None:
        now = time.time()
        if self.record["step"] is None and "first_step" not in self.record["marks"]:
            self.record["marks"]["first_step"] = now
        self.record["step"] = int(step)
        self.record["time"] = now
        self._write()

    def mark(self, name: str) -> None:
        now = time.time()
        self.record["marks"][name] = now
        self.record["time"] = now
        self._write()

    def note(self, **info: Any) -> None:
        self.record["info"].update(info)
        self._write()

    def done(self) -> None:
        self.record["done"] = True
        self.record["time"] = time.time()
        self._write()


_heartbeat: Heartbeat | None = None
_disabled = False


def _get() -> Heartbeat | None:
    global _heartbeat, _disabled
    if _heartbeat is not None:
        # A forked child (a DataLoader worker) must not overwrite its parent's record.
        return _heartbeat if _heartbeat.record["pid"] == os.getpid() else None
    if _disabled:
        return None
    directory = os.environ.get(PROGRESS_DIR_ENV)
    if not directory:
        _disabled = True
        return None
    try:
        _heartbeat = Heartbeat(directory, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))
    except OSError:
        _disabled = True  # progress is best effort: never fail a rank over it
    return _heartbeat


def step(n: int) -> None:
    """This rank finished step ``n`` (1-based is conventional; any increasing number works)."""
    hb = _get()
    if hb is not None:
        hb.step(n)


def mark(name: str) -> None:
    """Phase ``name`` ended now (e.g. ``"pg_init"`` right after ``init_process_group``)."""
    hb = _get()
    if hb is not None:
        hb.mark(name)


def note(**info: Any) -> None:
    """Facts the tracker uses (JSON values), e.g. ``note(n_params=124_000_000)`` for the MFU estimate."""
    hb = _get()
    if hb is not None:
        hb.note(**info)


def done() -> None:
    """The training loop is over: slow teardown after this is not a hang."""
    hb = _get()
    if hb is not None:
        hb.done()


def read_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A heartbeat record as written above (None if missing or caught mid-write)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    for _ in range(2):
        try:
            rec = json.loads(data.decode(errors="replace").strip() or "null")
            return rec if isinstance(rec, dict) else None
        except ValueError:
            time.sleep(0.001)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                return None
    return None


def phase_durations(rec: dict[str, Any]) -> dict[str, float]:
    """{mark name: seconds since the previous mark (or the spawn)} for one heartbeat record."""
    marks = sorted(((float(t), name) for name, t in (rec.get("marks") or {}).items()), key=lambda m: m[0])
    prev = rec.get("spawn_time")
    out = {}
    for t, name in marks:
        if prev is not None:
            out[name] = max(0.0, t - float(prev))
        prev = t
    return out
