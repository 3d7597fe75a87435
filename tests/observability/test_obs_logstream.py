"""Rank output: one file per rank, deduplicated and filtered console lines."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from aitrain.launcher.node.logstream import Console, RankStreams, compact_ranks, parse_ranks


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
