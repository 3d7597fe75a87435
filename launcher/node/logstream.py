"""Rank output on one node: one log file per rank, and a deduplicated, filtered console.

torch's elastic agent is told (through :class:`RankLogsSpecs`) to connect each rank's
stdout and stderr to a named pipe that this module reads as the bytes arrive. Every byte
goes to ``<log_dir>/rank<N>.log`` (both streams, in arrival order); lines of the ranks
selected by ``log.ranks`` go to the console with a ``[rankN]:`` prefix (stderr lines to
stderr).

Progress bars (``\\r`` updates, as tqdm writes them) reach the console as they come, with
the rank prefix: on a terminal as one line redrawn in place (one rank's bar at a time: a
line flickering between ranks' bars is unreadable), elsewhere (a pipe, a CI log) as one
line per update, at most one a second per rank and stream, so a 10 Hz bar does not flood
the log. When the bar's newline comes its last state stays as an ordinary line. The
rank's log file gets every update, byte for byte.

With ``log.dedup=true`` a line that several ranks print within ``DEDUP_WINDOW_S`` is shown
once, and then once more as ``[rank1-7]:<line> [repeated 7x]`` for the copies that were
held back (as Ray does). A held-back rank's later lines wait behind that summary, so a
rank's own lines keep their order; no line waits longer than the window.
"""

from __future__ import annotations

import errno
import math
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

from aitrain.launcher.util import describe_os_error

# How long the copies of a line are collected before their "[repeated Nx]" summary is
# printed; also the most any line (and the lines of that rank after it) is held back.
DEDUP_WINDOW_S = 0.4
# Progress updates (\r) shown per rank and stream: on a terminal (redrawn in place) and
# elsewhere (one line each). The last state is always shown, at most this late.
PROGRESS_INTERVAL_TTY_S = 0.05
PROGRESS_INTERVAL_S = 1.0
TAIL_LINES = 30  # kept per rank for the failure message
MAX_LINE = 64 * 1024  # a line without newline is cut here (binary junk, a line that never ends)

_CLEAR_EOL = "\x1b[K"


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


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


@dataclass
class _Group:
    """A line shown by ``first`` at ``t0``; the copies of other ranks (``held``) wait for its summary."""

    key: tuple[bool, str]
    t0: float
    first: int
    held: list[int] = field(default_factory=list)


# One output of a rank that waits behind a summary: (is progress, is stderr, text, arrival time).
_Waiting = tuple[bool, bool, str, float]
_Src = tuple[int, bool]  # (rank, is stderr)


class Console:
    """Rank lines to the terminal: filter by rank, collapse identical lines of several ranks,
    show ``\\r`` progress as it comes.

    Order: a rank's lines are printed in the order it wrote them. A copy of a line another
    rank printed just before is held back to be counted in one ``[repeated Nx]`` summary;
    the rank's later lines wait behind it. Every hold ends ``window_s`` after the held line
    came: :meth:`tick` prints what is due, :meth:`next_deadline` says when to call it.
    """

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, *, ranks: set[int] | None = None,
                 dedup: bool = True, window_s: float = DEDUP_WINDOW_S, clock: Any = time.monotonic,
                 progress_interval_s: float | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.ranks = ranks
        self.dedup = dedup
        self.window_s = window_s
        self.clock = clock
        self._tty = {False: _isatty(self.out), True: _isatty(self.err)}
        self._interval = {is_err: progress_interval_s if progress_interval_s is not None else
                          (PROGRESS_INTERVAL_TTY_S if tty else PROGRESS_INTERVAL_S)
                          for is_err, tty in self._tty.items()}
        # Lines shown within the window, oldest first (a dict keeps insertion order).
        self._recent: dict[tuple[bool, str], _Group] = {}
        self._blocked: dict[int, tuple[_Group, float]] = {}  # rank -> the group it waits in, until when
        self._waiting: dict[int, deque[_Waiting]] = {}  # rank -> what it wrote after its held line
        self._due = float("inf")  # the earliest deadline in _blocked
        self._progress_at: dict[_Src, float] = {}  # when a source's progress was last shown
        self._progress_shown: dict[_Src, str] = {}  # not a terminal: the state printed last
        self._progress_due: dict[_Src, str] = {}  # a newer state, shown when the interval is over
        self._live: tuple[_Src, str] | None = None  # the progress line drawn in place on a terminal
        self._live_at = 0.0

    # -- writing ---------------------------------------------------------------------

    def _stream(self, is_err: bool) -> TextIO:
        return self.err if is_err else self.out

    def _emit(self, is_err: bool, prefix: str, text: str) -> None:
        self._write(is_err, f"[rank{prefix}]:{text}\n")

    def _write(self, is_err: bool, text: str) -> None:
        live = self._live
        if live is None or not self._tty[is_err]:
            self._stream(is_err).write(text)
            return
        # A progress line is drawn on the terminal: the line goes above it, the bar stays last.
        (src, drawn), stream = live, self._stream(is_err)
        bar = self._stream(src[1])
        bar.write("\r" + _CLEAR_EOL)
        bar.flush()
        stream.write(text)
        stream.flush()
        bar.write(drawn)
        bar.flush()

    def _end_live(self, keep: bool) -> None:
        """The in-place progress line is over: keep its last state as a line, or wipe it."""
        if self._live is None:
            return
        (src, _drawn), self._live = self._live, None
        bar = self._stream(src[1])
        bar.write("\n" if keep else "\r" + _CLEAR_EOL)
        bar.flush()

    def _draw_progress(self, src: _Src, text: str, now: float) -> None:
        rank, is_err = src
        self._progress_at[src] = now
        self._progress_due.pop(src, None)
        if not self._tty[is_err]:
            self._progress_shown[src] = text
            self._emit(is_err, str(rank), text)
            return
        if self._live is not None and self._live[0] != src:
            if now - self._live_at < PROGRESS_INTERVAL_S:
                return  # one bar at a time: another rank's is being drawn (its file has this one)
            self._end_live(keep=True)  # that bar stalled: its last state stays above
        drawn = f"[rank{rank}]:{text}"
        width = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be redrawn with \r
        if len(drawn) > width > 0:
            drawn = drawn[:width]
        drawn = "\r" + drawn + _CLEAR_EOL
        self._live, self._live_at = (src, drawn), now
        stream = self._stream(is_err)
        stream.write(drawn)
        stream.flush()

    # -- what the reader calls ---------------------------------------------------------

    def _admit(self, rank: int) -> float | None:
        """The time now, with what is due printed first; None for a rank not shown."""
        if self.ranks is not None and rank not in self.ranks:
            return None
        now = self.clock()
        if now >= self._due:
            self._expire(now)
        return now

    def line(self, rank: int, text: str, is_err: bool = False) -> None:
        """A complete line of a rank (also the last state of a progress line, at its newline)."""
        now = self._admit(rank)
        if now is None:
            return
        waiting = self._waiting.get(rank)
        if waiting is not None:
            waiting.append((False, is_err, text, now))
            return
        self._line(rank, is_err, text, now, now)

    def progress(self, rank: int, text: str, is_err: bool = False) -> None:
        """The current state of a rank's line that is being rewritten with ``\\r``."""
        now = self._admit(rank)
        if now is None:
            return
        waiting = self._waiting.get(rank)
        if waiting is not None:  # behind a held line: only the newest state matters
            if waiting and waiting[-1][0] and waiting[-1][1] == is_err:
                waiting[-1] = (True, is_err, text, waiting[-1][3])
            else:
                waiting.append((True, is_err, text, now))
            return
        self._progress(rank, is_err, text, now)

    def _progress(self, rank: int, is_err: bool, text: str, now: float) -> None:
        src = (rank, is_err)
        if now - self._progress_at.get(src, -1e18) < self._interval[is_err]:
            self._progress_due[src] = text
        else:
            self._draw_progress(src, text, now)

    def _line(self, rank: int, is_err: bool, text: str, now: float, came: float) -> None:
        src = (rank, is_err)
        if self._progress_at:  # this source's progress line (if any) ends here
            self._progress_at.pop(src, None)
            self._progress_due.pop(src, None)
            if self._live is not None and self._live[0] == src:
                self._end_live(keep=False)  # the line below replaces the bar
            elif self._progress_shown.pop(src, None) == text:
                return  # its last state is already on its own line
        own = f"[rank{rank}]:"
        # torch prefixes a rank's traceback itself: one prefix is enough on the console. Such
        # lines differ from rank to rank, so they are never folded together.
        shown = text[len(own):] if text.startswith(own) else text
        if not self.dedup:
            self._emit(is_err, str(rank), shown)
            return
        key = (is_err, text)
        g = self._recent.get(key)
        if g is not None and (rank == g.first or came - g.t0 > self.window_s):
            self._close(g, now)  # the same rank says it again, or the window is over: a new occurrence
            g = None
        if g is None:
            self._emit(is_err, str(rank), shown)
            self._recent[key] = _Group(key, now, rank)
            return
        g.held.append(rank)  # a copy: counted in the summary; the rank's next lines wait for it
        due = min(g.t0, came) + self.window_s
        self._blocked[rank] = (g, due)
        self._waiting.setdefault(rank, deque())
        self._due = min(self._due, due)

    def _close(self, g: _Group, now: float) -> None:
        """Print the group's summary; its ranks go on with what they wrote after their copy."""
        if self._recent.get(g.key) is g:
            del self._recent[g.key]
        if not g.held:
            return
        held, g.held = g.held, []
        self._emit(g.key[0], compact_ranks(held), f"{g.key[1]} [repeated {len(held)}x]")
        for rank in held:
            del self._blocked[rank]
        self._due = min((due for _g, due in self._blocked.values()), default=float("inf"))
        for rank in held:
            self._resume(rank, now)

    def _resume(self, rank: int, now: float) -> None:
        waiting = self._waiting.get(rank)
        while waiting and rank not in self._blocked:
            is_progress, is_err, text, came = waiting.popleft()
            if is_progress:
                self._progress(rank, is_err, text, now)
            else:
                self._line(rank, is_err, text, now, came)
        if rank not in self._blocked:
            self._waiting.pop(rank, None)

    def _expire(self, now: float) -> None:
        while self._blocked:
            g, due = min(self._blocked.values(), key=lambda b: b[1])
            if due > now:
                break
            self._close(g, now)
        self._due = min((due for _g, due in self._blocked.values()), default=float("inf"))

    def tick(self) -> None:
        """Print what is due: summaries whose window is over, progress states held by the interval."""
        now = self.clock()
        if now >= self._due:
            self._expire(now)
        for src, text in list(self._progress_due.items()):
            if now - self._progress_at.get(src, -1e18) >= self._interval[src[1]]:
                self._draw_progress(src, text, now)
        # Forget lines whose window is over (the oldest are first), but not those that a line
        # still waiting behind a held one (it came at or after its rank's hold began) may copy.
        horizon = min((due - self.window_s for _g, due in self._blocked.values()), default=now)
        for g in list(self._recent.values()):
            if horizon - g.t0 <= self.window_s:
                break
            self._close(g, now)

    def next_deadline(self) -> float:
        """When :meth:`tick` has something to print next (the clock's time; inf: nothing)."""
        due = self._due
        for src in self._progress_due:
            due = min(due, self._progress_at.get(src, 0.0) + self._interval[src[1]])
        return due

    def close(self) -> None:
        while self._blocked:
            self._close(min(self._blocked.values(), key=lambda b: b[1])[0], self.clock())
        for g in list(self._recent.values()):
            self._close(g, self.clock())
        self._progress_due.clear()
        self._end_live(keep=True)
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
    buf: bytes = b""  # the line being written (after its last \r)
    state: str | None = None  # the line's progress state shown last (None: no \r in this line)


def _last_segment(line: bytes) -> bytes:
    """The last part of ``a\\rb\\r`` that is not blank, rstripped: what a terminal shows of it."""
    for seg in reversed(line.split(b"\r")):
        if seg.strip():
            return seg.rstrip()
    return b""


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


class _LogSink:
    """A rank's log file that survives a storage fault (ENOSPC, EIO, ...): the output still
    reaches the console, and the fault is said once, with the path and the errno."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failed: OSError | None = None
        self._f: Any = None
        try:
            self._f = open(path, "ab")
        except OSError as e:
            self._fail(e)

    def _fail(self, e: OSError) -> None:
        if self.failed is None:
            self.failed = e
            print(f"aitrain: {describe_os_error(e, self.path)}; the rank's output still reaches the console, "
                  "but its log file is incomplete", file=sys.stderr, flush=True)

    def write(self, data: bytes) -> None:
        if self._f is None or self.failed is not None:
            return
        try:
            self._f.write(data)
        except OSError as e:
            self._fail(e)

    def flush(self) -> None:
        if self._f is not None and self.failed is None:
            try:
                self._f.flush()
            except OSError as e:
                self._fail(e)

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError as e:
                self._fail(e)
            self._f = None


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
                f = self._files[rank] = _LogSink(self.rank_log(rank))
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
        buf = src.buf + data if src.buf else data
        end = buf.rfind(b"\n") + 1
        if end:
            src.sink.write(buf[:end])
            for raw in buf[:end - 1].split(b"\n"):
                self._line(src, raw)
            buf = buf[end:]
        cr = buf.rfind(b"\r") + 1
        if cr:  # a progress line: its updates up to the last \r are done with
            src.sink.write(buf[:cr])
            state = buf[cr:] if buf[cr:].strip() else _last_segment(buf[:cr - 1])
            buf = buf[cr:]
            self._progress(src, state)
        elif src.state is not None and data and buf.strip():  # an update that came in two reads
            self._progress(src, buf)
        while len(buf) >= MAX_LINE:
            src.sink.write(buf[:MAX_LINE] + b"\n")
            self._line(src, buf[:MAX_LINE])
            buf = buf[MAX_LINE:]
        if final and (buf or src.state is not None):
            src.sink.write(buf + b"\n")
            self._line(src, buf)
            buf = b""
        src.buf = buf

    def _progress(self, src: _Source, state: bytes) -> None:
        text = state.decode(errors="replace").rstrip()
        if text != src.state:
            src.state = text
            if text:
                self.console.progress(src.rank, text, src.is_err)

    def _line(self, src: _Source, raw: bytes) -> None:
        if src.state is not None or b"\r" in raw:
            # The end of a progress line (or a CRLF line): the console shows its last state.
            last = _last_segment(raw)
            text = last.decode(errors="replace") if last else (src.state or "")
            src.state = None
        else:
            text = raw.decode(errors="replace")
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
                # Wake up for the console's next due output (a held line's summary, a progress state).
                due_ms = (self.console.next_deadline() - self.console.clock()) * 1000
                wait_ms = 0 if stopping else max(0, math.ceil(min(float(self.poll_ms), due_ms)))
                for fd, _ev in poller.poll(wait_ms):
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
