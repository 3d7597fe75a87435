#!/usr/bin/env python3
"""Make Debian's system ``pyverbs`` (package python3-pyverbs) importable in a virtualenv.

pyverbs is rdma-core's Python binding; it is built against the system libibverbs and
is not the PyPI project of the same name, so it must come from the distribution.
Turning on ``include-system-site-packages`` would leak every system package into the
venv; this exposes *only* pyverbs:

- ``<venv>/lib/aitrain-system-pyverbs/pyverbs`` -> ``/usr/lib/python3/dist-packages/pyverbs``
- ``<site-packages>/aitrain-system-pyverbs.pth`` naming that directory.

Run it with the venv's interpreter (``.venv/bin/python scripts/expose_pyverbs.py``).
Idempotent; ``--remove`` undoes it. Exits 0 with a message when python3-pyverbs is
not installed or was built for another Python, so install scripts can always call it.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

SYSTEM_DIRS = ("/usr/lib/python3/dist-packages",)
PRIVATE_DIR_NAME = "aitrain-system-pyverbs"
PTH_NAME = f"{PRIVATE_DIR_NAME}.pth"


def find_system_pyverbs(dirs: tuple[str, ...] | None = None) -> Path | None:
    for d in dirs if dirs is not None else SYSTEM_DIRS:
        pkg = Path(d) / "pyverbs"
        if (pkg / "__init__.py").is_file():
            return pkg
    return None


def abi_matches(pkg: Path) -> tuple[bool, str]:
    """Whether the package's extension modules were built for this interpreter."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    built = sorted({Path(p).name.split(".", 1)[1] for p in glob.glob(str(pkg / "*.so"))})
    if not built:
        return True, "no extension modules"
    if any(f".{b}" == suffix for b in built):
        return True, suffix
    return False, f"built for {', '.join(built)}; this Python needs *{suffix}"


def paths(prefix: Path | None = None) -> tuple[Path, Path]:
    """(private dir, .pth file) for the running interpreter's environment."""
    prefix = prefix or Path(sys.prefix)
    site = Path(sysconfig.get_paths()["purelib"])
    return prefix / "lib" / PRIVATE_DIR_NAME, site / PTH_NAME


def expose(pkg: Path, private: Path, pth: Path) -> list[str]:
    done: list[str] = []
    link = private / "pyverbs"
    private.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and os.readlink(link) == str(pkg):
        done.append(f"already linked: {link} -> {pkg}")
    else:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(pkg, target_is_directory=True)
        done.append(f"linked {link} -> {pkg}")
    line = f"{private}\n"
    if pth.is_file() and pth.read_text() == line:
        done.append(f"already present: {pth}")
    else:
        pth.parent.mkdir(parents=True, exist_ok=True)
        pth.write_text(line)
        done.append(f"wrote {pth} ({private})")
    return done


def remove(private: Path, pth: Path) -> list[str]:
    done = []
    if pth.exists():
        pth.unlink()
        done.append(f"removed {pth}")
    link = private / "pyverbs"
    if link.is_symlink():
        link.unlink()
        done.append(f"removed {link}")
    if private.is_dir() and not any(private.iterdir()):
        private.rmdir()
    return done or ["nothing to remove"]


def verify() -> tuple[bool, str]:
    """Imports pyverbs in a fresh interpreter; no devices is fine."""
    code = (
        "import pyverbs.device as d\n"
        "try:\n    n = len(d.get_device_list())\n"
        "except Exception as e:\n    n = 0\n"
        "print(n)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return False, (out.stderr.strip().splitlines() or ["import failed"])[-1]
    return True, f"{out.stdout.strip()} RDMA device(s) visible"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--remove", action="store_true", help="undo: remove the link and the .pth file")
    args = parser.parse_args(argv)
    private, pth = paths()
    if args.remove:
        for line in remove(private, pth):
            print(f"expose_pyverbs: {line}")
        return 0
    if sys.prefix == sys.base_prefix:
        print(f"expose_pyverbs: {sys.executable} is not a virtualenv; nothing to do "
              "(a system Python imports python3-pyverbs directly)")
        return 0
    pkg = find_system_pyverbs()
    if pkg is None:
        print("expose_pyverbs: python3-pyverbs is not installed (no pyverbs in "
              f"{', '.join(SYSTEM_DIRS)}); nothing to do. To get it: apt-get install -y python3-pyverbs")
        return 0
    ok, why = abi_matches(pkg)
    if not ok:
        print(f"expose_pyverbs: not exposing {pkg}: {why}. The fabric probe works without it "
              "(sysfs only); use a venv made from the system python3 to get pyverbs.")
        return 0
    for line in expose(pkg, private, pth):
        print(f"expose_pyverbs: {line}")
    ok, detail = verify()
    print(f"expose_pyverbs: {'import pyverbs works' if ok else 'import pyverbs FAILED'}: {detail}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
