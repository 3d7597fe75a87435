#!/usr/bin/env python3
"""Naive vs tuned socket interface on the multi-host test rig, in one run.

Builds a 2-host rig of network namespaces (``scripts/netns_rig.py``: eth0 on a
200 Mbit/s management bridge holding the default route, fab0 on an unthrottled
MTU-9000 fabric bridge), then measures, between the same two namespaces:

1. all_reduce busbw at 64 MiB with the *naive* choice: what a setup without tuning
   picks, the interface of the default route (eth0), rendezvous at node 0's address
   there. (With no GLOO_SOCKET_IFNAME at all the job does not even connect: gloo binds
   the hostname's 127.0.0.1; that is reported too.)
2. all_reduce busbw at 64 MiB with the env ``aitrain.fabric.tune`` derives (fab0);
3. raw TCP throughput over the tuned interface: one stream, one direction (what a
   link "can do"), and both directions at once (what a collective's traffic pattern
   gets), measured right before and after (2), averaged.

Ranks run through the node agent (``python -m aitrain.launcher.agent``), one per
namespace, exactly as multi-node launches and ``aitrain fabric bench --netns`` do.

    sudo .venv/bin/python bench/fabric_tune.py [--size 64M] [--iters 5] [--json]

Targets: tuned >= 5x naive, tuned >= 50% of raw TCP (one stream, one direction).

Reading the raw-TCP ratio: the namespaces share this machine's CPUs and the "wire" is
the kernel copying bytes, so the ratio compares gloo's cost per byte with a bare
socket's more than it judges the settings. The report names the CPU count and the
namespaces' TCP congestion control (``--tcp-cc`` sets it in the rig's namespaces only):
on a 2-core VM, bbr (whose pacing is costly there) and reno or cubic give raw one-way
numbers 4x apart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests" / "tune"))

from aitrain.fabric.bench import BenchResult, parse_size  # noqa: E402
from aitrain.fabric.tune import tune  # noqa: E402
from aitrain.launcher.cli.fabric import default_route_address  # noqa: E402
from aitrain.launcher.nodes import apply_tuned, netns_node, probe_node, run_on_nodes  # noqa: E402

import netns_rig  # noqa: E402
from rig_helpers import make_fast_dns_fail  # noqa: E402

_TCP = r"""
import socket, sys, time
role, host, port, total = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if role == "recv":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(1); print("ready", flush=True)
    c, _ = s.accept(); buf = memoryview(bytearray(4 << 20)); n = 0; t0 = None
    while n < total:
        k = c.recv_into(buf)
        if not k: break
        t0 = t0 or time.perf_counter(); n += k
    print(n / (time.perf_counter() - t0) / 1e9, flush=True)
else:
    for _ in range(100):
        try:
            c = socket.create_connection((host, port)); break
        except OSError:
            time.sleep(0.05)
    buf = bytes(4 << 20); sent = 0
    while sent < total:
        c.sendall(buf); sent += len(buf)
    c.close()
"""


def tcp_throughput(pairs: list[tuple[str, str, str]], total: int, port: int) -> list[float]:
    """Raw TCP GB/s of each (sender ns, receiver ns, receiver address) stream, all at once."""
    receivers = []
    for i, (_, dst, addr) in enumerate(pairs):
        p = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{dst}", sys.executable, "-c", _TCP, "recv",
                              addr, str(port + i), str(total)], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        receivers.append(p)
    senders = [subprocess.Popen(["nsenter", f"--net=/var/run/netns/{src}", sys.executable, "-c", _TCP, "send",
                                 addr, str(port + i), str(total)]) for i, (src, _, addr) in enumerate(pairs)]
    for s in senders:
        s.wait(timeout=300)
    return [float(r.communicate(timeout=300)[0].strip()) for r in receivers]


def netns_tcp_cc(rig: netns_rig.Rig, name: str | None) -> str:
    """Set (when ``name``) and return the rig namespaces' TCP congestion control.

    The sysctl is per network namespace: the host's own setting is left alone.
    """
    key = "net.ipv4.tcp_congestion_control"
    for h in rig.hosts:
        if name:
            done = subprocess.run([*h.nsenter(), "sysctl", "-q", "-w", f"{key}={name}"],
                                  capture_output=True, text=True)
            if done.returncode:
                allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split()
                raise SystemExit(f"fabric_tune: cannot set {key}={name} in {h.name}: "
                                 f"{done.stderr.strip()} (allowed here: {' '.join(allowed)})")
    return subprocess.run([*rig.hosts[0].nsenter(), "sysctl", "-n", key], capture_output=True, text=True,
                          check=True).stdout.strip()


def all_reduce_busbw(nodes, size: str, iters: int, run_dir: Path, timeout: float) -> tuple[float | None, str]:
    out = run_dir / "result.json"
    argv = [sys.executable, "-u", "-m", "aitrain.fabric.bench_rank", "--mode", "bench", "--collectives",
            "all_reduce", "--sizes", size, "--iters", str(iters), "--warmup", "1", "--out", str(out),
            "--timeout", f"{timeout:g}"]
    run = run_on_nodes(nodes, argv, timeout=timeout + 30, run_dir=run_dir)
    if not run.ok or not out.exists():
        return None, run.failure()
    row = BenchResult.from_dict(json.loads(out.read_text())).rows[0]
    if not row.correct:
        return None, "all_reduce gave a wrong result"
    return row.busbw_gbps, ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="64M")
    ap.add_argument("--iters", type=int, default=5, help="timed all_reduce iterations per measurement")
    ap.add_argument("--tcp-bytes", default="1G", help="bytes per raw TCP measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved tuned / raw TCP measurements (medians)")
    ap.add_argument("--name", default="aitb")
    ap.add_argument("--base", type=int, default=217)
    ap.add_argument("--skip-unset", action="store_true", help="skip the run without GLOO_SOCKET_IFNAME")
    ap.add_argument("--tcp-cc", metavar="NAME",
                    help="TCP congestion control inside the rig's namespaces (default: the host's; "
                         "one of net.ipv4.tcp_allowed_congestion_control)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    why = netns_rig.available()
    if why:
        print(f"fabric_tune: needs the netns rig: {why}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="aitrain-fabric-tune-"))
    rig = netns_rig.Rig(hosts_count=2, name=args.name, base=args.base)
    report: dict[str, object] = {"size": args.size, "iters": args.iters}
    try:
        rig.up()
        make_fast_dns_fail(rig)
        n1, n2 = rig.hosts
        report["cpus"] = len(os.sched_getaffinity(0))
        report["tcp_congestion_control"] = netns_tcp_cc(rig, args.tcp_cc)
        probes = [probe_node(netns_node(h.name)) for h in rig.hosts]

        # naive: the default route's interface (eth0), rendezvous at node 0's address there
        naive_if = next(r.interface for r in probes[0].routes if r.destination == "0.0.0.0/0")
        # tuned: what aitrain.fabric.tune derives from the probes
        tuned_env = tune(probes)
        omp = tuned_env[n1.name].env.get("OMP_NUM_THREADS", "1")  # same threads: only the network differs
        naive = [netns_node(h.name, default_route_address(p), {"GLOO_SOCKET_IFNAME": naive_if,
                                                                "OMP_NUM_THREADS": omp})
                 for h, p in zip(rig.hosts, probes, strict=True)]
        tuned = [netns_node(h.name, h.mgmt_ip) for h in rig.hosts]
        apply_tuned(tuned, tuned_env, probes)
        tuned_if = tuned_env[n1.name].interface
        report["naive_interface"], report["tuned_interface"] = naive_if, tuned_if

        if not args.skip_unset:
            unset = [netns_node(h.name, default_route_address(p)) for h, p in zip(rig.hosts, probes, strict=True)]
            t0 = time.monotonic()
            bw, err = all_reduce_busbw(unset, "1M", 1, work / "unset", timeout=10)
            short = re.sub(r"\[/[^\]]*\]\s*", "", err.splitlines()[0]) if err else None
            report["unset"] = {"busbw_gbps": bw, "error": short[:200] if short else None,
                               "seconds": round(time.monotonic() - t0, 1)}

        total = parse_size(args.tcp_bytes)
        fab_addr = {n1.name: n1.fabric_ip, n2.name: n2.fabric_ip}
        naive_bw, naive_err = all_reduce_busbw(naive, args.size, max(2, args.iters // 2), work / "naive",
                                               timeout=300)
        # The machine is shared: interleave the tuned runs with the raw TCP runs, take medians.
        uni, bi, tuned_samples, tuned_err = [], [], [], ""
        for r in range(args.rounds):
            uni.extend(tcp_throughput([(n1.name, n2.name, fab_addr[n2.name])], total, 23001 + 10 * r))
            bw, err = all_reduce_busbw(tuned, args.size, args.iters, work / f"tuned{r}", timeout=120)
            if bw is None:
                tuned_err = err
            else:
                tuned_samples.append(bw)
            bi.append(statistics.mean(tcp_throughput(
                [(n1.name, n2.name, fab_addr[n2.name]), (n2.name, n1.name, fab_addr[n1.name])], total,
                23005 + 10 * r)))
        tuned_bw = statistics.median(tuned_samples) if tuned_samples else None
        raw_uni, raw_bi = statistics.median(uni), statistics.median(bi)
        report.update(naive_busbw_gbps=naive_bw, naive_error=naive_err or None, tuned_busbw_gbps=tuned_bw,
                      tuned_error=tuned_err or None, tuned_samples=tuned_samples,
                      raw_tcp_gbps=raw_uni, raw_tcp_samples=uni,
                      raw_tcp_bidir_per_direction_gbps=raw_bi, raw_tcp_bidir_samples=bi,
                      mgmt_rate=rig.mgmt_rate)
        speedup = tuned_bw / naive_bw if tuned_bw and naive_bw else None
        of_raw = tuned_bw / raw_uni if tuned_bw else None
        of_bidir = tuned_bw / raw_bi if tuned_bw else None
        report.update(tuned_over_naive=speedup, tuned_over_raw_tcp=of_raw, tuned_over_raw_tcp_bidir=of_bidir,
                      target_speedup_met=bool(speedup and speedup >= 5),
                      target_raw_met=bool(of_raw and of_raw >= 0.5))
    finally:
        rig.down()
    if report.get("naive_error") or report.get("tuned_error"):
        report["rank_logs"] = str(work)  # kept: they say why a run failed
    else:
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    def gb(x: object) -> str:
        return f"{x:.3f} GB/s" if isinstance(x, float) else "failed"

    print(f"all_reduce busbw at {args.size}, 2 hosts (network namespaces), 1 rank each, gloo on CPU")
    print(f"  ({report['cpus']} CPUs shared by both namespaces; TCP congestion control "
          f"{report['tcp_congestion_control']})")
    if "unset" in report:
        u = report["unset"]
        print(f"  no GLOO_SOCKET_IFNAME           : {gb(u['busbw_gbps'])}"  # type: ignore[index]
              + (f"  ({u['error']})" if u["error"] else ""))  # type: ignore[index]
    print(f"  naive  ({report['naive_interface']}, default route)   : {gb(report['naive_busbw_gbps'])}"
          + (f"  ({report['naive_error']})" if report.get("naive_error") else ""))
    print(f"  tuned  ({report['tuned_interface']}, aitrain tune)    : {gb(report['tuned_busbw_gbps'])}  "
          f"samples {', '.join(f'{x:.3f}' for x in tuned_samples)}"
          + (f"  ({report['tuned_error']})" if report.get("tuned_error") else ""))
    print(f"raw TCP over {report['tuned_interface']} between the same namespaces "
          "(median, interleaved with the tuned runs):")
    print(f"  one stream, one direction        : {gb(report['raw_tcp_gbps'])}  "
          f"samples {', '.join(f'{x:.3f}' for x in uni)}")
    print(f"  both directions at once (each)   : {gb(report['raw_tcp_bidir_per_direction_gbps'])}  "
          f"samples {', '.join(f'{x:.3f}' for x in bi)}")
    sp, raw, bidir = report["tuned_over_naive"], report["tuned_over_raw_tcp"], report["tuned_over_raw_tcp_bidir"]
    print(f"tuned / naive                      : {sp:.1f}x   (target >= 5x: "
          f"{'met' if report['target_speedup_met'] else 'NOT met'})" if sp else "tuned / naive: n/a")
    print(f"tuned / raw TCP (one direction)    : {raw:.0%}   (target >= 50%: "
          f"{'met' if report['target_raw_met'] else 'NOT met'})" if raw else "tuned / raw TCP: n/a")
    if bidir:
        print(f"tuned / raw TCP (both directions)  : {bidir:.0%}")
    if report.get("rank_logs"):
        print(f"rank logs of the failed runs: {report['rank_logs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
