"""The GPU tier: every test here needs one NVIDIA GPU that torch can use, else it is skipped.

Collection imports nothing heavy: without an NVIDIA driver the skip comes from a few file
checks (gpu_testing.skip_reason). ``scripts/gpu_check.sh`` runs this folder on a GPU machine
and turns the results (AITRAIN_GPU_RESULTS, written by the hooks below) into a summary.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from gpu_testing import skip_reason, torch_facts


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def gpu() -> dict[str, Any]:
    """What torch says about the GPU: torch, cuda, nccl, name, capability, memory_mib, bf16."""
    return torch_facts()


@pytest.fixture
def note(record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    """``note("ddp: 1.2M tokens/s")``: a fact for the summary of scripts/gpu_check.sh."""
    return lambda text: record_property("note", text)


# -- results for scripts/gpu_check.sh (a JSON line per event; survives a run that is cut off) ----


def _append(record: dict[str, Any]) -> None:
    path = os.environ.get("AITRAIN_GPU_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _append({"event": "start", "nodeid": nodeid, "time": time.time()})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not os.environ.get("AITRAIN_GPU_RESULTS"):
        return
    message: str | None = None
    if report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2]).removeprefix("Skipped: ")
    elif report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = getattr(crash, "message", None) or (report.longreprtext.strip().splitlines() or ["failed"])[-1]
    _append({"event": "report", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
             "duration": round(report.duration, 2), "message": message,
             "notes": [str(v) for k, v in report.user_properties if k == "note"]})
