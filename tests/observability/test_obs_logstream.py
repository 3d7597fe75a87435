"""Rank output: one file per rank, deduplicated and filtered console lines, progress bars."""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from aitrain.launcher.node.logstream import DEDUP_WINDOW_S, Console, RankStreams, compact_ranks, parse_ranks

from aitrain_testing import REPO, aitrain_argv, wait_until


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def console(**kw: object) -> tuple[Console, io.StringIO, io.StringIO, Clock]:
    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    return Console(out, err, clock=clock, **kw), out, err, clock  # type: ignore[arg-type]


def test_parse_and_compact_ranks() -> None:
    assert parse_ranks("all") is None and parse_ranks(None) is None
    assert parse_ranks("0") == {0} and parse_ranks(0) == {0}
    assert parse_ranks("0,3") == {0, 3} and parse_ranks("'0,3'") == {0, 3}
    assert parse_ranks("0-2,5") == {0, 1, 2, 5}
    with pytest.raises(ValueError, match="log.ranks"):
        parse_ranks("zero")
    assert compact_ranks([5, 0, 1, 2]) == "0-2,5"
    assert compact_ranks({3}) == "3"


def test_identical_lines_of_many_ranks_collapse() -> None:
    c, out, _, clock = console(window_s=5.0)
    for rank in range(8):
        c.line(rank, "loading dataset")
    c.line(0, "step 1")
    assert out.getvalue() == "[rank0]:loading dataset\n[rank0]:step 1\n"
    clock.t = 6.0
    c.tick()
    assert out.getvalue().splitlines()[-1] == "[rank1-7]:loading dataset [repeated 7x]"


def test_same_rank_repeating_is_not_a_duplicate_and_windows_end() -> None:
    c, out, _, clock = console(window_s=5.0)
    c.line(0, "tick")
    c.line(0, "tick")  # the same rank again: a new occurrence, shown
    clock.t = 10.0
    c.line(1, "tick")  # after the window: shown
    c.close()
    assert out.getvalue().splitlines() == ["[rank0]:tick", "[rank0]:tick", "[rank1]:tick"]


def test_stderr_lines_go_to_stderr_and_close_flushes_summaries() -> None:
    c, out, err, _ = console()
    c.line(0, "warning: x", is_err=True)
    c.line(1, "warning: x", is_err=True)
    c.line(1, "warning: x")  # stdout is its own stream
    c.close()
    assert err.getvalue().splitlines() == ["[rank0]:warning: x", "[rank1]:warning: x [repeated 1x]"]
    assert out.getvalue().splitlines() == ["[rank1]:warning: x"]


def test_rank_filter_and_no_dedup() -> None:
    c, out, _, _ = console(ranks={0, 3}, dedup=False)
    for rank in range(4):
        c.line(rank, "hello")
    assert out.getvalue().splitlines() == ["[rank0]:hello", "[rank3]:hello"]


def test_rank_streams_keep_every_line_of_every_rank(tmp_path: Path) -> None:
    out = io.StringIO()
    streams = RankStreams(tmp_path / "logs", Console(out, out, ranks={0}))
    fifos = {rank: streams.open_rank(rank) for rank in (0, 1)}
    writers = {rank: (open(o, "w"), open(e, "w")) for rank, (o, e) in fifos.items()}
    for rank, (o, e) in writers.items():
        o.write(f"out of {rank}\nsame\n")
        e.write(f"err of {rank}\n")
        o.write("no newline at the end")
        o.flush()
        e.flush()
    streams.flush()
    assert (tmp_path / "logs" / "rank1.log").read_text().count("\n") >= 3  # written while the rank runs
    for o, e in writers.values():
        o.close()
        e.close()
    streams.stop()
    for rank in (0, 1):
        lines = (tmp_path / "logs" / f"rank{rank}.log").read_text().splitlines()
        assert sorted(lines) == sorted([f"out of {rank}", "same", f"err of {rank}", "no newline at the end"])
    console_lines = out.getvalue().splitlines()
    assert "[rank0]:out of 0" in console_lines and "[rank0]:err of 0" in console_lines
    assert not any(line.startswith("[rank1") for line in console_lines)
    assert not os.path.exists(streams.pipe_dir)


def test_an_agent_stopped_before_spawning_ranks_leaves_no_pipe_dir(tmp_path: Path) -> None:
    out = io.StringIO()
    streams = RankStreams(tmp_path / "logs", Console(out, out))
    streams.stop()
    assert streams.pipe_dir is None


def test_fifo_dirs_of_killed_agents_are_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"aitrain-ranks-{dead}-abc"
    stale.mkdir()
    os.mkfifo(stale / "a0-rank0.out")
    alive = tmp_path / f"aitrain-ranks-{os.getpid()}-def"  # another agent of this process: still running
    alive.mkdir()
    streams = RankStreams(tmp_path / "logs", Console(io.StringIO(), io.StringIO()))
    streams.open_rank(0)
    assert streams.pipe_dir is not None and streams.pipe_dir.parent == tmp_path
    assert not stale.exists() and alive.exists()
    streams.stop()
    assert not streams.pipe_dir.exists()


# -- order and hold time of folded lines ----------------------------------------------------


def test_a_rank_lines_never_overtake_its_folded_line() -> None:
    # Read pipe after pipe: every rank's A and B come together, and the copies of A are folded.
    c, out, _, clock = console(window_s=0.4)
    for rank in range(4):
        clock.t = rank * 0.01
        c.line(rank, "A")
        c.line(rank, "B")
    assert out.getvalue().splitlines() == ["[rank0]:A", "[rank0]:B"]  # ranks 1-3 wait behind their A
    clock.t = 0.4  # the window of the first A is over: no line waited longer than that
    c.tick()
    clock.t = 0.41
    c.tick()
    assert out.getvalue().splitlines() == ["[rank0]:A", "[rank0]:B", "[rank1-3]:A [repeated 3x]",
                                           "[rank1-3]:B [repeated 3x]"]
    assert c.next_deadline() == float("inf")


def test_a_rank_repeating_a_line_keeps_its_order() -> None:
    c, out, _, clock = console(window_s=0.4)
    for text in ("A", "A", "A", "B"):
        c.line(0, text)
        clock.t += 0.01
    assert out.getvalue().splitlines() == ["[rank0]:A", "[rank0]:A", "[rank0]:A", "[rank0]:B"]


def test_no_line_is_held_longer_than_the_window_even_behind_another_hold() -> None:
    c, out, _, clock = console(window_s=0.4)
    c.line(0, "A")
    c.line(1, "A")  # held until 0.4
    clock.t = 0.3
    c.line(1, "B")  # waits behind A; came at 0.3
    clock.t = 0.35
    c.line(0, "B")
    assert c.next_deadline() == pytest.approx(0.4)
    clock.t = 0.4
    c.tick()  # A's summary, then rank 1's B: a copy of rank 0's, held to at most 0.3 + 0.4
    assert out.getvalue().splitlines()[-1] == "[rank1]:A [repeated 1x]"
    assert c.next_deadline() <= 0.3 + 0.4
    clock.t = c.next_deadline()
    c.tick()
    assert out.getvalue().splitlines()[-1] == "[rank1]:B [repeated 1x]"
    assert DEDUP_WINDOW_S <= 0.5


class Stamped(io.StringIO):
    """A console stream that remembers when each piece of text arrived."""

    def __init__(self, tty: bool = False) -> None:
        super().__init__()
        self.tty = tty
        self.writes: list[tuple[float, str]] = []

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.writes.append((time.monotonic(), s))
        return super().write(s)

    def first(self, needle: str) -> float:
        return next(t for t, s in self.writes if needle in s)


def test_a_folded_line_and_what_follows_reach_the_console_within_half_a_second(tmp_path: Path) -> None:
    out = Stamped()
    streams = RankStreams(tmp_path / "logs", Console(out, out))
    fifos = {rank: streams.open_rank(rank) for rank in (0, 1)}
    writers = {rank: open(o, "w") for rank, (o, _e) in fifos.items()}
    try:
        for rank in (0, 1):
            writers[rank].write(f"rank {rank} up\n")
            writers[rank].flush()
        wait_until(lambda: "[rank1]:rank 1 up" in out.getvalue(), 5, "the first lines")
        for rank in (0, 1):
            writers[rank].write("loading dataset\n")
            writers[rank].flush()
        written = time.monotonic()
        writers[1].write("rank 1 goes on\n")
        writers[1].flush()
        wait_until(lambda: "[rank1]:rank 1 goes on" in out.getvalue(), 2, "rank 1's second line", poll=0.02)
        summary, after = out.first("[rank1]:loading dataset [repeated 1x]"), out.first("[rank1]:rank 1 goes on")
        assert summary <= after  # the rank's lines in the order it wrote them
        assert after - written <= 0.5, after - written
    finally:
        for w in writers.values():
            w.close()
        streams.stop()
    assert (tmp_path / "logs" / "rank1.log").read_text() == "rank 1 up\nloading dataset\nrank 1 goes on\n"


# -- progress bars (\r) ---------------------------------------------------------------------


def test_progress_bar_updates_reach_a_terminal_as_they_come(tmp_path: Path) -> None:
    err = Stamped(tty=True)
    streams = RankStreams(tmp_path / "logs", Console(io.StringIO(), err))
    _o, e = streams.open_rank(0)
    sent: list[float] = []
    with open(e, "w") as w:
        for i in range(1, 31):  # as tqdm draws: "\r" + the state, flushed
            sent.append(time.monotonic())
            w.write(f"\r{i}/30 steps")
            w.flush()
            time.sleep(0.05)
        w.write("\n")
    streams.stop()
    # Each update is drawn in place while the bar runs (not at its newline), the newest as it comes.
    drawn = [(t, int(s.split(":", 1)[1].split("/")[0])) for t, s in err.writes if s.endswith(" steps\x1b[K")]
    assert len(drawn) >= 20 and drawn[-1][0] - drawn[0][0] > 1.0
    assert drawn[0][0] - sent[0] < 0.3
    assert max(t - sent[i - 1] for t, i in drawn) < 0.3
    screen = err.getvalue()
    assert screen.endswith("[rank0]:30/30 steps\n")  # its last state stays as a line
    log = (tmp_path / "logs" / "rank0.log").read_bytes()
    assert log == "".join(f"\r{i}/30 steps" for i in range(1, 31)).encode() + b"\n"  # the file has every update


def test_every_kind_of_carriage_return_line_ends_as_what_a_terminal_would_show(tmp_path: Path) -> None:
    out = io.StringIO()
    streams = RankStreams(tmp_path / "logs", Console(out, out, progress_interval_s=0))
    o, _e = streams.open_rank(0)
    chunks = ["a crlf line\r\n", "0%\r", "50%\r", "100%\r", "\n", "loading", "... done\n",  # print(end="\r")
              "\r  5%|#", "##|", "\r 10%|####|", "\n",  # tqdm, one update split over two reads
              "x\ry\rz\n", "stuck at\r", "end 1"]  # a rank that ends without a newline
    with open(o, "w") as w:
        for chunk in chunks:
            w.write(chunk)
            w.flush()
            time.sleep(0.02)
    streams.stop()
    assert (tmp_path / "logs" / "rank0.log").read_bytes() == "".join(chunks).encode() + b"\n"
    final = ["a crlf line", "100%", "loading... done", " 10%|####|", "z", "end 1"]
    assert streams.tail(0) == final
    shown = out.getvalue().splitlines()
    assert [line for line in shown if line[len("[rank0]:"):] in final] == [f"[rank0]:{t}" for t in final]
    assert all(line.startswith("[rank0]:") and "\r" not in line for line in shown)


def test_progress_in_a_log_is_one_line_a_second_and_its_last_state() -> None:
    c, out, _, clock = console()  # a StringIO: not a terminal
    for i in range(1, 31):
        c.progress(0, f"{i}/30")
        clock.t += 0.1
        c.tick()
    c.line(0, "30/30")  # the newline: the last state, shown once
    c.line(0, "done")
    assert out.getvalue().splitlines() == ["[rank0]:1/30", "[rank0]:11/30", "[rank0]:21/30", "[rank0]:30/30",
                                           "[rank0]:done"]


def test_a_terminal_shows_one_bar_and_other_lines_above_it() -> None:
    out = Stamped(tty=True)
    c, clock = Console(out, out, clock=(clk := Clock())), clk
    c.progress(0, "1/3")
    clock.t = 0.1
    c.progress(1, "1/3")  # rank 0's bar is live: rank 1's is in its log file only
    c.line(2, "a message")
    clock.t = 0.2
    c.progress(0, "2/3")
    c.line(0, "3/3")  # the bar's newline: its last state replaces it
    c.close()
    assert out.getvalue() == ("\r[rank0]:1/3\x1b[K"
                              "\r\x1b[K" "[rank2]:a message\n" "\r[rank0]:1/3\x1b[K"
                              "\r[rank0]:2/3\x1b[K"
                              "\r\x1b[K" "[rank0]:3/3\n")
    # On the screen: the message, then the bar's last state.
    assert [line.rsplit("\r", 1)[-1].replace("\x1b[K", "") for line in out.getvalue().split("\n")] == \
        ["[rank2]:a message", "[rank0]:3/3", ""]


def test_progress_bar_of_a_launched_rank_reaches_the_console_before_it_ends(tmp_path: Path) -> None:
    script = REPO / "tests" / "scripts" / "progress_bar_job.py"
    proc = subprocess.Popen(aitrain_argv() + ["launch", f"script={script}", "tracking.enabled=false", "fabric=off",
                                              "nproc_per_node=1"],
                            cwd=tmp_path, env={**os.environ, "UPDATES": "15", "UPDATE_SLEEP": "0.1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: err.extend((time.monotonic(), line) for line in proc.stderr or ()))
    reader.start()
    out = proc.stdout.read() if proc.stdout else ""
    proc.wait(timeout=120)
    reader.join()
    assert proc.returncode == 0, out + "".join(line for _, line in err)
    bars = [(t, line.strip()) for t, line in err if line.startswith("[rank0]:training:")]
    # Not a terminal: a line a second while the bar runs (1.5 s), then its last state.
    assert len(bars) >= 3 and bars[-1][1] == "[rank0]:training: 15/15 steps", bars
    assert bars[-1][0] - bars[0][0] > 1.2
    assert "[rank0]:rank 0 done" in out.splitlines()
