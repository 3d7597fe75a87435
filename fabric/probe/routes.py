"""Addresses and routes from procfs, so a captured ``/proc`` answers "which interface
reaches the rendezvous host" exactly like the live one.

- ``/proc/net/route`` and ``/proc/net/ipv6_route``: the main routing table.
- ``/proc/net/fib_trie``: the host's own IPv4 addresses (``/32 host LOCAL`` leaves);
  each is given to the interface whose connected route contains it.
- ``/proc/net/if_inet6``: IPv6 addresses per interface.

Policy routing (``ip rule``) is not visible in procfs; on the live host
:func:`ip_route_get` asks the kernel itself.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import struct
import subprocess

from aitrain.fabric.probe.fs import Root
from aitrain.fabric.topology import Route, RouteLookup

RTF_UP = 0x1
RTF_GATEWAY = 0x2
RTF_REJECT = 0x200
RTF_LOCAL = 0x80000000  # the local table's own-address entries (ipv6_route lists them)


def _hex_ipv4(text: str) -> ipaddress.IPv4Address:
    """``/proc/net/route`` prints addresses as host-order (little-endian) hex."""
    value = int(text, 16)
    if value > 0xFFFFFFFF:
        raise ValueError("IPv4 hex out of range")
    return ipaddress.IPv4Address(struct.pack("<I", value))


def parse_route(text: str) -> tuple[list[Route], list[str]]:
    """Routes from ``/proc/net/route``, and one problem string per line skipped."""
    routes: list[Route] = []
    problems: list[str] = []
    lines = text.splitlines()
    if lines and lines[0].split() and lines[0].split()[0] == "Iface":
        lines = lines[1:]
    for n, line in enumerate(lines, start=2):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) < 8:
                raise ValueError("too few fields")
            iface, dest, gw, flags, metric, mask = parts[0], parts[1], parts[2], parts[3], parts[6], parts[7]
            fl = int(flags, 16)
            if not fl & RTF_UP or fl & RTF_REJECT:
                continue
            net = ipaddress.IPv4Network(f"{_hex_ipv4(dest)}/{_hex_ipv4(mask)}", strict=False)
            gateway = str(_hex_ipv4(gw)) if fl & RTF_GATEWAY else None
            routes.append(Route(destination=str(net), interface=iface, gateway=gateway, metric=int(metric)))
        except ValueError as e:
            problems.append(f"line {n}: {e}")
    return routes, problems


def _hex_ipv6(text: str) -> ipaddress.IPv6Address:
    if len(text) != 32:
        raise ValueError("IPv6 hex must be 32 digits")
    return ipaddress.IPv6Address(bytes.fromhex(text))


def parse_ipv6_route(text: str) -> tuple[list[Route], list[str]]:
    """Routes from ``/proc/net/ipv6_route`` (reject and local-table entries dropped)."""
    routes: list[Route] = []
    problems: list[str] = []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) < 10:
                raise ValueError("too few fields")
            dest, plen, nexthop, metric, flags, iface = parts[0], parts[1], parts[4], parts[5], parts[8], parts[9]
            fl = int(flags, 16)
            if not fl & RTF_UP or fl & (RTF_REJECT | RTF_LOCAL) or iface == "lo":
                continue
            prefix = int(plen, 16)
            if prefix > 128:
                raise ValueError("prefix length > 128")
            net = ipaddress.IPv6Network(f"{_hex_ipv6(dest)}/{prefix}", strict=False)
            hop = _hex_ipv6(nexthop)
            gateway = str(hop) if int(hop) else None
            routes.append(Route(destination=str(net), interface=iface, gateway=gateway, metric=int(metric, 16)))
        except ValueError as e:
            problems.append(f"line {n}: {e}")
    return routes, problems


def parse_if_inet6(text: str) -> tuple[dict[str, list[str]], list[str]]:
    """``/proc/net/if_inet6`` -> {ifname: ["fe80::1/64", ...]}."""
    out: dict[str, list[str]] = {}
    problems: list[str] = []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) < 6:
                raise ValueError("too few fields")
            addr = _hex_ipv6(parts[0])
            prefix = int(parts[2], 16)
            if prefix > 128:
                raise ValueError("prefix length > 128")
            out.setdefault(parts[5], []).append(f"{addr}/{prefix}")
        except ValueError as e:
            problems.append(f"line {n}: {e}")
    return out, problems


def parse_fib_trie_local(text: str) -> list[ipaddress.IPv4Address]:
    """The host's own IPv4 addresses: leaves followed by a ``/32 host LOCAL`` line."""
    found: dict[ipaddress.IPv4Address, None] = {}  # ordered, and linear on a huge trie
    leaf: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            leaf = stripped[3:].strip()
        elif leaf and stripped.startswith("/32") and stripped.split()[-1:] == ["LOCAL"] and " host " in f" {stripped} ":
            try:
                addr = ipaddress.IPv4Address(leaf)
            except ValueError:
                continue
            found.setdefault(addr)
    return list(found)


def assign_ipv4(addresses: list[ipaddress.IPv4Address], routes: list[Route]) -> dict[str, list[str]]:
    """Gives each local address to the interface of the narrowest connected route
    containing it (``10.0.0.5`` + ``10.0.0.0/24 dev eth0`` -> eth0: ``10.0.0.5/24``)."""
    out: dict[str, list[str]] = {}
    # prefix length -> network -> the first connected route to it: a lookup per address
    # costs at most 32 probes, however many routes and addresses a table holds
    by_len: dict[int, dict[int, Route]] = {}
    for r in routes:
        net = r.network
        if r.gateway is None and net is not None and net.version == 4 and net.prefixlen > 0:
            by_len.setdefault(net.prefixlen, {}).setdefault(int(net.network_address), r)
    lengths = sorted(by_len, reverse=True)
    for addr in addresses:
        if addr.is_loopback:
            out.setdefault("lo", []).append(f"{addr}/8")
            continue
        value = int(addr)
        for length in lengths:
            best = by_len[length].get(value & (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF)
            if best is not None:
                out.setdefault(best.interface, []).append(f"{addr}/{length}")
                break
    return out


class NetState:
    """Routes and addresses read from one procfs root."""

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.routes_known = False
        self.ipv4: dict[str, list[str]] = {}
        self.ipv6: dict[str, list[str]] = {}


def read_net_state(proc: Root) -> NetState:
    state = NetState()
    for rel, parse in (("net/route", parse_route), ("net/ipv6_route", parse_ipv6_route)):
        text = proc.read_text(rel)
        if text is None:
            continue
        routes, problems = parse(text)
        _warn_skipped(proc, rel, problems)
        state.routes.extend(routes)
        state.routes_known = True
    trie = proc.read_text("net/fib_trie")
    if trie is not None:
        state.ipv4 = assign_ipv4(parse_fib_trie_local(trie), state.routes)
    inet6 = proc.read_text("net/if_inet6")
    if inet6 is not None:
        state.ipv6, problems = parse_if_inet6(inet6)
        _warn_skipped(proc, "net/if_inet6", problems)
    return state


MAX_LINE_WARNINGS = 5


def _warn_skipped(proc: Root, rel: str, problems: list[str]) -> None:
    """A few skipped lines by number, then how many more: a garbage table is one
    problem, not one warning per line."""
    for p in problems[:MAX_LINE_WARNINGS]:
        proc.warn(proc.join(rel), f"skipped {p}")
    if len(problems) > MAX_LINE_WARNINGS:
        proc.warn(proc.join(rel), f"skipped {len(problems) - MAX_LINE_WARNINGS} more lines")


def ip_route_get(address: str, timeout: float = 5.0) -> RouteLookup | None:
    """Asks the live kernel (``ip -j route get``): honours policy routing. None if
    ``ip`` is missing or fails."""
    ip = shutil.which("ip")
    if ip is None:
        return None
    try:
        out = subprocess.run(
            [ip, "-j", "route", "get", address],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return RouteLookup(address=address, interface=None, method="ip-route")
    try:
        data = json.loads(out.stdout)
        entry = data[0] if isinstance(data, list) and data else {}
    except (ValueError, IndexError):
        return None
    dev = entry.get("dev")
    local = entry.get("type") == "local" or dev == "lo"
    return RouteLookup(
        address=address,
        interface=dev,
        gateway=entry.get("gateway"),
        source=entry.get("prefsrc"),
        local=local,
        method="ip-route",
    )


def resolve_address(name: str) -> str | None:
    """An IP literal stays as it is; a host name is resolved (first address), or None."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return str(sockaddr[0])
    return None
