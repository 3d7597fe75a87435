"""Fixtures for the tuning, bench and smoke tests: synthetic host trees (the discovery
tests' hostbuilder) and one multi-host test rig of network namespaces per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "fixtures" / "fabric"))
sys.path.insert(0, str(REPO / "scripts"))

import hostbuilder  # noqa: E402
import netns_rig  # noqa: E402
from rig_helpers import RIG_BASE, RIG_NAME, make_fast_dns_fail  # noqa: E402


@pytest.fixture(scope="session")
def trees(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hostbuilder.write_good_hosts(tmp_path_factory.mktemp("tune-hosts"))


@pytest.fixture(scope="session")
def probe_tree():
    from aitrain.fabric import probe

    cache: dict[Path, object] = {}

    def _probe(path: Path):
        if path not in cache:
            cache[path] = probe(path)
        return cache[path]

    return _probe


@pytest.fixture
def build(tmp_path: Path):
    """build(spec) -> HostTopology of a synthetic host written under tmp_path."""
    from aitrain.fabric import probe

    counter = iter(range(1000))

    def _build(spec):
        return probe(hostbuilder.write_host(spec, tmp_path / f"h{next(counter)}"))

    return _build


@pytest.fixture(scope="session")
def rig():
    """Four hosts (aitt-n1..n4): eth0 on a 200 Mbit/s management bridge (default route),
    fab0 on an unthrottled MTU-9000 fabric bridge. Torn down after the session."""
    why = netns_rig.available()
    if why:
        pytest.skip(f"netns rig unavailable: {why}")
    r = netns_rig.Rig(hosts_count=4, name=RIG_NAME, base=RIG_BASE)
    try:
        r.up()
        make_fast_dns_fail(r)
        yield r
    finally:
        r.down()
