"""scripts/expose_pyverbs.py: only pyverbs, idempotent, quiet success when not installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "expose_pyverbs.py"


@pytest.fixture(scope="module")
def ep():
    spec = importlib.util.spec_from_file_location("expose_pyverbs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_pkg(root: Path, suffix: str | None = None) -> Path:
    pkg = root / "dist-packages" / "pyverbs"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / f"device{suffix or sysconfig.get_config_var('EXT_SUFFIX')}").write_text("")
    return pkg


def test_find_and_abi(ep, tmp_path):
    assert ep.find_system_pyverbs((str(tmp_path),)) is None
    pkg = _fake_pkg(tmp_path)
    assert ep.find_system_pyverbs((str(tmp_path / "dist-packages"),)) == pkg
    assert ep.abi_matches(pkg)[0]
    other = _fake_pkg(tmp_path / "other", ".cpython-39-x86_64-linux-gnu.so")
    ok, why = ep.abi_matches(other)
    assert not ok and "cpython-39" in why


def test_expose_is_idempotent_and_removable(ep, tmp_path):
    pkg = _fake_pkg(tmp_path)
    private, pth = tmp_path / "venv/lib/aitrain-system-pyverbs", tmp_path / "venv/site/aitrain-system-pyverbs.pth"
    first = ep.expose(pkg, private, pth)
    second = ep.expose(pkg, private, pth)
    assert first[0].startswith("linked") and first[1].startswith("wrote")
    assert all(line.startswith("already") for line in second)
    assert (private / "pyverbs").resolve() == pkg and pth.read_text() == f"{private}\n"
    assert sorted(p.name for p in private.iterdir()) == ["pyverbs"]  # only pyverbs, nothing else
    assert ep.remove(private, pth)[0].startswith("removed")
    assert not pth.exists() and not private.exists()


def test_not_installed_exits_0_with_a_message(ep, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ep, "SYSTEM_DIRS", (str(tmp_path / "none"),))
    monkeypatch.setattr(ep, "paths", lambda: (tmp_path / "p", tmp_path / "x.pth"))
    monkeypatch.setattr(ep.sys, "base_prefix", "/not-the-venv")
    assert ep.main([]) == 0
    assert "python3-pyverbs is not installed" in capsys.readouterr().out
    assert not (tmp_path / "x.pth").exists()


def test_wrong_abi_is_not_exposed(ep, tmp_path, monkeypatch, capsys):
    _fake_pkg(tmp_path, ".cpython-39-x86_64-linux-gnu.so")
    monkeypatch.setattr(ep, "SYSTEM_DIRS", (str(tmp_path / "dist-packages"),))
    monkeypatch.setattr(ep, "paths", lambda: (tmp_path / "p", tmp_path / "x.pth"))
    monkeypatch.setattr(ep.sys, "base_prefix", "/not-the-venv")
    assert ep.main([]) == 0
    assert "not exposing" in capsys.readouterr().out and not (tmp_path / "x.pth").exists()


@pytest.mark.skipif(not Path("/usr/lib/python3/dist-packages/pyverbs/__init__.py").is_file(),
                    reason="python3-pyverbs is not installed")
@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="not running in a virtualenv")
def test_real_run_in_this_venv():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "import pyverbs works" in out.stdout
    again = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert again.stdout.count("already") == 2
    probe = subprocess.run([sys.executable, "-c", "import yaml, pyverbs, sys; print(pyverbs.__file__)"],
                           capture_output=True, text=True, timeout=60)
    assert "aitrain-system-pyverbs" in probe.stdout
