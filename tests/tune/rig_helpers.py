"""Helpers for tests (and bench/fabric_tune.py) that run real processes on the rig."""

from __future__ import annotations

import json
import subprocess

RIG_NAME = "aitt"
RIG_BASE = 215


def make_fast_dns_fail(rig) -> None:
    """Kept for the tests' fixtures: Rig.up() now makes DNS fail fast in every namespace."""


def rx_tx_bytes(namespace: str) -> dict[str, int]:
    """{ifname: rx+tx bytes} inside a namespace (netlink, so namespace-correct)."""
    out = subprocess.run(["ip", "-n", namespace, "-j", "-s", "link"], capture_output=True, text=True,
                         check=True).stdout
    return {lk["ifname"]: lk["stats64"]["rx"]["bytes"] + lk["stats64"]["tx"]["bytes"] for lk in json.loads(out)}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}
