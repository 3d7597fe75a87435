"""Rank output on one node: one log file per rank, and a deduplicated, filtered console.

torch's elastic agent is told (through :class:`RankLogsSpecs`) to connect each rank's
stdout and stderr to a named pipe that this module reads as the bytes arrive. Every line
goes to ``<log_dir>/rank<N>.log`` (both streams, in arrival order); lines of the ranks
selected by ``log.ranks`` go to the console with a ``[rankN]:`` prefix (stderr lines to
stderr). With ``log.dedup=true`` a line that several ranks print within a few seconds is
shown once, and then once more as ``[rank1-7]:<line> [repeated 7x]`` for the copies that
were held back (as Ray does).
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

DEDUP_WINDOW_S = 5.0
TAIL_LINES = 30  # kept per rank for the failure message
MAX_LINE = 64 * 1024  # a line without newline is cut here (progress bars, binary junk)


def parse_ranks(spec: str | int | None) -> set[int] | None:
    """``all`` -> None (every rank); ``0`` -> {0}; ``0,3`` -> {0, 3}; ``0-3`` -> {0, 1, 2, 3}."""
    if spec is None:
        return None
    text = str(spec).strip().strip("'\"[]()")
    if text.lower() in ("", "all", "*"):
        return None
    ranks: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                ranks.update(range(int(lo), int(hi) + 1))
            else:
                ranks.add(int(part))
        except ValueError:
            raise ValueError(f"log.ranks={spec!r}: expected all, a rank, or ranks like 0,3 or 0-3") from None
    return ranks


def compact_ranks(ranks: list[int] | set[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the kernel's cpulist notation)."""
    from aitrain.fabric.host.cpus import format_cpulist

    return format_cpulist(list(ranks))


@dataclass
class _Pending:
    t0: float
    seen: set[int]
    held: list[int] = field(default_factory=list)


class Console:
    """Rank lines to the terminal: filter by rank, collapse identical lines of several ranks."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, *, ranks: set[int] | None = None,
                 dedup: bool = True, window_s: float = DEDUP_WINDOW_S, clock: Any = time.monotonic) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.ranks = ranks
        self.dedup = dedup
        self.window_s = window_s
        self.clock = clock
        self._pending: dict[tuple[bool, str], _Pending] = {}

    def _emit(self, is_err: bool, prefix: str, text: str) -> None:
        (self.err if is_err else self.out).write(f"[rank{prefix}]:{text}\n")

    def _summary(self, is_err: bool, text: str, p: _Pending) -> None:
        if p.held:
            self._emit(is_err, compact_ranks(p.held), f"{text} [repeated {len(p.held)}x]")

    def line(self, rank: int, text: str, is_err: bool = False) -> None:
        if self.ranks is not None and rank not in self.ranks:
            return
        own = f"[rank{rank}]:"
        # torch prefixes a rank's traceback itself: one prefix is enough on the console. Such
        # lines differ from rank to rank, so they are never folded together.
        shown = text[len(own):] if text.startswith(own) else text
        if not self.dedup:
            self._emit(is_err, str(rank), shown)
            return
        now = self.clock()
        key = (is_err, text)
        p = self._pending.get(key)
        if p is not None and now - p.t0 <= self.window_s and rank not in p.seen:
            p.seen.add(rank)
            p.held.append(rank)
            return
        if p is not None:  # the window is over, or the same rank says it again: a new occurrence
            self._summary(is_err, text, p)
        self._emit(is_err, str(rank), shown)
        self._pending[key] = _Pending(now, {rank})

    def tick(self) -> None:
        """Print the summaries of windows that have closed."""
        now = self.clock()
        for key in [k for k, p in self._pending.items() if now - p.t0 > self.window_s]:
            self._summary(key[0], key[1], self._pending.pop(key))

    def close(self) -> None:
        for key, p in list(self._pending.items()):
            self._summary(key[0], key[1], p)
        self._pending.clear()
        self.flush()

    def flush(self) -> None:
        for stream in (self.out, self.err):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


@dataclass
class _Source:
    fd: int
    rank: int
    is_err: bool
    sink: Any  # the rank's log file (binary)
    buf: bytes = b""


PIPE_DIR_PREFIX = "aitrain-ranks-"


def _sweep_stale_pipe_dirs() -> None:
    """Remove the FIFO dirs of agents that were killed (SIGKILL leaves no chance to clean up):
    ``aitrain-ranks-<pid>-*`` of this user whose pid is gone."""
    for d in Path(tempfile.gettempdir()).glob(f"{PIPE_DIR_PREFIX}*-*"):
        pid = d.name[len(PIPE_DIR_PREFIX):].split("-", 1)[0]
        try:
            if pid.isdigit() and not Path(f"/proc/{pid}").exists() and d.stat().st_uid == os.getuid():
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


class RankStreams:
    """Reads every rank's pipes in one thread; writes rank files and the console."""

    active: list[RankStreams] = []  # for flush_all()

    def __init__(self, log_dir: Path, console: Console, poll_ms: int = 100) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.console = console
        self.poll_ms = poll_ms
        # Made when the first rank is spawned: an agent stopped before that (a failed smoke gate,
        # a cancelled allocation) leaves nothing in /tmp behind.
        self.pipe_dir: Path | None = None
        self._files: dict[int, Any] = {}
        self._sources: dict[int, _Source] = {}
        self._tails: dict[int, deque[str]] = {}
        self._err_tails: dict[int, deque[str]] = {}
        self._new: list[_Source] = []
        self._flush_waiters: list[threading.Event] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="aitrain-logstream", daemon=True)
        self._thread.start()
        RankStreams.active.append(self)

    def rank_log(self, rank: int) -> Path:
        return self.log_dir / f"rank{rank}.log"

    def open_rank(self, rank: int, attempt: int = 0) -> tuple[str, str]:
        """Named pipes for one rank's stdout and stderr, already open for reading."""
        paths = []
        with self._lock:
            if self.pipe_dir is None:
                _sweep_stale_pipe_dirs()
                self.pipe_dir = Path(tempfile.mkdtemp(prefix=f"{PIPE_DIR_PREFIX}{os.getpid()}-"))
            f = self._files.get(rank)
            if f is None:
                f = self._files[rank] = open(self.rank_log(rank), "ab")
            if attempt:
                f.write(f"----- restart attempt {attempt} -----\n".encode())
            for is_err in (False, True):
                path = self.pipe_dir / f"a{attempt}-rank{rank}.{'err' if is_err else 'out'}"
                if path.exists():
                    path.unlink()
                os.mkfifo(path, 0o600)
                # Non-blocking read end first, so the agent's open(path, "w") does not block.
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                self._new.append(_Source(fd, rank, is_err, f))
                paths.append(str(path))
        return paths[0], paths[1]

    # -- the reader thread ---------------------------------------------------------

    def _lines(self, src: _Source, data: bytes, final: bool = False) -> None:
        src.buf += data
        while True:
            nl = src.buf.find(b"\n")
            if nl < 0:
                if len(src.buf) >= MAX_LINE or (final and src.buf):
                    line, src.buf = src.buf[:MAX_LINE], src.buf[MAX_LINE:]
                else:
                    break
            else:
                line, src.buf = src.buf[:nl], src.buf[nl + 1:]
            src.sink.write(line + b"\n")
            text = line.decode(errors="replace").rstrip("\r")
            self._tails.setdefault(src.rank, deque(maxlen=TAIL_LINES)).append(text)
            if src.is_err:
                self._err_tails.setdefault(src.rank, deque(maxlen=TAIL_LINES)).append(text)
            self.console.line(src.rank, text, src.is_err)

    def _read(self, poller: select.poll, src: _Source, until_empty: bool) -> None:
        while True:
            try:
                data = os.read(src.fd, 65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    return
                data = b""
            if not data:
                self._close(poller, src)
                return
            self._lines(src, data)
            if not until_empty and len(data) < 65536:
                return

    def _close(self, poller: select.poll, src: _Source) -> None:
        self._lines(src, b"", final=True)
        try:
            poller.unregister(src.fd)
        except (KeyError, ValueError):
            pass
        os.close(src.fd)
        self._sources.pop(src.fd, None)

    def _main(self) -> None:
        poller = select.poll()
        try:
            while True:
                with self._lock:
                    # Together: a flush() must also cover pipes opened just before it.
                    new, self._new = self._new, []
                    waiters, self._flush_waiters = self._flush_waiters, []
                for src in new:
                    self._sources[src.fd] = src
                    poller.register(src.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
                if waiters:
                    for src in list(self._sources.values()):
                        self._read(poller, src, until_empty=True)
                    for f in self._files.values():
                        f.flush()
                    for w in waiters:
                        w.set()
                stopping = self._stop.is_set()
                for fd, _ev in poller.poll(0 if stopping else self.poll_ms):
                    ready = self._sources.get(fd)
                    if ready is not None:
                        self._read(poller, ready, until_empty=False)
                if stopping:
                    for src in list(self._sources.values()):
                        self._read(poller, src, until_empty=True)
                        if src.fd in self._sources:
                            self._lines(src, b"", final=True)
                    break
                for f in self._files.values():
                    f.flush()
                self.console.tick()
                self.console.flush()
        except Exception as e:  # never take the agent down over console output
            print(f"aitrain: rank log streaming failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            for src in list(self._sources.values()):
                try:
                    os.close(src.fd)
                except OSError:
                    pass
            self._sources.clear()
            for f in self._files.values():
                f.close()
            self.console.close()
            if self.pipe_dir is not None:
                shutil.rmtree(self.pipe_dir, ignore_errors=True)

    def tail(self, rank: int) -> list[str]:
        """The rank's last lines (both streams, in the order they came)."""
        return list(self._tails.get(rank, ()))

    def err_tail(self, rank: int) -> list[str]:
        """The rank's last lines on stderr."""
        return list(self._err_tails.get(rank, ()))

    def flush(self, timeout: float = 2.0) -> None:
        """Wait until what the ranks wrote so far is in their log files."""
        if not self._thread.is_alive() or threading.current_thread() is self._thread:
            return
        done = threading.Event()
        with self._lock:
            self._flush_waiters.append(done)
        done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Drain what the ranks wrote (they have exited) and close every file."""
        self._stop.set()
        self._thread.join(timeout)
        if self in RankStreams.active:
            RankStreams.active.remove(self)


def flush_all(timeout: float = 2.0) -> None:
    """Every rank log of this process up to date (before reading one back, e.g. for an error)."""
    for streams in list(RankStreams.active):
        streams.flush(timeout)


def rank_logs_specs(streams: RankStreams, on_spawn: Any = None) -> Any:
    """Elastic's log destinations: each rank's stdout/stderr into :class:`RankStreams` pipes.

    Also gives every rank ``AITRAIN_SPAWN_TIME`` (for phase timings) and an error file
    ``<log_dir>/rank<N>.error.json`` (what ``@record`` writes on an uncaught exception).
    ``on_spawn(time)`` is called when the agent is about to start the ranks.
    """
    from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs

    class RankLogsSpecs(LogsSpecs):
        @property
        def root_log_dir(self) -> str:
            return str(streams.log_dir)

        def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
            now = time.time()
            stdouts, stderrs, error_files = {}, {}, {}
            for local_rank, env in envs.items():
                rank = int(env.get("RANK", local_rank))
                attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
                stdouts[local_rank], stderrs[local_rank] = streams.open_rank(rank, attempt)
                error_file = streams.log_dir / f"rank{rank}.error.json"
                if error_file.exists():
                    error_file.unlink()
                error_files[local_rank] = str(error_file)
                env["TORCHELASTIC_ERROR_FILE"] = str(error_file)
                env["AITRAIN_SPAWN_TIME"] = f"{now:.6f}"
            if on_spawn is not None:
                on_spawn(now)
            return LogsDest(stdouts, stderrs, {}, {}, error_files, "", "")

    return RankLogsSpecs(log_dir=str(streams.log_dir))
