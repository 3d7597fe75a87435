"""Fixtures for the host tests (the tree helpers live in hosttree.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hosttree import MakeHost, host_maker


@pytest.fixture
def make_host(tmp_path: Path) -> MakeHost:
    """``make_host(drop=[...], **{"proc/sys/vm/swappiness": "10\\n"})`` -> HostPaths of a new tree."""
    return host_maker(tmp_path)
