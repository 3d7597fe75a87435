#!/usr/bin/env python3
"""A multi-host test rig on one machine: network namespaces as hosts.

Each host is a network namespace with two interfaces, as on a real cluster:

* ``eth0`` on the *management* network: a bridge throttled with ``tc`` (default
  200 Mbit/s), the default route; what a naive setup picks.
* ``fab0`` on the *fabric* network: an unthrottled bridge with jumbo frames.

The machine's hostname resolves to 127.0.0.1 in every namespace (they share
/etc/hosts), the classic trap that makes an untuned multi-host gloo job fail.
Only addresses inside the rig are used (10.<base>.1.0/24 and 10.<base>.2.0/24,
bridges have no address unless ``controller_ip`` asks for one on the
management bridge, e.g. for slurmctld in the root namespace).

    python scripts/netns_rig.py up --hosts 2 [--name ait] [--mgmt-rate 200mbit]
    python scripts/netns_rig.py exec ait-n1 -- ip addr
    python scripts/netns_rig.py down [--name ait]

Needs root (CAP_NET_ADMIN) and iproute2. Tests use :class:`Rig` as a context manager.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

NETNS_DIR = "/var/run/netns"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, text=True, capture_output=True)


def available() -> str | None:
    """None when the rig can be built here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2 / util-linux)"
    probe = f"aitprobe{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create network namespaces: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class RigHost:
    name: str  # also the network namespace's name
    index: int  # 1-based
    mgmt_ip: str
    fabric_ip: str
    mgmt_if: str = "eth0"
    fabric_if: str = "fab0"

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.name}"

    def nsenter(self) -> list[str]:
        """argv prefix that runs a command in this host's network namespace.

        nsenter --net (unlike `ip netns exec`) does not remount /sys, so /sys
        still shows the root namespace's devices: read this host's NICs with
        `ip -j addr` (or /proc/net) inside the namespace instead.
        """
        return ["nsenter", f"--net={self.netns_path}"]


@dataclass
class Rig:
    hosts_count: int = 2
    name: str = "ait"
    base: int = 213  # second octet of the rig's subnets
    mgmt_rate: str | None = "200mbit"
    fabric_mtu: int = 9000
    controller_ip: bool = False  # give the management bridge 10.<base>.1.254 in the root namespace
    hosts: list[RigHost] = field(default_factory=list)

    @property
    def mgmt_bridge(self) -> str:
        return f"{self.name}-mgmt"

    @property
    def fabric_bridge(self) -> str:
        return f"{self.name}-fab"

    @property
    def controller_address(self) -> str:
        return f"10.{self.base}.1.254"

    def up(self) -> Rig:
        self.down()
        for br, mtu in ((self.mgmt_bridge, 1500), (self.fabric_bridge, self.fabric_mtu)):
            _ip("link", "add", br, "type", "bridge")
            _ip("link", "set", br, "mtu", str(mtu), "up")
        if self.controller_ip:
            _ip("addr", "add", f"{self.controller_address}/24", "dev", self.mgmt_bridge)
        for i in range(1, self.hosts_count + 1):
            h = RigHost(name=f"{self.name}-n{i}", index=i,
                        mgmt_ip=f"10.{self.base}.1.{10 + i}", fabric_ip=f"10.{self.base}.2.{10 + i}")
            _ip("netns", "add", h.name)
            _ip("-n", h.name, "link", "set", "lo", "up")
            for ifname, br, ip, mtu in ((h.mgmt_if, self.mgmt_bridge, h.mgmt_ip, 1500),
                                        (h.fabric_if, self.fabric_bridge, h.fabric_ip, self.fabric_mtu)):
                outer = f"{self.name}{i}{ifname[0]}"  # e.g. ait1e, ait1f (<= 15 chars)
                _ip("link", "add", outer, "mtu", str(mtu), "type", "veth", "peer", "name", ifname,
                    "mtu", str(mtu), "netns", h.name)
                _ip("link", "set", outer, "master", br, "up")
                _ip("-n", h.name, "addr", "add", f"{ip}/24", "dev", ifname)
                _ip("-n", h.name, "link", "set", ifname, "up")
                if ifname == h.mgmt_if and self.mgmt_rate:
                    # Throttle both directions: egress of the outer end is ingress of the host.
                    for dev, ns in ((outer, None), (ifname, h.name)):
                        cmd = ["tc"] + (["-n", ns] if ns else []) + [
                            "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.mgmt_rate,
                            "burst", "64kb", "latency", "50ms"]
                        subprocess.run(cmd, check=True, capture_output=True, text=True)
            _ip("-n", h.name, "route", "add", "default", "dev", h.mgmt_if)
            # The namespaces share /etc/resolv.conf but cannot reach its nameservers: make
            # lookups (c10d reverse-resolves every client) fail at once instead of timing out.
            for ns in nameservers():
                _ip("-n", h.name, "route", "replace", "unreachable", f"{ns}/32", check=False)
            self.hosts.append(h)
        return self

    def down(self) -> None:
        """Remove every namespace and bridge of this rig's name (idempotent)."""
        prefix = f"{self.name}-n"
        if os.path.isdir(NETNS_DIR):
            for ns in os.listdir(NETNS_DIR):
                if ns.startswith(prefix) and ns[len(prefix):].isdigit():
                    _kill_netns_processes(ns)
                    _ip("netns", "del", ns, check=False)
        for br in (self.mgmt_bridge, self.fabric_bridge):
            _ip("link", "del", br, check=False)
        self.hosts = []

    def __enter__(self) -> Rig:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def describe(self) -> dict:
        return {"name": self.name, "mgmt_bridge": self.mgmt_bridge, "fabric_bridge": self.fabric_bridge,
                "controller_address": self.controller_address if self.controller_ip else None,
                "hosts": [asdict(h) for h in self.hosts]}


def nameservers(resolv: str = "/etc/resolv.conf") -> list[str]:
    """IPv4 nameservers of this machine (shared by every rig namespace)."""
    try:
        lines = Path(resolv).read_text().splitlines()
    except OSError:
        return []
    return [ln.split()[1] for ln in lines if ln.startswith("nameserver") and len(ln.split()) > 1
            and "." in ln.split()[1]]


def _kill_netns_processes(ns: str) -> None:
    r = _ip("netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create the rig (removing an old one of the same name)")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--name", default="ait")
    up.add_argument("--base", type=int, default=213)
    up.add_argument("--mgmt-rate", default="200mbit", help="tc rate of the management network ('' = unthrottled)")
    up.add_argument("--controller-ip", action="store_true")
    down = sub.add_parser("down", help="remove the rig")
    down.add_argument("--name", default="ait")
    ex = sub.add_parser("exec", help="run a command in a host's network namespace")
    ex.add_argument("host")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd in ("up", "down"):
        why = available()
        if why:
            print(f"netns_rig: {why}", file=sys.stderr)
            return 2
    if args.cmd == "up":
        rig = Rig(args.hosts, args.name, args.base, args.mgmt_rate or None, controller_ip=args.controller_ip).up()
        print(json.dumps(rig.describe(), indent=2))
    elif args.cmd == "down":
        Rig(name=args.name).down()
    else:
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        return subprocess.call(["nsenter", f"--net={NETNS_DIR}/{args.host}", *cmd])
    return 0


if __name__ == "__main__":
    sys.exit(main())
