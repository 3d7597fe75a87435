"""Lint and type-check the project: ``ruff check`` and ``mypy`` (settings in pyproject.toml).

    python scripts/lint.py            # both; exit 1 when either finds something
    python scripts/lint.py --mypy     # only mypy
    python scripts/lint.py --ruff     # only ruff

The top-level folders install under the ``aitrain`` namespace (``launcher/`` is
``aitrain.launcher``, ``api/`` is ``aitrain`` itself; see setup.py), and the editable
install maps them with an import hook that mypy cannot follow. So mypy checks the
package ``aitrain`` from a tree of links in ``build/typecheck/`` that has the installed
layout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# folder -> where it sits in the installed package (as in setup.py)
LAYOUT = {"launcher": "launcher", "fabric": "fabric", "strategies": "strategies", "configs": "configs"}


def link_tree(root: Path) -> Path:
    """``root/aitrain``: api/*.py as the package's own modules, the folders as subpackages."""
    pkg = root / "aitrain"
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for f in sorted((REPO / "api").iterdir()):
        if f.suffix in (".py", ".typed"):
            (pkg / f.name).symlink_to(f)
    for folder, name in LAYOUT.items():
        (pkg / name).symlink_to(REPO / folder, target_is_directory=True)
    return root


def tool(name: str) -> str:
    """The tool beside this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def run_mypy() -> int:
    root = link_tree(REPO / "build" / "typecheck")
    env = dict(os.environ, MYPYPATH=str(root))
    print("== mypy -p aitrain", flush=True)
    return subprocess.call([tool("mypy"), "--config-file", str(REPO / "pyproject.toml"), "-p", "aitrain"],
                           cwd=REPO, env=env)


def run_ruff() -> int:
    print("== ruff check", flush=True)
    return subprocess.call([tool("ruff"), "check", "."], cwd=REPO)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mypy", action="store_true", help="only mypy")
    p.add_argument("--ruff", action="store_true", help="only ruff")
    args = p.parse_args()
    both = not (args.mypy or args.ruff)
    rc = 0
    if both or args.ruff:
        rc |= run_ruff()
    if both or args.mypy:
        rc |= run_mypy()
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
