"""Rank 0's metrics spool: one JSON object per line in the run directory.

Training never talks to MLflow itself. It appends to this file (cheap, never
blocks on a network), and the launcher's tracker tails the file and forwards
the lines to MLflow, so a slow or absent tracking server cannot stall a step
and no metric is lost.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aitrain.launcher.util import describe_os_error

METRICS_ENV = "AITRAIN_METRICS_FILE"


MAX_HELD = 10_000  # records kept in memory while the file cannot be written (a full disk)


class MetricsWriter:
    """Appends rank 0's metrics to the spool. A storage fault (ENOSPC, EIO, ...) never stops
    training: records are held in memory (the newest ``MAX_HELD``) and written when the file
    takes them again; the fault, and any records dropped, are said once on stderr."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        path = path or os.environ.get(METRICS_ENV)
        self.path = Path(path) if path else None
        self._held: deque[str] = deque(maxlen=MAX_HELD)
        self._dropped = 0
        self._fault: OSError | None = None
        self._f: Any = None
        if self.path is not None:
            try:
                self._f = open(self.path, "a", buffering=1)
            except OSError as e:
                self._failed(e)

    def log(self, step: int, **values: float) -> None:
        if self.path is None:
            return
        rec: dict[str, Any] = {"step": step, "time": time.time()}
        rec.update({k: float(v) for k, v in values.items()})
        if len(self._held) == MAX_HELD:
            self._dropped += 1
        self._held.append(json.dumps(rec) + "\n")
        self._write()

    def _write(self) -> None:
        try:
            if self._f is None:
                assert self.path is not None
                self._f = open(self.path, "a", buffering=1)
                if self._fault is not None:
                    self._f.write("\n")  # ends a line the fault cut short, so the next record stands alone
            while self._held:
                self._f.write(self._held[0])
                self._held.popleft()
            self._f.flush()
        except OSError as e:
            self._failed(e)
            return
        if self._fault is not None:
            lost = f"; {self._dropped} older record(s) were dropped" if self._dropped else ""
            print(f"aitrain: metrics are written to {self.path} again{lost}", file=sys.stderr, flush=True)
            self._fault, self._dropped = None, 0

    def _failed(self, e: OSError) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None  # reopened on the next record: a partly written line is left behind it
        if self._fault is None:
            self._fault = e
            print(f"aitrain: {describe_os_error(e, self.path)}; "
                  f"training goes on, the newest {MAX_HELD} metric records are held in memory until it can",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._held:
            self._write()
        if self._held or self._dropped:
            print(f"aitrain: {len(self._held) + self._dropped} metric record(s) could not be written to "
                  f"{self.path}", file=sys.stderr, flush=True)
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
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
