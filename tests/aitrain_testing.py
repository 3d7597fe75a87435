"""Helpers shared by the test packages: run the real `aitrain` command.

Import them as ``from aitrain_testing import ...`` — never ``from conftest import ...``:
with a conftest.py in several test folders, the name ``conftest`` means whichever was
imported first, and collection breaks depending on which tests run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


def aitrain_argv() -> list[str]:
    return [sys.executable, "-m", "aitrain.launcher.cli"]


def run_aitrain(args: list[str], cwd: Path, env: dict[str, str] | None = None,
                timeout: float = 180) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.update(env or {})
    return subprocess.run(aitrain_argv() + args, cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    """``cond()``'s first truthy value, polled every ``poll`` s; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)


def all_gone(pids: list[int], within: float = 10) -> list[int]:
    """The pids still alive after waiting up to ``within`` s for all of them to end."""
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


C = TypeVar("C")


def up_or_skip(cluster: C, what: str) -> Iterator[C]:
    """A module fixture's body for a real cluster (``up()``/``down()``): up, or the module
    skipped saying why (environment problems); down at the end whatever happened."""
    import pytest

    try:
        cluster.up()  # type: ignore[attr-defined]
    except Exception as e:  # pragma: no cover - environment problems
        cluster.down()  # type: ignore[attr-defined]
        pytest.skip(f"could not start {what}: {e}")
    try:
        yield cluster
    finally:
        cluster.down()  # type: ignore[attr-defined]
