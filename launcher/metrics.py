"""Rank 0's metrics spool: one JSON object per line in the run directory.

Training never talks to MLflow itself. It appends to this file (cheap, never
blocks on a network), and the launcher's tracker tails the file and forwards
the lines to MLflow, so a slow or absent tracking server cannot stall a step
and no metric is lost.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

METRICS_ENV = "AITRAIN_METRICS_FILE"


class MetricsWriter:
    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        path = path or os.environ.get(METRICS_ENV)
        self._f = open(path, "a", buffering=1) if path else None

    def log(self, step: int, **values: float) -> None:
        if self._f is None:
            return
        rec: dict[str, Any] = {"step": step, "time": time.time()}
        rec.update({k: float(v) for k, v in values.items()})
        self._f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_new(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete lines appended since ``offset``; returns (records, new offset)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    records = []
    for line in data[: end + 1].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records, offset + end + 1


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    records, _ = read_new(path, 0)
    yield from records
