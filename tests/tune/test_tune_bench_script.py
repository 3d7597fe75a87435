"""bench/fabric_tune.py end to end, small: its own 2-host rig, naive vs tuned all_reduce
and raw TCP in one run, JSON out, and nothing left behind (rig, temp dirs, sysctls)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import netns_rig

REPO = Path(__file__).resolve().parents[2]
CC = Path("/proc/sys/net/ipv4/tcp_congestion_control")

pytestmark = [pytest.mark.netns, pytest.mark.slow,
              pytest.mark.skipif(bool(netns_rig.available()), reason=f"needs the netns rig: {netns_rig.available()}")]


def test_bench_script_measures_naive_tuned_and_raw_tcp():
    allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split()
    host_cc = CC.read_text().strip()
    cc = "reno" if "reno" in allowed and host_cc != "reno" else host_cc
    before = set(Path(tempfile.gettempdir()).glob("aitrain-fabric-tune-*"))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "fabric_tune.py"), "--json", "--skip-unset",
                           "--name", "aitfb", "--base", "224", "--size", "4M", "--iters", "2", "--rounds", "1",
                           "--tcp-bytes", "128M", "--tcp-cc", cc],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert (report["naive_interface"], report["tuned_interface"]) == ("eth0", "fab0")
    assert report["tcp_congestion_control"] == cc
    assert report["naive_error"] is None and report["tuned_error"] is None
    assert report["tuned_over_naive"] >= 5, report  # the 200 Mbit/s management network vs the fabric
    assert report["raw_tcp_gbps"] > 0 and report["raw_tcp_bidir_per_direction_gbps"] > 0
    assert "aitfb" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert CC.read_text().strip() == host_cc, "the host's own congestion control must be left alone"
    assert set(Path(tempfile.gettempdir()).glob("aitrain-fabric-tune-*")) == before
