"""Truncated, empty, binary and nonsense input: warnings naming the file, never a crash.
Hypothesis fuzzes every parser over file contents and whole trees."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aitrain.fabric import check, probe
from aitrain.fabric.probe import parse, tools
from aitrain.fabric.probe.fs import Root
from aitrain.fabric.probe.pathmap import materialize
from aitrain.fabric.probe.pci import parse_acs_ctrl
from aitrain.fabric.probe.routes import (
    parse_fib_trie_local,
    parse_if_inet6,
    parse_ipv6_route,
    parse_route,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TREE = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# text that looks like sysfs attributes, plus anything at all
attr_text = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"\A-?\d{1,6}(: [A-Za-z_ ]{0,20})?\n{0,2}\Z"),
    st.from_regex(r"\A\d{1,4}(\.\d)? (Gb/sec|GT/s)( \(\d+X [A-Z]+\))?( PCIe)?\Z"),
    st.from_regex(r"\A[0-9a-f:]{0,45}\n?\Z"),
)

ONE_VALUE_PARSERS = [
    parse.parse_port_state, parse.parse_phys_state, parse.parse_rate_gbps, parse.parse_link_layer,
    parse.parse_gid, parse.parse_gid_type, parse.parse_int, parse.parse_hex, parse.parse_numa_node,
    parse.parse_mtu, parse.parse_speed_mbps, parse.parse_mac, parse.parse_pci_speed, parse.parse_pci_width,
    parse.parse_cpulist, parse.parse_bdf, parse.parse_size, parse.parse_kernel_version,
    parse.parse_nvidia_driver, parse.parse_limits,
]


@FAST
@given(text=attr_text)
def test_parsers_return_or_raise_value_error(text):
    for parser in ONE_VALUE_PARSERS:
        try:
            parser(text)
        except ValueError:
            pass


TOTAL_PARSERS = [
    parse.parse_meminfo, parse.parse_shm_size, parse.parse_modules, parse.cpuinfo_has_hypervisor_flag,
    parse_route, parse_ipv6_route, parse_if_inet6, parse_fib_trie_local,
    tools.parse_ibv_devinfo, tools.parse_ibstat, tools.parse_ibstatus, tools.parse_pyverbs_port,
]

multiline = st.lists(st.one_of(attr_text, st.sampled_from([
    "CA 'mlx5_0'", "\tPort 1:", "\t\tState: Active", "\t\tRate: 400", "hca_id: mlx5_0", "\tport:\t1",
    "\t\tGID[  3]:\t\t::ffff:10.0.0.1, RoCE v2", "Infiniband device 'mlx5_0' port 1 status:",
    "     |-- 10.0.0.1", "        /32 host LOCAL", "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0",
    "Active MTU : 1024 (3)", "Ative speed : 25.0 Gbps (32)", "Active width : 4X (2)",
])), max_size=20).map("\n".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=multiline)
def test_multiline_parsers_never_raise(text):
    for parser in TOTAL_PARSERS:
        parser(text)


@FAST
@given(data=st.binary(max_size=600))
def test_acs_parser_on_any_bytes(data):
    value = parse_acs_ctrl(data)
    assert value is None or 0 <= value <= 0xFFFF


def test_acs_parser_survives_a_capability_loop():
    import struct

    cfg = bytearray(4096)
    cfg[0x100:0x104] = struct.pack("<I", 0x0001 | (0x100 << 20))  # points at itself
    assert parse_acs_ctrl(bytes(cfg)) is None


# --------------------------------------------------------------------------- Root helper


@pytest.mark.parametrize("content, value, warned", [
    (b"4: ACTIVE\n", "4: ACTIVE", False),
    (b"4: ACTIVE", "4: ACTIVE", False),  # no trailing newline
    (b"InfiniBand\n\n", "InfiniBand", False),  # a trailing blank line
    (b"", None, True),
    (b"\n", None, True),
    (b"a\nb\n", "a", True),
    (b"x\x00y", "xy", True),
    (b"\xff\xfe", "\ufffd\ufffd", True),
])
def test_read_value(tmp_path, content, value, warned):
    (tmp_path / "attr").write_bytes(content)
    warnings: list = []
    assert Root(tmp_path, warnings).read_value("attr") == value
    assert bool(warnings) is warned
    assert all(w.path == str(tmp_path / "attr") for w in warnings)


def test_directory_where_a_file_should_be(tmp_path):
    (tmp_path / "attr").mkdir()
    warnings: list = []
    assert Root(tmp_path, warnings).read_value("attr") is None
    assert warnings[0].kind == "unreadable-file"


def test_file_where_a_directory_should_be(tmp_path):
    (tmp_path / "class").write_text("x")
    warnings: list = []
    assert Root(tmp_path, warnings).listdir("class") == []
    assert warnings and warnings[0].path.endswith("class")


def test_missing_optional_files_are_silent(tmp_path):
    warnings: list = []
    root = Root(tmp_path, warnings)
    assert root.read_value("nope") is None and root.listdir("nope") == [] and warnings == []


# --------------------------------------------------------------------------- whole trees


def test_every_file_of_a_host_empty_at_once(tmp_path, hosts_dir):
    shutil.copytree(hosts_dir / "roce01", tmp_path / "h", symlinks=True)
    for path in (tmp_path / "h").rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.write_bytes(b"")
    topo = probe(tmp_path / "h")
    findings = check(topo, rendezvous="10.0.0.1", expected_rate_gbps=100)
    assert topo.warnings and all(f.id for f in findings)


def test_truncated_ports_directory(tmp_path, hosts_dir):
    shutil.copytree(hosts_dir / "roce01", tmp_path / "h", symlinks=True)
    for port in (tmp_path / "h").glob("sys/devices/**/infiniband/*/ports/1"):
        shutil.rmtree(port)
        port.mkdir()
    topo = probe(tmp_path / "h")
    assert all(p.state == "UNKNOWN" for _, p in topo.rdma_ports())
    assert any(w.message == "is missing" for w in topo.warnings)
    check(topo)


def test_dangling_symlinks(tmp_path, hosts_dir):
    shutil.copytree(hosts_dir / "roce01", tmp_path / "h", symlinks=True)
    shutil.rmtree(next((tmp_path / "h").glob("sys/devices/pci0000:10")))
    topo = probe(tmp_path / "h")
    assert len(topo.rdma_devices) == 1 and len(topo.gpus) == 3
    check(topo)


@pytest.fixture(scope="module")
def fuzz_host(tmp_path_factory, hosts_dir):
    dst = tmp_path_factory.mktemp("fuzz") / "roce01"
    shutil.copytree(hosts_dir / "roce01", dst, symlinks=True)
    files = sorted(str(p.relative_to(dst)) for p in dst.rglob("*")
                   if p.is_file() and not p.is_symlink() and p.name != "config")
    return dst, files


@TREE
@given(data=st.data())
def test_fuzz_any_file_of_a_host_tree(fuzz_host, data):
    root, files = fuzz_host
    chosen = data.draw(st.lists(st.sampled_from(files), min_size=1, max_size=4, unique=True))
    contents = data.draw(st.lists(st.one_of(attr_text.map(str.encode), st.binary(max_size=64)),
                                  min_size=len(chosen), max_size=len(chosen)))
    saved = {rel: (root / rel).read_bytes() for rel in chosen}
    try:
        for rel, content in zip(chosen, contents, strict=True):
            (root / rel).write_bytes(content)
        topo = probe(root, rendezvous="192.168.1.7")
        check(topo, rendezvous="192.168.1.7", expected_rate_gbps=100)
        type(topo).from_dict(topo.to_dict())
    finally:
        for rel, content in saved.items():
            (root / rel).write_bytes(content)


@TREE
@given(paths=st.dictionaries(
    st.from_regex(r"\A/sys/(class/(net|infiniband)/[a-z0-9_]{1,6}|bus/pci/devices/0000:0[0-9]:00\.0/"
                  r"(infiniband/mlx5_[0-3]|net/ib[0-3]))/[a-z_/0-9]{1,20}\Z"),
    attr_text, max_size=12))
def test_fuzz_path_maps(tmp_path_factory, paths):
    root = materialize(paths, tmp_path_factory.mktemp("map"))
    check(probe(root))


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False),
                        st.text(max_size=12), st.just([]), st.just({}))


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj[:3]):
            yield from _leaves(v, path + (i,))
    else:
        yield path


@TREE
@given(data=st.data())
def test_fuzz_probe_json(roce, data):
    import copy

    from aitrain.fabric.topology import HostTopology

    doc = roce.to_dict()
    leaves = list(_leaves(doc))
    mutated = copy.deepcopy(doc)
    for path in data.draw(st.lists(st.sampled_from(leaves), min_size=1, max_size=5)):
        target = mutated
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = data.draw(json_scalar)
    try:
        topo = HostTopology.from_dict(mutated)
    except ValueError:
        return
    check([topo, roce], rendezvous="192.168.1.7", expected_rate_gbps=100)
