"""Shared fixtures for the fabric tests: the published captures in ../shared and the
synthetic host trees written by tests/fixtures/fabric/hostbuilder.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared" / "fixtures" / "fabric"
BUILDER_DIR = REPO / "tests" / "fixtures" / "fabric"
sys.path.insert(0, str(BUILDER_DIR))

import hostbuilder  # noqa: E402


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared fabric fixtures not found at {SHARED}")
    return SHARED.resolve()


@pytest.fixture(scope="session")
def hosts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good hosts: dgx01, dgx02 (8 GPUs, 8 x NDR IB), roce01, roce02 (RoCE v2), cpu01."""
    return hostbuilder.write_good_hosts(tmp_path_factory.mktemp("hosts"))


@pytest.fixture(scope="session")
def broken_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("broken")
    for name in hostbuilder.BROKEN:
        hostbuilder.write_host(hostbuilder.broken(name), out / name)
    return out


@pytest.fixture(scope="session")
def dgx(hosts_dir: Path):
    from aitrain.fabric import probe

    return probe(hosts_dir / "dgx01")


@pytest.fixture(scope="session")
def roce(hosts_dir: Path):
    from aitrain.fabric import probe

    return probe(hosts_dir / "roce01")


@pytest.fixture
def write_host(tmp_path: Path):
    """write_host(spec) -> the host tree root, under this test's tmp_path."""
    counter = iter(range(1000))

    def _write(spec):
        return hostbuilder.write_host(spec, tmp_path / f"host{next(counter)}")

    return _write
