"""GPU-side rules: GPUDirect RDMA support, memlock for RDMA, GPU/NIC NUMA placement."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from aitrain.fabric.findings import Finding, Severity
from aitrain.fabric.rules import CheckOptions, HostView, fmt_bytes

E, W = Severity.ERROR, Severity.WARNING


def gpudirect(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    topo = view.topo
    nvidia = [g for g in topo.gpus if g.vendor == "nvidia"]
    if not nvidia or not topo.active_rdma_devices():
        return
    info = topo.host
    if info.nvidia_peermem is None:
        return  # loaded modules unknown (captured tree without /proc/modules)
    if info.nvidia_peermem or info.dmabuf:
        return
    yield view.finding(
        "gpudirect-rdma-unavailable", W, "nvidia_peermem",
        f"{len(nvidia)} NVIDIA GPU(s) and RDMA devices, but neither nvidia_peermem is loaded "
        f"nor dma-buf available: NCCL cannot use GPUDirect RDMA and stages every transfer "
        f"through host memory",
        "`modprobe nvidia_peermem` (shipped with the NVIDIA driver), or use the NVIDIA open "
        "kernel module on Linux >= 5.12 for dma-buf; NCCL_DEBUG=INFO shows 'GDRDMA' when it works",
        kernel=info.kernel, driver_version=info.driver_version,
    )


def memlock(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    topo = view.topo
    limit = topo.host.memlock
    if not topo.active_rdma_devices() or limit is None or limit.soft is None:
        return
    low = limit.soft < opts.min_memlock_bytes
    yield view.finding(
        "memlock-limit-low", E if low else W, "RLIMIT_MEMLOCK",
        f"the locked-memory limit is {fmt_bytes(limit.soft)} (hard {fmt_bytes(limit.hard)}); RDMA "
        f"pins every registered buffer, so "
        + ("NCCL fails with 'Cannot allocate memory' registering buffers"
           if low else "large jobs can fail to register buffers"),
        "set it to unlimited: `ulimit -l unlimited`, `* - memlock unlimited` in "
        "/etc/security/limits.conf, LimitMEMLOCK=infinity for systemd/slurmd, or "
        "`--ulimit memlock=-1` for containers",
        soft=limit.soft, hard=limit.hard,
    )


def gpu_nic_numa(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    """GPUs on a NUMA node with no RDMA NIC send every byte across the socket link."""
    topo = view.topo
    nics = {d.numa_node: d.name for d in topo.active_rdma_devices() if d.numa_node is not None}
    if not nics:
        return
    gpus_by_node: dict[int, list[int]] = defaultdict(list)
    for g in topo.gpus:
        if g.numa_node is not None:
            gpus_by_node[g.numa_node].append(g.index)
    for node, gpus in sorted(gpus_by_node.items()):
        if node in nics:
            continue
        far = ", ".join(f"{name} (node {n})" for n, name in sorted(nics.items()))
        yield view.finding(
            "gpu-nic-cross-socket", W, f"numa{node}",
            f"GPU(s) {', '.join(map(str, gpus))} on NUMA node {node} have no active RDMA NIC on "
            f"their node; their traffic crosses the socket interconnect to {far}",
            "put a NIC on every socket that holds GPUs (one NIC per GPU pair is the usual "
            "layout), or check that the NIC on this node is up",
            numa_node=node, gpus=gpus,
        )


RULES = (gpudirect, memlock, gpu_nic_numa)
