"""Routes and addresses from procfs text, and longest-prefix route lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from aitrain.fabric.probe.fs import Root
from aitrain.fabric.probe.routes import (
    assign_ipv4,
    parse_fib_trie_local,
    parse_if_inet6,
    parse_ipv6_route,
    parse_route,
    read_net_state,
    resolve_address,
)
from aitrain.fabric.topology import Route, lookup_route

# captured from a Debian 12 VM (this repository's CI machine)
ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
ib0\t000010AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth1\t0000000A\t00000000\t0201\t0\t0\t0\t000000FF\t0\t0\t0
"""

IPV6_ROUTE = (  # one route a line: dest plen src plen next-hop metric refcnt use flags device
    "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n"
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0\n"
    "fd000000000000000000000000000002 80 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000000 00000003 00000000 80200001     eth0\n"
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n"
)

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
     |-- 172.16.4.9
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 192.0.2.2
              /32 host LOCAL
"""


def test_parse_route():
    routes, problems = parse_route(ROUTE)
    assert problems == []
    by_dest = {r.destination: r for r in routes}
    assert by_dest["0.0.0.0/0"].gateway == "192.0.2.1"
    assert by_dest["192.0.2.0/24"].interface == "eth0" and by_dest["192.0.2.0/24"].gateway is None
    assert by_dest["172.16.0.0/16"].interface == "ib0"
    assert "10.0.0.0/8" not in by_dest  # RTF_REJECT


def test_parse_route_skips_and_reports_garbage_lines():
    routes, problems = parse_route("Iface\tDestination\neth0 zz 00 1 0 0 0 00\nshort\n")
    assert routes == [] and len(problems) == 2


def test_parse_ipv6_route_drops_local_and_reject():
    routes, problems = parse_ipv6_route(IPV6_ROUTE)
    assert problems == []
    assert [r.destination for r in routes] == ["fd00::/64", "::/0"]
    assert routes[1].gateway == "fd00::1"


def test_fib_trie_local_addresses():
    assert [str(a) for a in parse_fib_trie_local(FIB_TRIE)] == ["127.0.0.1", "192.0.2.2", "172.16.4.9"]


def test_assign_ipv4_picks_the_connected_route():
    routes, _ = parse_route(ROUTE)
    out = assign_ipv4(parse_fib_trie_local(FIB_TRIE), routes)
    assert out == {"lo": ["127.0.0.1/8"], "eth0": ["192.0.2.2/24"], "ib0": ["172.16.4.9/16"]}


def test_if_inet6():
    text = ("fd000000000000000000000000000002 04 40 00 82     eth0\n"
            "00000000000000000000000000000001 01 80 10 80       lo\nbad\n")
    out, problems = parse_if_inet6(text)
    assert out == {"eth0": ["fd00::2/64"], "lo": ["::1/128"]}
    assert len(problems) == 1


@pytest.mark.parametrize("address, iface, gateway", [
    ("192.0.2.77", "eth0", None),
    ("8.8.8.8", "eth0", "192.0.2.1"),
    ("172.16.200.1", "ib0", None),
    ("fd00::99", "eth0", None),
    ("2001:db8::1", "eth0", "fd00::1"),
])
def test_lookup_longest_prefix(address, iface, gateway):
    routes = parse_route(ROUTE)[0] + parse_ipv6_route(IPV6_ROUTE)[0]
    got = lookup_route(address, routes)
    assert (got.interface, got.gateway) == (iface, gateway)


def test_lookup_prefers_lower_metric_on_equal_prefix():
    routes = [Route("10.0.0.0/8", "slow", metric=100), Route("10.0.0.0/8", "fast", metric=10)]
    assert lookup_route("10.1.2.3", routes).interface == "fast"


def test_lookup_without_any_route():
    got = lookup_route("10.1.2.3", [Route("192.168.0.0/16", "eth0")])
    assert got.interface is None and got.method == "procfs"


def test_lookup_own_address_is_local():
    import ipaddress

    got = lookup_route("10.0.0.5", [], {ipaddress.ip_address("10.0.0.5"): "eth3"})
    assert got.local and got.interface == "eth3"


def test_lookup_not_an_address():
    assert lookup_route("node-7", []).method == "none"


def test_read_net_state_on_a_captured_proc(tmp_path: Path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net/route").write_text(ROUTE)
    (tmp_path / "net/fib_trie").write_text(FIB_TRIE)
    (tmp_path / "net/ipv6_route").write_text(IPV6_ROUTE)
    warnings: list = []
    state = read_net_state(Root(tmp_path, warnings))
    assert state.routes_known and warnings == []
    assert state.ipv4["eth0"] == ["192.0.2.2/24"]


def test_read_net_state_without_proc(tmp_path: Path):
    warnings: list = []
    state = read_net_state(Root(tmp_path / "missing", warnings))
    assert not state.routes_known and state.routes == [] and warnings == []


def test_read_net_state_live():
    state = read_net_state(Root("/proc", []))
    assert state.routes_known
    assert "lo" in state.ipv4 or "lo" in state.ipv6


def test_resolve_address():
    assert resolve_address("10.1.2.3") == "10.1.2.3"
    assert resolve_address("localhost") in ("127.0.0.1", "::1")
    assert resolve_address("no-such-host.invalid") is None
