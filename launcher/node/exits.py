"""When each rank process of this node ended, to the millisecond.

torch's elastic agent notices a dead rank at its next poll and stamps the failure with a
whole second, which cannot tell which of two ranks that died in the same second went
first. This thread watches the agent's rank processes through pidfds (readable the moment
the process exits, before anyone reaps it), so the failure report can name the rank that
failed first.
"""

from __future__ import annotations

import os
import select
import threading
import time

from aitrain.launcher.node.watchdog import rank_processes

FIND_S = 30.0  # how long after a spawn to look for the new rank processes


class ExitClock:
    """Started when the agent spawns its ranks (again on a restart); ``ended_at(rank)``."""

    def __init__(self, nproc: int) -> None:
        self.nproc = nproc
        self._ended: dict[int, float] = {}
        self._watched: dict[int, int] = {}  # pid -> rank
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._spawned = threading.Event()
        self._thread: threading.Thread | None = None

    def spawned(self) -> None:
        """The agent is starting (or restarting) its ranks: find and watch them."""
        with self._lock:
            self._ended.clear()
        self._spawned.set()
        if self._thread is None and hasattr(os, "pidfd_open"):
            self._thread = threading.Thread(target=self._main, name="aitrain-exits", daemon=True)
            self._thread.start()

    def ended_at(self, rank: int) -> float | None:
        with self._lock:
            return self._ended.get(rank)

    def stop(self) -> None:
        self._stop.set()
        self._spawned.set()
        if self._thread is not None:
            self._thread.join(2)

    def _main(self) -> None:
        poller = select.poll()
        fds: dict[int, tuple[int, int]] = {}  # fd -> (pid, rank)
        looking_until = 0.0
        found = 0
        try:
            while not self._stop.is_set():
                if self._spawned.is_set():
                    self._spawned.clear()
                    looking_until, found = time.monotonic() + FIND_S, 0
                if time.monotonic() < looking_until:
                    for pid, env in rank_processes().items():
                        if pid in self._watched:
                            continue
                        try:
                            fd = os.pidfd_open(pid)
                            rank = int(env["RANK"])
                        except (OSError, ValueError, KeyError):
                            continue
                        self._watched[pid] = rank
                        fds[fd] = (pid, rank)
                        poller.register(fd, select.POLLIN)
                        found += 1
                    if found >= self.nproc:
                        looking_until = 0.0
                for fd, _ in poller.poll(50 if looking_until else 250):
                    _, rank = fds.pop(fd)
                    with self._lock:
                        self._ended.setdefault(rank, time.time())
                    poller.unregister(fd)
                    os.close(fd)
        finally:
            for fd in fds:
                os.close(fd)
