"""Fixtures for the host check and tune tests: temporary proc/sys trees."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import pytest

from aitrain.fabric.host import HostPaths
from hosttree import stock_host_files, write_tree

MakeHost = Callable[..., HostPaths]


@pytest.fixture
def make_host(tmp_path: Path) -> MakeHost:
    """``make_host(drop=[...], **{"proc/sys/vm/swappiness": "10\\n"})`` -> HostPaths of a new tree."""
    made = itertools.count()

    def make(drop: tuple[str, ...] | list[str] = (), **overrides: str) -> HostPaths:
        files = stock_host_files()
        for rel in drop:
            for key in [k for k in files if k == rel or k.startswith(rel.rstrip("/") + "/")]:
                del files[key]
        files.update(overrides)
        return write_tree(tmp_path / f"host{next(made)}", files)

    return make
