"""The data model: JSON round-trip, fingerprints, GIDs, PCI distance."""

from __future__ import annotations

import json
import re

import pytest

from aitrain.fabric.topology import (
    Cluster,
    Gid,
    HostTopology,
    PciDevice,
    RdmaDevice,
    RdmaPort,
    loads_topologies,
    pci_distance,
)


def test_round_trip_of_a_probed_dgx(dgx):
    data = json.loads(json.dumps(dgx.to_dict()))
    back = HostTopology.from_dict(data)
    assert back == dgx
    assert back.to_dict() == dgx.to_dict()


def test_round_trip_of_a_roce_host(roce):
    assert HostTopology.from_dict(json.loads(json.dumps(roce.to_dict()))) == roce


def test_cluster_round_trip(dgx, roce):
    cluster = Cluster(hosts=[dgx, roce])
    assert Cluster.from_dict(json.loads(json.dumps(cluster.to_dict()))) == cluster


def test_from_dict_ignores_unknown_and_fills_missing_keys():
    topo = HostTopology.from_dict({"hostname": "n1", "future_field": 1,
                                   "rdma_devices": [{"name": "mlx5_0", "ports": [{"port": 1, "extra": 2}]}]})
    assert topo.hostname == "n1"
    assert topo.rdma_devices[0].ports[0].state == "UNKNOWN"
    assert topo.host.kernel is None


def test_from_dict_rejects_non_objects():
    with pytest.raises(ValueError):
        HostTopology.from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("data, where", [
    ({"hostname": 5}, "HostTopology.hostname"),
    ({"nics": "eth0"}, "HostTopology.nics"),
    ({"rdma_devices": [{"ports": [{"rate_gbps": "fast"}]}]}, "RdmaPort.rate_gbps"),
    ({"rdma_devices": [{"ports": [{"port": True}]}]}, "RdmaPort.port"),
    ({"host": {"memlock": {"soft": "lots"}}}, "Limit.soft"),
])
def test_from_dict_names_the_field_with_the_wrong_type(data, where):
    with pytest.raises(ValueError, match=re.escape(where)):
        HostTopology.from_dict(data)


def test_fingerprint_is_stable_and_ignores_warnings(dgx):
    again = HostTopology.from_dict(dgx.to_dict())
    again.warnings = []
    again.sources = {"sysfs_root": "/elsewhere"}
    assert again.fingerprint() == dgx.fingerprint()


def test_fingerprint_changes_with_port_state(dgx):
    changed = HostTopology.from_dict(dgx.to_dict())
    changed.rdma_devices[0].ports[0].state = "DOWN"
    assert changed.fingerprint() != dgx.fingerprint()


def test_loads_topologies_accepts_probe_output_single_host_and_list(dgx):
    one = dgx.to_dict()
    assert len(loads_topologies(json.dumps({"hosts": [one, one]}))) == 2
    assert loads_topologies(json.dumps(one))[0].hostname == dgx.hostname
    assert len(loads_topologies(json.dumps([one]))) == 1
    with pytest.raises(ValueError):
        loads_topologies('{"nothing": 1}')


@pytest.mark.parametrize("gid, link_local, routable, ipv4", [
    ("fe80:0000:0000:0000:0ac0:ebff:feda:1cfb", True, False, None),
    ("0000:0000:0000:0000:0000:ffff:c800:d106", False, True, "200.0.209.6"),
    ("0000:0000:0000:0000:0000:0000:0000:0000", False, False, None),
    ("2001:0db8:0000:0000:0000:0000:0000:0001", False, True, None),
    ("garbage", False, False, None),
])
def test_gid_properties(gid, link_local, routable, ipv4):
    g = Gid(index=0, gid=gid)
    assert (g.is_link_local, g.is_routable, g.ipv4) == (link_local, routable, ipv4)


def test_port_and_device_helpers():
    dev = RdmaDevice(name="mlx5_0", ports=[RdmaPort(port=1, state="ACTIVE", phys_state="LinkUp"),
                                          RdmaPort(port=2, state="DOWN")])
    assert dev.port(2).state == "DOWN" and dev.port(3) is None
    assert [p.port for p in dev.active_ports] == [1]
    assert dev.ports[0].is_link_up and not dev.ports[0].is_roce


def _pci(addr, root, upstream, numa):
    return PciDevice(address=addr, root=root, upstream=upstream, numa_node=numa)


@pytest.mark.parametrize("a, b, expected", [
    (_pci("a", "pci0000:10", ["r", "s", "d1"], 0), _pci("b", "pci0000:10", ["r", "s", "d2"], 0), "same-switch"),
    (_pci("a", "pci0000:10", ["r1"], 0), _pci("b", "pci0000:10", ["r2"], 0), "same-root-complex"),
    (_pci("a", "pci0000:10", ["r1"], 0), _pci("b", "pci0000:20", ["r2"], 0), "same-numa-node"),
    (_pci("a", "pci0000:10", ["r1"], 0), _pci("b", "pci0000:80", ["r2"], 1), "cross-socket"),
    (_pci("a", None, [], None), _pci("b", None, [], None), "unknown"),
])
def test_pci_distance(a, b, expected):
    assert pci_distance(a, b) == expected
    assert pci_distance(b, a) == expected


def test_pci_distance_missing_device():
    assert pci_distance(None, _pci("b", "pci0000:10", [], 0)) == "unknown"


def test_route_to_uses_the_recorded_rendezvous_lookup(dgx):
    from aitrain.fabric.topology import RouteLookup

    topo = HostTopology.from_dict(dgx.to_dict())
    topo.rendezvous = RouteLookup(address="10.9.9.9", interface="eno1", method="ip-route")
    assert topo.route_to("10.9.9.9").method == "ip-route"
    assert topo.route_to("10.0.0.12").interface == "eno1"


def test_probe_is_callable_and_still_the_readers_package(hosts_dir):
    import aitrain.fabric
    import aitrain.fabric.probe.verbs as verbs  # would fail if the function shadowed the package

    assert callable(verbs.read_verbs_devices)
    assert aitrain.fabric.probe(hosts_dir / "cpu01").hostname == "cpu01"
    from aitrain.fabric.probe import probe as probe_function

    assert probe_function(hosts_dir / "cpu01").hostname == "cpu01"
