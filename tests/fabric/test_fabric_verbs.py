"""The pyverbs reader: the real bindings where importable (no devices here), and a fake
libibverbs built from a synthetic tree to prove sysfs and pyverbs agree."""

from __future__ import annotations

import types

import pytest

from aitrain.fabric import probe
from aitrain.fabric.probe import parse
from aitrain.fabric.probe.fs import Root
from aitrain.fabric.probe.infiniband import read_rdma_devices
from aitrain.fabric.probe.verbs import (
    MTU_BYTES,
    SPEED_GBPS,
    WIDTH_LANES,
    disagreements,
    load_pyverbs,
    merge,
    rate_gbps,
    read_verbs_devices,
)
from aitrain.fabric.topology import RdmaDevice

# --------------------------------------------------------------------------- real pyverbs

pyverbs = load_pyverbs()
needs_pyverbs = pytest.mark.skipif(pyverbs is None, reason="pyverbs not importable (apt-get install python3-pyverbs; "
                                                           "scripts/expose_pyverbs.py)")


def _live_device_count() -> int:
    if pyverbs is None:
        return 0
    try:
        return len(pyverbs.get_device_list())
    except Exception:
        return 0


@needs_pyverbs
def test_real_pyverbs_without_devices_reports_zero_devices():
    result = read_verbs_devices()
    if _live_device_count():
        pytest.skip("this machine has RDMA devices")
    assert result.status == "no-devices" and result.devices == [] and result.warnings == []


@needs_pyverbs
def test_live_probe_records_the_pyverbs_status():
    topo = probe()
    assert topo.sources["pyverbs"] == ("ok" if _live_device_count() else "no-devices")


@pytest.mark.skipif(_live_device_count() == 0, reason="no RDMA devices on this machine")
def test_sysfs_and_pyverbs_agree_on_the_live_devices():
    sysfs = read_rdma_devices(Root("/sys", []), probe(pyverbs=False).nics)
    verbs = read_verbs_devices()
    assert verbs.status == "ok"
    assert disagreements(sysfs, verbs.devices) == []


def test_unimportable_pyverbs(monkeypatch):
    import aitrain.fabric.probe.verbs as v

    monkeypatch.setattr(v, "load_pyverbs", lambda: None)
    assert read_verbs_devices().status == "unavailable"


# --------------------------------------------------------------------------- a fake libibverbs

STATE_CODES = {v: k for k, v in parse.PORT_STATES.items()}
PHYS_CODES = {v: k for k, v in parse.PHYS_STATES.items()}
MTU_CODES = {v: k for k, v in MTU_BYTES.items()}
LINK_CODES = {"InfiniBand": 1, "Ethernet": 2}
GID_CODES = {"IB/RoCE v1": 0, "RoCE v2": 2}


def _width_speed(rate: float) -> tuple[int, int]:
    for w, lanes in WIDTH_LANES.items():
        for s, per_lane in SPEED_GBPS.items():
            if lanes == 4 and lanes * per_lane == rate:
                return w, s
    raise AssertionError(rate)


class FakeGidEntry:
    def __init__(self, port: int, index: int, gid: str, gtype: str):
        self.port_num, self.gid_index, self._gid = port, index, gid
        self.gid_type, self.ndev_ifindex = GID_CODES[gtype], 0

    def gid_str(self) -> str:
        return self._gid


def fake_pyverbs(devices: list[RdmaDevice], *, fail_list: bool = False, gid_table: bool = True) -> types.ModuleType:
    """A stand-in for ``pyverbs.device`` answering from ``devices``."""
    mod = types.ModuleType("fake_pyverbs")
    by_name = {d.name: d for d in devices}

    class Context:
        def __init__(self, name: str):
            self.dev = by_name[name]

        def query_device(self):
            d = self.dev
            return types.SimpleNamespace(
                fw_version=d.fw_ver, node_guid=d.node_guid, vendor_id=0x02C9,
                vendor_part_id=int(d.hca_type[2:]) if d.hca_type else 0, phys_port_cnt=len(d.ports))

        def query_port(self, n: int):
            p = self.dev.port(n)
            w, s = _width_speed(p.rate_gbps)
            return types.SimpleNamespace(
                state=STATE_CODES[p.state], phys_state=PHYS_CODES[p.phys_state], active_width=w, active_speed=s,
                link_layer=LINK_CODES[p.link_layer], active_mtu=MTU_CODES[p.active_mtu or 4096],
                max_mtu=MTU_CODES[4096], lid=1, gid_tbl_len=16)

        def query_gid_table(self, max_entries: int):
            if not gid_table:
                raise RuntimeError("Operation not supported")
            return [FakeGidEntry(p.port, g.index, g.gid, g.type) for p in self.dev.ports for g in p.gids]

        def query_gid(self, port: int, index: int):
            gids = {g.index: g.gid for g in self.dev.port(port).gids}
            return gids.get(index, "0000:0000:0000:0000:0000:0000:0000:0000")

        def query_gid_type(self, port: int, index: int):
            return next(GID_CODES[g.type] for g in self.dev.port(port).gids if g.index == index)

        def close(self):
            pass

    def get_device_list():
        if fail_list:
            raise RuntimeError("Failed to get devices list")  # what PyverbsRDMAError says
        return [types.SimpleNamespace(name=name.encode()) for name in by_name]

    mod.Context = Context
    mod.get_device_list = get_device_list
    mod.guid_format = lambda v: v
    return mod


@pytest.mark.parametrize("host", ["dgx01", "roce01"])
@pytest.mark.parametrize("gid_table", [True, False])
def test_sysfs_and_verbs_readers_agree_on_the_same_devices(hosts_dir, host, gid_table):
    topo = probe(hosts_dir / host)
    result = read_verbs_devices(fake_pyverbs(topo.rdma_devices, gid_table=gid_table))
    assert result.status == "ok" and len(result.devices) == len(topo.rdma_devices)
    assert disagreements(topo.rdma_devices, result.devices) == []
    port = result.devices[0].ports[0]
    assert port.max_mtu == 4096 and port.active_mtu == 4096 and port.gids_known


def test_disagreements_are_named(hosts_dir):
    topo = probe(hosts_dir / "roce01")
    verbs_view = [RdmaDevice.from_dict(d.to_dict()) for d in topo.rdma_devices]
    verbs_view[0].ports[0].state = "DOWN"
    verbs_view[1].ports[0].gids.pop()
    verbs_view.append(RdmaDevice(name="mlx5_9"))
    problems = disagreements(topo.rdma_devices, verbs_view)
    assert "mlx5_0/1: sysfs says state=ACTIVE, pyverbs says DOWN" in problems
    assert any(p.startswith("mlx5_1/1: GID[3]") and p.endswith("only in sysfs") for p in problems)
    assert "mlx5_9: only in pyverbs" in problems


def test_merge_fills_the_active_mtu_sysfs_lacks(hosts_dir):
    topo = probe(hosts_dir / "dgx01")
    verbs_view = [RdmaDevice.from_dict(d.to_dict()) for d in topo.rdma_devices]
    for dev in verbs_view:
        dev.ports[0].active_mtu = 4096
    warnings: list = []
    merged = merge(topo.rdma_devices, verbs_view, warnings)
    assert warnings == []
    assert {p.active_mtu for d in merged for p in d.ports} == {4096}
    assert {d.source for d in merged} == {"sysfs+pyverbs"}


def test_merge_adds_devices_only_verbs_sees():
    warnings: list = []
    merged = merge([], [RdmaDevice(name="mlx5_0", source="pyverbs")], warnings)
    assert [d.name for d in merged] == ["mlx5_0"] and warnings[0].kind == "sysfs-verbs-mismatch"


def test_no_devices_from_a_failing_device_list():
    result = read_verbs_devices(fake_pyverbs([], fail_list=True))
    assert (result.status, result.devices) == ("no-devices", [])
    assert read_verbs_devices(fake_pyverbs([])).status == "no-devices"


def test_a_device_that_cannot_be_opened_is_a_warning(hosts_dir):
    topo = probe(hosts_dir / "dgx01")
    mod = fake_pyverbs(topo.rdma_devices[:1])
    real = mod.get_device_list
    mod.get_device_list = lambda: real() + [types.SimpleNamespace(name=b"ghost")]
    result = read_verbs_devices(mod)
    assert len(result.devices) == 1 and result.warnings[0].path == "pyverbs:ghost"


@pytest.mark.parametrize("width, speed, expected", [(2, 128, 400.0), (2, 64, 200.0), (2, 32, 100.0), (1, 32, 25.0),
                                                    (16, 128, 200.0), (2, 16, 56.0), (2, 999, None)])
def test_rate_from_width_and_speed(width, speed, expected):
    assert rate_gbps(width, speed) == expected
