"""Topology fingerprints, stored profiles, and the coordinate search with a fake bench."""

from __future__ import annotations

import copy

from test_tune_rules import rig_host, roce_cluster

from aitrain.fabric.profiles import Profile, ProfileStore, cluster_fingerprint
from aitrain.fabric.search import Dimension, coordinate_search, dimensions, env_for, interface_candidates
from aitrain.fabric.topology import Cluster
from aitrain.fabric.tune import tune


def test_fingerprint_ignores_identity_but_not_shape():
    a = [rig_host(1), rig_host(2)]
    b = copy.deepcopy(a)
    for h in b:
        h.hostname += "-other"
        h.host.boot_id = "x"
    assert cluster_fingerprint(a) == cluster_fingerprint(b)
    assert cluster_fingerprint(a) == cluster_fingerprint(list(reversed(a)))
    c = copy.deepcopy(a)
    c[1].nic("fab0").operstate = "down"
    assert cluster_fingerprint(c) != cluster_fingerprint(a)
    assert cluster_fingerprint(a[:1]) != cluster_fingerprint(a)


def test_store_round_trip_and_match(tmp_path):
    hosts = [rig_host(1), rig_host(2)]
    store = ProfileStore(tmp_path)
    assert store.find(hosts) is None
    fp = cluster_fingerprint(hosts)
    store.save(Profile(fingerprint=fp, env={"NCCL_BUFFSIZE": "8388608"}, interface="fab0", summary="x"))
    got = store.find(hosts)
    assert got is not None and got.env == {"NCCL_BUFFSIZE": "8388608"} and got.created > 0
    (tmp_path / f"{fp}.json").write_text("{garbage")
    assert store.find(hosts) is None


def test_tune_applies_a_matching_profile_below_user_env(tmp_path, monkeypatch):
    monkeypatch.setenv("AITRAIN_CACHE_DIR", str(tmp_path))
    hosts = [rig_host(1), rig_host(2)]
    ProfileStore().save(Profile(fingerprint=cluster_fingerprint(hosts), interface="eth0",
                                env={"NCCL_MIN_CTAS": "4", "NCCL_ALGO": "Tree", "NCCL_BUFFSIZE": "1"},
                                summary="(measured)"))
    t = tune(hosts, profile="auto", user_env={"NCCL_BUFFSIZE": "2"})["n2"]
    assert t.env["GLOO_SOCKET_IFNAME"] == "eth0" and t.reasons["GLOO_SOCKET_IFNAME"].startswith("profile")
    assert t.env["NCCL_MIN_CTAS"] == "4"
    assert "NCCL_ALGO" not in t.env  # debug-only: never from a profile
    assert t.env["NCCL_BUFFSIZE"] == "2"
    assert tune(hosts, profile=None)["n2"].env["GLOO_SOCKET_IFNAME"] == "fab0"


def test_interface_candidates_and_dimensions():
    cluster = Cluster(hosts=[rig_host(1), rig_host(2)])
    assert interface_candidates(cluster) == ["fab0", "eth0"]
    tuned = tune(cluster)
    dims = dimensions(cluster, tuned)
    assert [d.name for d in dims] == ["interface"]  # gloo on CPU: only the interface matters
    dims = dimensions(cluster, tuned, backend="nccl")
    assert {"NCCL_SOCKET_NTHREADS", "NCCL_NSOCKS_PERTHREAD", "NCCL_BUFFSIZE"} <= {d.name for d in dims}
    rdma = roce_cluster(nccl="2.21.5")
    assert "NCCL_IB_QPS_PER_CONNECTION" in {d.name for d in dimensions(Cluster(hosts=rdma), tune(rdma),
                                                                         backend="nccl")}


def test_env_for_a_candidate():
    cluster = Cluster(hosts=[rig_host(1), rig_host(2)])
    tuned = tune(cluster)
    env = env_for(cluster, tuned, {"interface": "eth0", "NCCL_BUFFSIZE": "8"})
    assert env["n2"]["GLOO_SOCKET_IFNAME"] == "eth0" and env["n2"]["NCCL_SOCKET_IFNAME"] == "=eth0"
    assert env["n1"]["NCCL_BUFFSIZE"] == "8"
    assert tuned["n2"].env["GLOO_SOCKET_IFNAME"] == "fab0"  # not modified


def test_coordinate_search_keeps_only_clear_winners():
    speed = {("fab0", None): 1.0, ("eth0", None): 0.02, ("fab0", "8"): 1.02, ("fab0", "16"): 1.5}

    def measure(s):
        if s.get("NCCL_BUFFSIZE") == "boom":
            raise RuntimeError("rank died")
        return speed[(s["interface"], s.get("NCCL_BUFFSIZE"))]

    dims = [Dimension("interface", ["fab0", "eth0"]), Dimension("NCCL_BUFFSIZE", [None, "8", "boom", "16"])]
    res = coordinate_search(dims, measure, start={"interface": "fab0"})
    assert res.best == {"interface": "fab0", "NCCL_BUFFSIZE": "16"}
    assert res.env == {"NCCL_BUFFSIZE": "16"} and res.interface == "fab0"
    assert res.baseline_busbw_gbps == 1.0 and res.best_busbw_gbps == 1.5
    assert any(t.error for t in res.trials)


def test_search_picks_the_faster_network_over_the_ranked_one():
    res = coordinate_search([Dimension("interface", ["fab0", "eth0"])],
                            lambda s: {"fab0": 0.3, "eth0": 0.9}[s["interface"]], start={"interface": "fab0"})
    assert res.interface == "eth0"
