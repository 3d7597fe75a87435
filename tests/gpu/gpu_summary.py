"""The summary scripts/gpu_check.sh prints: a few lines to paste into a note.

    python tests/gpu/gpu_summary.py OUT_DIR PYTEST_EXIT WALL_S BUDGET_S

reads OUT_DIR/facts.json (versions, written by gpu_check.sh) and OUT_DIR/results.jsonl (one
line per test event, written by tests/gpu/conftest.py while the tests run, so a run cut off by
the time limit still says what passed and where it stopped).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STATES = {0: "all passed", 1: "tests failed", 2: "interrupted", 3: "internal error", 4: "usage error",
          5: "no tests collected", 124: "stopped by the time limit", 137: "killed at the time limit"}


def _run(*argv: str) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.strip() if r.returncode == 0 else ""


def read_results(path: Path) -> tuple[dict[str, dict[str, Any]], str | None]:
    """{nodeid: {outcome PASS|FAIL|SKIP|None, duration, message, notes}} in run order, and the
    test that had started but not finished (cut off)."""
    tests: dict[str, dict[str, Any]] = {}
    running = None
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # the last line of a killed run
        t = tests.setdefault(ev["nodeid"], {"outcome": None, "duration": 0.0, "message": None, "notes": []})
        if ev["event"] == "start":
            running = ev["nodeid"]
            continue
        t["duration"] += ev.get("duration") or 0.0
        t["notes"] = t["notes"] or ev.get("notes") or []
        if ev["outcome"] == "failed":
            t["outcome"] = "FAIL"
            t["message"] = t["message"] or ev.get("message") or f"failed in {ev['when']}"
        elif ev["outcome"] == "skipped" and t["outcome"] is None:
            t["outcome"], t["message"] = "SKIP", ev.get("message")
        elif ev["when"] == "call" and t["outcome"] is None:
            t["outcome"] = "PASS"
        if ev["when"] == "teardown" and running == ev["nodeid"]:
            running = None
    return tests, running


def short(nodeid: str) -> str:
    """tests/gpu/test_gpu_fabric.py::test_probe_x[a] -> fabric::probe_x[a]"""
    module, _, name = nodeid.partition("::")
    module = Path(module).stem.removeprefix("test_gpu_").removeprefix("test_")
    return f"{module}::{name.removeprefix('test_')}"


def one_line(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def summary(out: Path, rc: int, wall_s: int, budget_s: str) -> list[str]:
    facts = json.loads((out / "facts.json").read_text()) if (out / "facts.json").exists() else {}
    commit = _run("git", "rev-parse", "--short", "HEAD") or "?"
    dirty = "+dirty" if _run("git", "status", "--porcelain", "--untracked-files=no") else ""
    driver = ""
    if shutil.which("nvidia-smi"):
        driver = (_run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").splitlines() or [""])[0]
    gpus = facts.get("gpus") or []
    lines = [
        f"aitrain GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}{dirty}, "
        f"host {os.uname().nodename}",
        f"GPU {len(gpus)}x {gpus[0] if gpus else '(none seen by torch)'}, driver {driver or '-'} | "
        f"torch {facts.get('torch')}, CUDA {facts.get('cuda')}, NCCL {facts.get('nccl')}, "
        f"cuDNN {facts.get('cudnn')}, nvidia-ml-py {facts.get('nvidia-ml-py', '-')}",
    ]
    tests, running = read_results(out / "results.jsonl")
    count = {k: sum(1 for t in tests.values() if t["outcome"] == k) for k in ("PASS", "FAIL", "SKIP")}
    lines.append(f"tests/gpu: {count['PASS']} passed, {count['FAIL']} failed, {count['SKIP']} skipped: "
                 f"{STATES.get(rc, f'pytest exit {rc}')}, {wall_s}s of {budget_s}s")
    names = {n: short(n) for n in tests}
    width = max((len(s) for s in names.values()), default=0)
    # The same skip reason for many tests (no GPU at all) is said once.
    reasons: dict[str, list[str]] = {}
    for nodeid, t in tests.items():
        if t["outcome"] == "SKIP":
            reasons.setdefault(one_line(t["message"]), []).append(nodeid)
    said: set[str] = set()
    for nodeid, t in tests.items():
        outcome = t["outcome"] or ("STOP" if nodeid == running else "????")
        if outcome == "SKIP":
            reason = one_line(t["message"])
            if len(reasons[reason]) > 2:
                if reason not in said:
                    said.add(reason)
                    lines.append(f"  SKIP {len(reasons[reason])} tests: {reason}")
                continue
            text = reason
        elif outcome == "PASS":
            text = one_line("; ".join(t["notes"]), 240)
        elif outcome == "STOP":
            text = "cut off here by the time limit"
        else:
            text = one_line(t["message"], 240)
        lines.append(f"  {outcome} {names[nodeid].ljust(width)} {t['duration']:5.1f}s  {text}".rstrip())
    if rc == 0 and count["PASS"] == 0:
        lines.append("NOTHING RAN: every test was skipped (reasons above)")
    return lines


def main(argv: list[str]) -> int:
    out, rc, wall_s, budget_s = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    print("\n".join(summary(out, rc, wall_s, budget_s)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
