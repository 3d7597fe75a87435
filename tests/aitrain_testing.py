"""Helpers shared by the test packages: run the real `aitrain` command.

Import them as ``from aitrain_testing import ...`` — never ``from aitrain_testing import``:
with a conftest.py in several test folders, the name ``conftest`` means whichever was
imported first, and collection breaks depending on which tests run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
