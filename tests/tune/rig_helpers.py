"""Helpers for tests (and bench/fabric_tune.py) that run real processes on the rig."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

RIG_NAME = "aitt"
RIG_BASE = 215


def nameservers(resolv: str = "/etc/resolv.conf") -> list[str]:
    try:
        lines = Path(resolv).read_text().splitlines()
    except OSError:
        return []
    return [ln.split()[1] for ln in lines if ln.startswith("nameserver") and len(ln.split()) > 1
            and "." in ln.split()[1]]


def make_fast_dns_fail(rig) -> None:
    """Rig namespaces have no DNS, but /etc/resolv.conf is shared: lookups (c10d's
    reverse lookup of each client) would wait seconds on a nameserver the default
    route cannot reach. An unreachable route makes them fail at once."""
    for host in rig.hosts:
        for ns in nameservers():
            subprocess.run(["ip", "-n", host.name, "route", "replace", "unreachable", f"{ns}/32"],
                           capture_output=True, check=False)


def rx_tx_bytes(namespace: str) -> dict[str, int]:
    """{ifname: rx+tx bytes} inside a namespace (netlink, so namespace-correct)."""
    out = subprocess.run(["ip", "-n", namespace, "-j", "-s", "link"], capture_output=True, text=True,
                         check=True).stdout
    return {lk["ifname"]: lk["stats64"]["rx"]["bytes"] + lk["stats64"]["tx"]["bytes"] for lk in json.loads(out)}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}
