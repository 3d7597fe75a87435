"""Storage faults other than a full disk, produced for real: EACCES (root without its
DAC-override capability, setpriv) and EIO (strace injecting the error into the writes of one
path). Each is one line naming the path, the errno and what to do; a failed metrics or
MLflow-store write never stops training; a failed checkpoint write ends the job with its
MLflow run marked FAILED, not left RUNNING."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from aitrain_testing import aitrain_argv, run_aitrain

pytestmark = pytest.mark.timeout(300)
TINY = ["model.n_layer=1", "model.d_model=32", "model.seq_len=16", "train.global_batch_size=8", "train.log_every=5",
        "nproc_per_node=1", "fabric=off"]
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]  # root, but file modes apply to it


def _works(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return f"{argv[0]} is not installed"
    r = subprocess.run([*argv, "true"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"{argv[0]} cannot run here: {r.stderr.strip()[-200:]}"


def eio_on(path: Path) -> list[str]:
    """A prefix that makes every write to ``path`` (by any process of the command) fail with EIO."""
    why = _works(["strace", "-f", "-qq", "-o", "/dev/null"])
    if why:
        pytest.skip(why)
    return ["strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e", "trace=write,pwrite64,writev",
            "-e", "inject=write,pwrite64,writev:error=EIO", "-P", str(path)]


def no_dac() -> list[str]:
    why = _works(NO_DAC)
    if why:
        pytest.skip(why)
    return NO_DAC


def launch(prefix: list[str], args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *aitrain_argv(), "launch", *TINY, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def read_only_dir(tmp_path: Path) -> Path:
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    return d


def test_eacces_run_root_is_one_error_line(tmp_path: Path) -> None:
    r = launch(no_dac(), [f"run_root={read_only_dir(tmp_path) / 'runs'}"], tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"cannot create the run directory {tmp_path / 'readonly' / 'runs'}" in r.stderr
    assert "Permission denied (EACCES)" in r.stderr and "HINT: set run_root=" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("aitrain: error:") == 1


def test_eacces_checkpoint_dir_is_refused_before_anything_starts(tmp_path: Path) -> None:
    ck = read_only_dir(tmp_path) / "ck"
    r = launch(no_dac(), [f"run_root={tmp_path / 'runs'}", "checkpoint.every_n_steps=5", f"checkpoint.dir={ck}"],
               tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"checkpoint.dir={ck}: {tmp_path / 'readonly'} is not writable: Permission denied (EACCES)" in r.stderr
    assert f"ls -ld {tmp_path / 'readonly'}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "runs").rglob("logs")), "refused before any process started"


def test_eio_on_the_metrics_file_never_stops_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    r = launch(eio_on(run_dir / "metrics.jsonl"), ["train.steps=10", "tracking=none", f"hydra.run.dir={run_dir}"],
               tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert out.count(f"aitrain: cannot write {run_dir / 'metrics.jsonl'}: Input/output error (EIO)") == 1, out
    assert "step 10/10" in out and f"metric record(s) could not be written to {run_dir / 'metrics.jsonl'}" in out
    assert "Traceback" not in out


def test_eio_on_a_checkpoint_ends_the_job_naming_it_and_its_run_failed(tmp_path: Path) -> None:
    run_dir, runs = tmp_path / "run", tmp_path / "runs"
    data = run_dir / "checkpoints" / "step-00000005" / "__0_0.distcp"
    r = launch(eio_on(data), ["train.steps=10", "checkpoint.every_n_steps=5", f"hydra.run.dir={run_dir}",
                              f"run_root={runs}"], tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("aitrain: error:")]
    assert len(errors) == 1 and errors[0].endswith(
        f"Input/output error (EIO) saving checkpoint step 5 under {run_dir / 'checkpoints'}"), r.stderr[-3000:]
    assert f"HINT: the storage failed (EIO): check the filesystem ({run_dir / 'checkpoints'})" in r.stderr
    assert "--- Logging error ---" not in r.stdout + r.stderr
    con = sqlite3.connect(runs / "mlflow.db")
    assert con.execute("SELECT status FROM runs").fetchall() == [("FAILED",)]


def test_eio_on_the_mlflow_store_is_spooled_and_synced_later(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first = run_aitrain(["launch", *TINY, "train.steps=2", f"run_root={runs}"], tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "run"
    r = launch(eio_on(runs / "mlflow.db"), ["train.steps=10", f"hydra.run.dir={run_dir}", f"run_root={runs}"], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]  # the job's own result
    assert f"aitrain: the MLflow store at sqlite:///{runs / 'mlflow.db'}: disk I/O error (EIO); training goes on" in out
    assert f"check the disk and its filesystem, then: aitrain runs sync {run_dir}" in out
    assert "is unreachable" not in out and "Traceback" not in out
    synced = run_aitrain(["runs", "sync", str(run_dir)], tmp_path, timeout=120)
    assert synced.returncode == 0 and "is in MLflow" in synced.stdout, synced.stdout + synced.stderr
    con = sqlite3.connect(runs / "mlflow.db")
    assert sorted(s for (s,) in con.execute("SELECT status FROM runs")) == ["FINISHED", "FINISHED"]
    assert con.execute("SELECT count(*) FROM metrics WHERE key = 'loss'").fetchone()[0] >= 2 + 2
