"""bench/fabric_scale.py runs, and its synthetic cluster trips the rules it should
(timing is the benchmark's business, not a test's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from aitrain.fabric import check

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fabric_scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("fabric_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_cluster_findings():
    bench = _bench()
    hosts = bench.synthetic_hosts(50)
    found = {(f.host, f.id) for f in check(hosts, expected_rate_gbps=400, rendezvous="10.0.0.2")}
    assert found == {
        ("node00007", "rdma-port-not-active"), ("node00007", "hosts-active-hca-count-mismatch"),
        ("node00019", "rdma-rate-below-peers"), ("node00019", "rdma-rate-below-expected"),
        ("node00031", "hosts-torch-version-mismatch"), ("node00043", "memlock-limit-low"),
    }


def test_bench_main_runs(capsys):
    bench = _bench()
    bench.main(["--sizes", "8", "16", "--reps", "1"])
    out = capsys.readouterr().out
    assert "growth: 8 -> 16 hosts" in out
