"""Failures as data: how each rank ended, ordered root cause first the same way for every backend."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pytest

from aitrain.launcher.agent import rank_exits, storage_hint
from aitrain.launcher.failures import (
    NodeResult,
    RankExit,
    describe,
    error_line,
    exit_code_of,
    failures,
    root_cause_first,
)
from aitrain.launcher.tracking import storage_fault
from aitrain.launcher.util import STORAGE_ERRNOS


def test_the_rank_that_failed_first_comes_first() -> None:
    peer = RankExit(0, node="n1", exit_code=1, ended_at=10.4, error="RuntimeError: Connection closed by peer")
    root = RankExit(1, node="n2", exit_code=1, ended_at=10.1, error="ValueError: bad batch")
    stopped = RankExit(2, node="n1", signal="SIGTERM", stopped=True, ended_at=10.2)
    unknown = RankExit(3, node="n2", exit_code=1)
    ok = RankExit(4, node="n2", exit_code=0)
    assert [e.rank for e in root_cause_first([stopped, peer, unknown, root, ok])] == [1, 0, 3, 4, 2]
    assert [e.rank for e in failures([stopped, peer, unknown, root, ok])] == [1, 0, 3, 2]


def test_the_message_names_the_root_cause_then_the_others_then_its_last_lines() -> None:
    exits = [RankExit(0, signal="SIGTERM", stopped=True, pid=11),
             RankExit(1, exit_code=3, pid=12, error="ValueError: x", tail=("Traceback (most recent call last):",
                                                                         "ValueError: x"))]
    text = describe(exits)
    assert text.splitlines()[0] == "the job failed: rank 1 (pid 12) exited with code 3: ValueError: x"
    assert text.splitlines()[1] == "also: rank 0 (pid 11) was stopped (SIGTERM) after the failure"
    assert text.splitlines()[-2:] == ["  Traceback (most recent call last):", "  ValueError: x"]
    assert exit_code_of(exits) == 3
    assert exit_code_of([RankExit(0, signal="SIGKILL")]) == 137
    lost = RankExit(1, node="node0", lost="lost its Ray worker (ActorDiedError)")
    assert describe([lost], attempts=2).startswith("the job failed (after 2 attempts): rank 1 on node0 lost its")


def test_error_line_is_the_exception_without_torchs_rank_prefix() -> None:
    assert error_line(["x", "[rank1]: RuntimeError: boom", "  "]) == "RuntimeError: boom"
    assert error_line([]) == ""


def test_node_results_round_trip() -> None:
    res = NodeResult(False, 1, "m", "h", "n2", [RankExit(3, node="n2", exit_code=1, tail=("a",))], interrupted=False)
    back = NodeResult.from_dict(res.to_dict())
    assert back == res and back.ranks[0].tail == ("a",)


class FakeServices:
    """What the agent's services know: each rank's end time and its last lines."""

    def __init__(self, ended: dict[int, float], lines: dict[int, list[str]]) -> None:
        self.ended, self.lines = ended, lines

    def ended_at(self, rank: int) -> float | None:
        return self.ended.get(rank)

    def tail(self, rank: int) -> list[str]:
        return self.lines.get(rank, [])

    def err_tail(self, rank: int) -> list[str]:
        return self.lines.get(rank, [])


def failure(exitcode: int, pid: int, timestamp: int = 100, data: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(exitcode=exitcode, pid=pid, timestamp=timestamp, error_file_data=data or {})


def test_agent_marks_the_ranks_it_stopped_and_orders_by_when_they_ended() -> None:
    # torch reports both ranks with the same whole-second timestamp: rank 1 raised first, the
    # agent then stopped rank 0 with SIGTERM.
    services = FakeServices({0: 100.31, 1: 100.12}, {1: ["Traceback (most recent call last):",
                                                         "RuntimeError: deliberate failure on rank 1"]})
    exits = rank_exits({0: failure(-15, 10), 1: failure(1, 11)}, range(2), services)
    assert [(e.rank, e.failed, e.stopped) for e in exits] == [(1, True, False), (0, False, True)]
    assert exits[0].error == "RuntimeError: deliberate failure on rank 1" and exits[0].pid == 11
    # A rank torch did not report at all was stopped by the agent.
    exits = rank_exits({1: failure(1, 11)}, range(2), services)
    assert [(e.rank, e.stopped) for e in exits] == [(1, False), (0, True)]


def test_agent_takes_the_error_from_the_ranks_error_file() -> None:
    data = {"message": {"message": "ValueError: from @record", "extraInfo": {"py_callstack": "Traceback\nValueError"}}}
    exits = rank_exits({4: failure(1, 9, data=data)}, [4], FakeServices({}, {}), node="node2")
    assert exits[0].error == "ValueError: from @record" and exits[0].tail == ("Traceback", "ValueError")
    assert exits[0].node == "node2" and exits[0].ended_at == 100.0  # torch's timestamp when nothing better


def test_an_oom_killed_rank_is_the_root_cause_not_a_stopped_one() -> None:
    services = FakeServices({0: 5.0, 1: 5.2}, {})
    exits = rank_exits({0: failure(-9, 1), 1: failure(1, 2)}, range(2), services, "", {0}, "cgroup memory limit 1G")
    assert exits[0].rank == 0 and exits[0].oom and "OOM killer" in exits[0].summary()


@pytest.mark.parametrize(("code", "hint"), [
    (errno.ENOSPC, "the disk is full: free space there (df -h /ckpt/step5)"),
    (errno.EDQUOT, "the disk quota is used up"),
    (errno.EIO, "the storage failed (EIO): check the filesystem (/ckpt/step5)"),
    (errno.EROFS, "the filesystem is read-only"),
    (errno.EACCES, "permission denied: check the path's owner and mode (ls -ld /ckpt/step5)"),
])
def test_a_rank_that_failed_on_storage_gets_a_hint_for_its_errno(code: int, hint: str) -> None:
    line = f"OSError: [Errno {code}] {os.strerror(code)}: '/ckpt/step5'"
    assert storage_hint([RankExit(1, exit_code=1, error=line)]).startswith(hint)
    # the launch's tracking takes the same errnos as a disk fault (its metrics spooled for a later sync)
    try:
        raise RuntimeError("log_batch failed") from OSError(code, os.strerror(code))
    except RuntimeError as e:
        assert storage_fault(e) == f"{os.strerror(code)} ({errno.errorcode[code]})"


def test_every_storage_errno_has_a_hint_and_no_other_does() -> None:
    def hint(code: int) -> str:
        return storage_hint([RankExit(1, exit_code=1, error=f"OSError: {os.strerror(code)}")])

    assert all(hint(c) for c in STORAGE_ERRNOS)
    assert hint(errno.ENOENT) == "" and storage_fault(OSError(errno.ENOENT, "gone")) == ""
