"""How `aitrain.fabric.check` scales with the number of hosts.

Synthetic DGX-like hosts (8 GPUs, 8 x 400G InfiniBand HCAs with GID tables, IPoIB and a
management NIC, PCIe bridges, routes, software versions); about 1 host in 50 carries a
fault (a port down, a slow port, a torch version mismatch, a low memlock) so the rules
produce findings as they would on a real cluster. Each size is timed best-of-N; hosts
are generated before the clock starts.

    python bench/fabric_scale.py [--sizes 64 512 4096] [--reps 3]

Targets: 4096 hosts in under 2 s, and cost growing linearly: from one size to the next
the time per host may at most double (a quadratic check would grow it 8x per 8x more
hosts). Also reported: the ratio to a baseline measured in the same run, one plain pass
touching every port of every host (the least any check must do); that baseline's own
time per host grows with the size too, as the hosts stop fitting in the CPU caches.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import sys
import time
from collections.abc import Callable

from aitrain.fabric import check
from aitrain.fabric.topology import (
    Gid,
    Gpu,
    HostInfo,
    HostTopology,
    Limit,
    Nic,
    NumaNode,
    PciDevice,
    RdmaDevice,
    RdmaPort,
    Route,
)

TARGET_S = 2.0
LINEAR_FACTOR = 2.0


def template_host() -> HostTopology:
    topo = HostTopology(hostname="template", routes_known=True)
    topo.host = HostInfo(
        kernel="6.1.0-18-amd64", cpus=224, cpulist="0-223", mem_total_kib=2_113_764_000,
        numa_nodes=[NumaNode(id=0, cpulist="0-55,112-167", cpus=112),
                    NumaNode(id=1, cpulist="56-111,168-223", cpus=112)],
        memlock=Limit(None, None), nofile=Limit(1048576, 1048576), shm_bytes=1 << 40, hypervisor="none",
        kernel_modules=["ib_core", "mlx5_ib", "nvidia", "nvidia_peermem"], nvidia_peermem=True, dmabuf=False,
        driver_version="550.54.15", torch_version="2.4.0+cu121", cuda_version="12.1", nccl_version="2.20.5",
    )
    topo.nics.append(Nic(name="eno1", kind="physical", operstate="up", mtu=1500, ipv4=["10.0.0.11/24"],
                         driver="igb", pci_address="0000:e1:00.0", numa_node=0))
    topo.routes = [Route("0.0.0.0/0", "eno1", "10.0.0.1"), Route("10.0.0.0/16", "eno1")]
    for i in range(8):
        base = 0x10 * (i + 1)
        numa = i // 4
        nic_bdf, gpu_bdf = f"0000:{base + 4:02x}:00.0", f"0000:{base + 3:02x}:00.0"
        bridges = [f"0000:{base:02x}:01.0", f"0000:{base + 1:02x}:00.0"]
        gids = [Gid(index=0, gid=f"fe80:0000:0000:0000:946d:ae03:00cd:{0xe700 + i:04x}", type="IB/RoCE v1")]
        port = RdmaPort(port=1, state="ACTIVE", phys_state="LinkUp", rate_gbps=400.0, rate_text="400 Gb/sec (4X NDR)",
                        link_layer="InfiniBand", active_mtu=4096, max_mtu=4096, netdev=f"ibp{i}s0", gids=gids,
                        gids_known=True)
        topo.rdma_devices.append(RdmaDevice(name=f"mlx5_{i}", hca_type="MT4129", fw_ver="28.39.1002",
                                            node_guid=f"946d:ae03:00cd:{0xe700 + i:04x}", pci_address=nic_bdf,
                                            numa_node=numa, netdevs=[f"ibp{i}s0"], ports=[port]))
        topo.nics.append(Nic(name=f"ibp{i}s0", kind="ipoib", operstate="up", mtu=2044, ipv4=[f"172.16.{i}.1/24"],
                             pci_address=nic_bdf, numa_node=numa, link_type=32))
        topo.routes.append(Route(f"172.16.{i}.0/24", f"ibp{i}s0"))
        topo.gpus.append(Gpu(index=i, vendor="nvidia", pci_address=gpu_bdf, numa_node=numa))
        for address, role, upstream in (
            (gpu_bdf, "gpu", bridges + [f"0000:{base + 2:02x}:00.0"]),
            (nic_bdf, "nic", bridges + [f"0000:{base + 2:02x}:01.0"]),
        ):
            topo.pci_devices.append(PciDevice(address=address, role=role, numa_node=numa, current_speed_gts=32.0,
                                              current_width=16, max_speed_gts=32.0, max_width=16,
                                              root=f"pci0000:{base:02x}", upstream=upstream))
        for bridge in bridges + [f"0000:{base + 2:02x}:00.0", f"0000:{base + 2:02x}:01.0"]:
            topo.pci_devices.append(PciDevice(address=bridge, role="bridge", numa_node=numa, max_speed_gts=32.0,
                                              max_width=16, root=f"pci0000:{base:02x}", acs_ctrl=0))
    return topo


def synthetic_hosts(n: int) -> list[HostTopology]:
    template = template_host()
    hosts = []
    for i in range(n):
        topo = copy.deepcopy(template)
        topo.hostname = f"node{i:05d}"
        topo.nics[0].ipv4 = [f"10.0.{i // 250}.{i % 250 + 2}/16"]
        fault = i % 50
        if fault == 7:
            topo.rdma_devices[3].ports[0].state, topo.rdma_devices[3].ports[0].phys_state = "DOWN", "Polling"
        elif fault == 19:
            topo.rdma_devices[5].ports[0].rate_gbps = 200.0
        elif fault == 31:
            topo.host.torch_version = "2.3.1+cu121"
        elif fault == 43:
            topo.host.memlock = Limit(8 << 20, 8 << 20)
        hosts.append(topo)
    return hosts


def baseline_pass(hosts: list[HostTopology]) -> int:
    """One plain pass over every port of every host: the floor for any check."""
    n = 0
    for topo in hosts:
        for dev in topo.rdma_devices:
            for port in dev.ports:
                if port.state == "ACTIVE" and port.rate_gbps:
                    n += 1
    return n


def best_of(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(best CPU seconds, best wall seconds). CPU time is what the verdicts use: on a
    shared machine wall time also counts the time other processes held the CPU."""
    cpu = wall = float("inf")
    for _ in range(reps):
        gc.collect()
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu = min(cpu, time.process_time() - c0)
        wall = min(wall, time.perf_counter() - w0)
    return cpu, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--reps", type=int, default=None,
                        help="tries per size, best kept (default: 3, more for small sizes)")
    args = parser.parse_args(argv)

    print(f"{'hosts':>6}  {'cpu s':>8}  {'wall s':>8}  {'us/host':>8}  {'findings':>8}  {'x baseline':>10}")
    per_host: dict[int, float] = {}
    for n in args.sizes:
        hosts = synthetic_hosts(n)
        kwargs = dict(expected_rate_gbps=400, rendezvous="10.0.0.2")
        findings = check(hosts, **kwargs)  # warm-up, and the count to report
        reps = args.reps or max(3, min(20, 4096 // n))  # small sizes are noisy: more tries
        seconds, wall = best_of(functools.partial(check, hosts, **kwargs), reps)
        base, _ = best_of(functools.partial(baseline_pass, hosts), reps)
        per_host[n] = seconds / n
        print(f"{n:>6}  {seconds:>8.3f}  {wall:>8.3f}  {seconds / n * 1e6:>8.1f}  {len(findings):>8}  "
              f"{seconds / max(base, 1e-9):>10.0f}")

    ok = True
    if 4096 in per_host:
        total = per_host[4096] * 4096
        verdict = "ok" if total < TARGET_S else "TOO SLOW"
        ok &= total < TARGET_S
        print(f"target: 4096 hosts in < {TARGET_S:g} s: {total:.3f} s of CPU ({verdict})")
    sizes = sorted(per_host)
    for small, large in zip(sizes, sizes[1:], strict=False):
        growth = per_host[large] / per_host[small]
        linear = growth <= LINEAR_FACTOR
        ok &= linear
        print(f"growth: {small} -> {large} hosts ({large / small:g}x): time per host x{growth:.2f} "
              f"({'linear' if linear else 'NOT linear'}; allowed x{LINEAR_FACTOR:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
