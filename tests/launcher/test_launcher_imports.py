"""The launcher stays light (#17 item 7): a local launch with MLflow tracking on never imports
torch (the ranks and the node agent do) nor MLflow (the embedded store is written without it),
and the run is complete in the store when the launch returns."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path


def test_a_tracked_local_launch_imports_neither_torch_nor_mlflow_in_the_launcher(tmp_path: Path) -> None:
    code = f"""
import sys
from aitrain.launcher.cli import main
try:
    rc = main(["launch", "train.steps=2", "nproc_per_node=2", "model=tiny", "run_root={tmp_path / 'runs'}"])
except SystemExit as e:
    rc = e.code
print("RESULT", rc, "torch" in sys.modules, "mlflow" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=180)
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT 0 False False"], out.stdout[-2000:] + out.stderr[-2000:]
    con = sqlite3.connect(tmp_path / "runs" / "mlflow.db")
    assert con.execute("SELECT status FROM runs").fetchall() == [("FINISHED",)]
    assert con.execute("SELECT count(*) FROM metrics WHERE key = 'loss'").fetchone()[0] == 2
