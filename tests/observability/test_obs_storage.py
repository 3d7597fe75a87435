"""Storage faults under the run dir: a full disk (a small tmpfs) at start and during a run.
One `aitrain: error:` line naming the path, the errno and what to do; a failed metrics write
never stops training; the job's result is never lost."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aitrain_testing import run_aitrain

pytestmark = pytest.mark.timeout(300)
TINY = ["model.n_layer=1", "model.d_model=32", "model.seq_len=16", "train.global_batch_size=8", "train.log_every=5"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        left = max(0, free - leave_bytes)
        while left > 0:
            n = min(left, 1 << 20)
            try:
                f.write(b"\0" * n)
                f.flush()
            except OSError:
                break
            left -= n
    return filler


def test_full_disk_at_start_is_one_error_line(tmp_path: Path, small_disk: Path) -> None:
    _fill(small_disk, 0)
    r = run_aitrain(["launch", "tracking=none", "fabric=off", f"run_root={small_disk / 'runs'}"], tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "aitrain: error: cannot create the run directory" in r.stderr
    assert "No space left on device (ENOSPC)" in r.stderr and "HINT: free space there" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_metrics_writer_holds_records_while_the_disk_is_full(small_disk: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from aitrain.launcher.metrics import MetricsWriter, iter_records

    path = small_disk / "metrics.jsonl"
    w = MetricsWriter(path)
    w.log(1, loss=3.0)
    filler = _fill(small_disk, 0)
    for step in range(2, 200):  # a long line each: the page the file had is soon full
        w.log(step, loss=1.0, **{f"pad{i}": float(i) for i in range(40)})
    err = capsys.readouterr().err
    assert err.count(f"aitrain: cannot write {path}: No space left on device (ENOSPC)") == 1, err
    filler.unlink()
    w.log(200, loss=0.5)
    w.close()
    assert "metrics are written to" in capsys.readouterr().err
    assert [r["step"] for r in iter_records(path)] == list(range(1, 201))  # nothing lost, in order


@pytest.mark.slow
def test_disk_fills_during_the_run(tmp_path: Path, small_disk: Path) -> None:
    """The built-in job on a run root with ~2 MiB free: checkpoints fill it. The job's end is
    reported (not "exited without a result"), the fault names the errno, no log-handler
    tracebacks, and the MLflow store's fault is not called an unreachable server."""
    _fill(small_disk, 2 << 20)
    r = run_aitrain(["launch", "fabric=off", f"run_root={small_disk}", "train.steps=400", "checkpoint.every_n_steps=10",
                     "checkpoint.keep=0", *TINY], tmp_path, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "No space left on device" in r.stderr, out[-3000:]
    assert "without a result" not in out and "--- Logging error ---" not in out, out[-3000:]
    assert "is unreachable" not in out, out[-3000:]
    assert r.stderr.count("aitrain: error:") == 1, r.stderr[-3000:]
    assert "is full" in r.stderr and "free space there (df -h " in r.stderr, r.stderr[-3000:]
