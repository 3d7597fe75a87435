"""The wheel: everything under the aitrain namespace, configs shipped, the console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from aitrain_testing import REPO


@pytest.mark.timeout(300)
def test_wheel_layout(tmp_path: Path) -> None:
    # Built from a copy without build/: setuptools keeps build/lib between builds, and a module
    # that was moved or deleted would still be in a wheel built from the working tree.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "outputs", "*.egg-info",
                                                             ".pytest_cache", ".hypothesis", "__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("aitrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"aitrain"}
    for module in ("aitrain/launcher/cli/__init__.py", "aitrain/launcher/backends/slurm/sbatch.py",
                   "aitrain/fabric/topology.py", "aitrain/strategies/api.py", "aitrain/configs/config.yaml",
                   "aitrain/configs/strategy/fsdp.yaml", "aitrain/errors.py", "aitrain/py.typed",
                   "aitrain/launcher/mlflow_schema.sql"):
        assert module in names, module
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), \
        [n for n in names if "dist-info" in n]
    assert not any(n.startswith(("launcher/", "fabric/", "strategies/", "configs/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "aitrain = aitrain.launcher.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
