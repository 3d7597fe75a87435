"""The wheel: everything under the aitrain namespace, configs shipped, the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from aitrain_testing import REPO


@pytest.mark.timeout(300)
def test_wheel_layout(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("aitrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"aitrain"}
    for module in ("aitrain/launcher/cli.py", "aitrain/fabric/topology.py", "aitrain/strategies/api.py",
                   "aitrain/configs/config.yaml", "aitrain/configs/strategy/fsdp.yaml", "aitrain/errors.py"):
        assert module in names, module
    assert not any(n.startswith(("launcher/", "fabric/", "strategies/", "configs/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "aitrain = aitrain.launcher.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
