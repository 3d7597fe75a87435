"""``check(cluster) -> list[Finding]``: the fabric rules over one or many hosts.

Checks never print and never raise on what they find: a hang-or-crawl problem is an
``error`` finding, a slowdown a ``warning``, a plain fact ``info``. The CLI and the
launcher decide what to do with them (``fabric.on_error``).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable

from aitrain.fabric.findings import Finding, Severity, sort_findings
from aitrain.fabric.rules import CheckOptions, HostView, gpudirect, network, pcie, rdma
from aitrain.fabric.rules import cluster as cluster_rules
from aitrain.fabric.topology import Cluster, HostTopology

HOST_RULES = (*rdma.RULES, *pcie.RULES, *gpudirect.RULES, *network.RULES)
CLUSTER_RULES = cluster_rules.RULES

# Every id a check can emit, with what it means. Ids are stable: scripts match on them.
FINDING_IDS: dict[str, str] = {
    "rdma-none": "no RDMA devices: the job uses TCP sockets (info)",
    "rdma-port-not-active": "an RDMA port is DOWN/INIT/ARMED instead of ACTIVE",
    "rdma-port-disabled": "an RDMA port is administratively disabled",
    "rdma-port-not-linkup": "an ACTIVE port's physical state is not LinkUp",
    "rdma-rate-below-peers": "a port runs slower than like ports of the same host",
    "rdma-rate-below-expected": "a fabric port runs below fabric.expected_rate_gbps",
    "roce-no-v2-gid": "a RoCE port has no RoCE v2 GID",
    "roce-only-link-local-gid": "a RoCE port's v2 GIDs are all link-local (not routable)",
    "roce-gid-table-unknown": "a RoCE port's GID table could not be read (info)",
    "roce-mtu-below-4096": "RoCE active MTU < 4096 although the netdev MTU allows 4096",
    "roce-mtu-limited-by-netdev": "the netdev MTU limits RoCE to an MTU below 4096 (info)",
    "rdma-netdev-down": "an ACTIVE RDMA port's netdev (IPoIB/RoCE) is down",
    "rdma-firmware-mismatch": "HCAs of one model run different firmware on one host",
    "pcie-link-width-degraded": "a NIC or GPU PCIe link trained narrower than it can",
    "pcie-link-speed-degraded": "a NIC or GPU PCIe link trained slower than it can",
    "pcie-acs-enabled": "ACS P2P redirect on a bridge above GPUs/NICs on bare metal",
    "gpudirect-rdma-unavailable": "RDMA + NVIDIA GPUs without nvidia_peermem or dma-buf",
    "memlock-limit-low": "RLIMIT_MEMLOCK too low for RDMA",
    "gpu-nic-cross-socket": "GPUs on a NUMA node without an RDMA NIC",
    "rendezvous-unreachable": "no interface routes to the rendezvous address",
    "rendezvous-interface-down": "the interface that routes to the rendezvous is down",
    "rendezvous-via-virtual-interface": "the rendezvous is reached over docker/veth/tun",
    "rendezvous-route-unknown": "no routing table was probed (info)",
    "rendezvous-unresolved": "the rendezvous is not an IP address",
    "socket-nic-numa-remote": "the socket interface is on a NUMA node without GPUs while a closer NIC exists",
    "hosts-active-hca-count-mismatch": "hosts differ in how many HCAs have an active port",
    "hosts-link-layer-mismatch": "some hosts are InfiniBand, others RoCE",
    "hosts-mtu-mismatch": "hosts differ in RoCE netdev / RDMA / socket MTU",
    "hosts-torch-version-mismatch": "hosts run different torch versions",
    "hosts-nccl-version-mismatch": "hosts run different NCCL versions",
    "hosts-driver-version-mismatch": "hosts run different NVIDIA driver versions",
    "hosts-firmware-mismatch": "an HCA model runs different firmware across hosts",
    "hosts-duplicate-hostname": "two probed hosts have the same hostname",
    "probe-unreadable-file": "the probe could not read a file (it went on without it)",
    "probe-bad-file-content": "a file held garbage or truncated content",
    "probe-sysfs-verbs-mismatch": "sysfs and pyverbs disagree about a port",
    "probe-tool-failed": "a probe helper (pyverbs, NVML, ip) failed",
}


def probe_warnings(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    if not opts.include_probe_warnings:
        return
    for w in view.topo.warnings:
        yield view.finding(
            f"probe-{w.kind}", Severity.WARNING, w.path, f"{w.path}: {w.message}",
            "the probe skipped this value; if the file comes from a captured tree, recapture it "
            "(`aitrain fabric probe --json` on the host)",
        )


def check(
    cluster: Cluster | HostTopology | Iterable[HostTopology],
    *,
    expected_rate_gbps: float | None = None,
    rendezvous: str | None = None,
    min_memlock_bytes: int | None = None,
    include_probe_warnings: bool = True,
) -> list[Finding]:
    """Runs every host rule on every host and the cross-host rules on all of them.

    ``expected_rate_gbps``: the least rate of the main fabric's ports.
    ``rendezvous``: an address (IP) every host must reach.
    Returns findings sorted errors first.
    """
    opts = CheckOptions(
        expected_rate_gbps=expected_rate_gbps,
        rendezvous=rendezvous,
        include_probe_warnings=include_probe_warnings,
    )
    if min_memlock_bytes is not None:
        opts.min_memlock_bytes = min_memlock_bytes
    return check_with(Cluster.of(cluster), opts)


def check_with(cluster: Cluster, opts: CheckOptions) -> list[Finding]:
    # The rules allocate many small objects and no reference cycles: with thousands of
    # hosts alive, cyclic GC passes would rescan all of them again and again and make
    # the check superlinear, so collection is paused for its duration.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        views = [HostView.of(h) for h in cluster.hosts]
        findings: list[Finding] = []
        for view in views:
            for rule in HOST_RULES:
                findings.extend(rule(view, opts))
            findings.extend(probe_warnings(view, opts))
        if len(views) > 1:
            for cluster_rule in CLUSTER_RULES:
                findings.extend(cluster_rule(views, opts))
        return sort_findings(findings)
    finally:
        if was_enabled:
            gc.enable()
