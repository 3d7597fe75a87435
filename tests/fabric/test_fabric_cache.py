"""The per-host cache and preflight (what `aitrain launch` calls)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from aitrain.errors import FabricError
from aitrain.fabric import FabricCache, preflight, probe
from aitrain.fabric.cache import host_key, summarize_errors

import hostbuilder


@pytest.fixture
def host(tmp_path: Path, hosts_dir: Path) -> Path:
    dst = tmp_path / "dgx01"
    shutil.copytree(hosts_dir / "dgx01", dst, symlinks=True)
    return dst


@pytest.fixture
def cache(tmp_path: Path) -> FabricCache:
    return FabricCache(tmp_path / "cache")


def test_second_probe_is_a_cache_hit(host, cache):
    first, hit1 = cache.probe(host)
    second, hit2 = cache.probe(host)
    assert (hit1, hit2) == (False, True)
    assert second == first


def test_port_going_down_misses_the_cache(host, cache):
    cache.probe(host)
    state = next(host.glob("sys/devices/**/infiniband/mlx5_3/ports/1/state"))
    state.write_text("1: DOWN\n")
    topo, hit = cache.probe(host)
    assert not hit and topo.rdma_devices[3].ports[0].state == "DOWN"


def test_mtu_and_address_changes_miss_the_cache(host, cache):
    cache.probe(host)
    (host / "sys/class/net/eno1/mtu").write_text("9000\n")
    assert cache.probe(host)[1] is False
    cache.probe(host)
    with open(host / "proc/net/route", "a") as fh:
        fh.write("eno1\t0000000B\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n")
    assert cache.probe(host)[1] is False


def test_reboot_misses_the_cache(host, cache):
    cache.probe(host)
    (host / "proc/sys/kernel/random/boot_id").write_text("another-boot\n")
    assert cache.probe(host)[1] is False


def test_probe_options_are_part_of_the_key(host):
    assert host_key(host, rendezvous="10.0.0.1") != host_key(host, rendezvous="10.0.0.2")
    assert host_key(host) == host_key(host / "sys")


def test_expired_and_corrupt_entries_are_probed_again(host, tmp_path):
    cache = FabricCache(tmp_path / "c", max_age_s=60)
    cache.probe(host)
    (entry,) = (tmp_path / "c").glob("probe-*.json")
    old = time.time() - 120
    os.utime(entry, (old, old))
    assert cache.probe(host)[1] is False
    entry.write_text("{truncated")
    assert cache.probe(host)[1] is False
    entry.write_text('{"hosts": 3, "nics": "x"}')
    topo, hit = cache.probe(host)
    assert topo is not None


def test_unwritable_cache_dir_does_not_fail(host, tmp_path):
    (tmp_path / "file").write_text("")
    topo, hit = FabricCache(tmp_path / "file" / "cache").probe(host)
    assert topo.hostname == "dgx01" and not hit


def test_check_cache(host, cache):
    from aitrain.fabric.checks import CheckOptions
    from aitrain.fabric.topology import Cluster

    cluster = Cluster(hosts=[probe(host)])
    first, hit1 = cache.check(cluster, CheckOptions(expected_rate_gbps=800))
    second, hit2 = cache.check(cluster, CheckOptions(expected_rate_gbps=800))
    third, hit3 = cache.check(cluster, CheckOptions(expected_rate_gbps=400))
    assert (hit1, hit2, hit3) == (False, True, False)
    assert first == second and len(first) == 8 and third == []


def test_clear(host, cache):
    cache.probe(host)
    assert cache.clear() == 1


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from aitrain.fabric.cache import default_cache_dir

    monkeypatch.setenv("AITRAIN_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "fabric"
    monkeypatch.delenv("AITRAIN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "aitrain" / "fabric"


# --------------------------------------------------------------------------- preflight


def test_preflight_of_this_host(cache):
    # no cache-hit assertion here: other tests create and delete interfaces on this
    # machine, which rightly changes its fingerprint
    result = preflight(cache=cache, on_error="warn")
    assert result.ok and [f.id for f in result.findings] == ["rdma-none"]


def test_preflight_probes_through_the_cache(host, tmp_path):
    class TreeCache(FabricCache):
        def probe(self, sysfs_root="/sys", proc_root="/proc", **kwargs):
            return super().probe(host, None, **kwargs)

    cache = TreeCache(tmp_path / "c")
    a = preflight(cache=cache, on_error="warn", rendezvous="10.0.0.12")
    b = preflight(cache=cache, on_error="warn", rendezvous="10.0.0.12")
    assert (a.probe_cache_hits, b.probe_cache_hits, b.check_cache_hit) == (0, 1, True)
    assert a.cluster.hosts[0].hostname == "dgx01" and a.findings == b.findings == []


def test_preflight_stops_on_errors(broken_dir, cache):
    topo = probe(broken_dir / "port-init")
    with pytest.raises(FabricError) as e:
        preflight([topo], cache=cache)
    text = str(e.value)
    assert "rdma-port-not-active" in text and "port-init01" in text and "fabric.on_error=warn" in text


def test_preflight_warn_returns_the_errors(broken_dir, cache):
    result = preflight([probe(broken_dir / "port-init")], cache=cache, on_error="warn")
    assert not result.ok and [f.id for f in result.errors()] == ["rdma-port-not-active"]


def test_preflight_without_cache(broken_dir):
    result = preflight([probe(broken_dir / "no-peermem")], on_error="warn", use_cache=False)
    assert [f.id for f in result.warnings()] == ["gpudirect-rdma-unavailable"]


def test_preflight_rejects_an_unknown_on_error():
    with pytest.raises(FabricError, match="on_error"):
        preflight([], on_error="maybe")


def test_preflight_accepts_probe_json_from_nodes(hosts_dir, cache):
    from aitrain.fabric.topology import loads_topologies

    outputs = [json.dumps({"hosts": [probe(hosts_dir / n).to_dict()]}) for n in ("dgx01", "dgx02")]
    hosts = [h for out in outputs for h in loads_topologies(out)]
    result = preflight(hosts, cache=cache, rendezvous="10.0.0.11", expected_rate_gbps=400)
    assert result.ok and len(result.cluster) == 2


def test_summary_is_bounded():
    from aitrain.fabric.findings import Finding, Severity

    errors = [Finding(id="x-y", severity=Severity.ERROR, host=f"h{i}", subject="s", message="m", hint="h")
              for i in range(30)]
    text = summarize_errors(errors, 30)
    assert "30 error(s)" in text and "20 more" in text and text.count("[x-y]") == 10


def test_builder_presets_are_independent():
    a = hostbuilder.dgx_h100()
    hostbuilder.port_init(a)
    assert hostbuilder.dgx_h100().pairs[6].hca.ports[0].state == "4: ACTIVE"
