"""The host rules: each setting, the value recommended for training hosts, and why.

A rule reads its setting through ``HostContext.paths`` and returns a ``Verdict``;
``check.py`` turns verdicts into findings and ``tune.py`` collects their writes.
Severity: warning for what measurably slows training, error only for what
breaks a job, info for advice and for settings the host does not expose.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

from aitrain.fabric.findings import Severity
from aitrain.fabric.host.cpus import format_cpulist
from aitrain.fabric.host.model import HostContext, Rule, Status, Verdict, Write, WriteKind
from aitrain.fabric.host.readers import (
    THP_DIR,
    available_governors,
    governor_paths,
    normalize,
    process_names,
    read_governors,
    read_limit,
    read_shm_size,
    read_text,
    read_thp,
    thp_path,
)

SYSCTL_CONF = "/etc/sysctl.d/90-aitrain.conf"
LIMITS_CONF = "/etc/security/limits.d/90-aitrain.conf"
SOCKET_BUFFER = 16 << 20  # tuned's network-throughput profile for 40G+ links
DEFAULT_PORT_RANGE = (32768, 60999)
REQUIRED_CONTROLLERS = ("cpu", "cpuset", "memory")
GiB = 1 << 30


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def not_available(recommended: str, detail: str, source: str = "") -> Verdict:
    return Verdict(Status.NOT_AVAILABLE, None, recommended, detail=detail, source=source)


def _int(value: str) -> int | None:
    try:
        return int(value.split()[0])
    except (ValueError, IndexError):
        return None


# --- sysctl files under <proc>/sys ---------------------------------------------------------

SeverityFor = Callable[[HostContext, str], tuple[Severity, str]]


def sysctl_fix(name: str, value: str) -> tuple[str, str]:
    """(runtime command, how to persist) for setting sysctl ``name`` to ``value``."""
    arg = shlex.quote(f"{name}={value}") if " " in value else f"{name}={value}"
    return f"sysctl -w {arg}", f"add '{name} = {value}' to {SYSCTL_CONF}"


def sysctl_rule(
    id: str,
    name: str,
    *,
    why: str,
    recommended: str,
    ok: Callable[[str], bool],
    severity: Severity | SeverityFor,
    target: Callable[[str], str] | None = None,
) -> Rule:
    """A rule on one sysctl: ``ok(current)`` decides; ``target(current)`` is the value to write."""

    def evaluate(ctx: HostContext) -> Verdict:
        path = ctx.paths.sysctl_path(name)
        raw = read_text(path)
        if raw is None or not raw.strip():
            return not_available(recommended, f"{path} does not exist", str(path))
        current = normalize(raw)
        try:
            good = ok(current)
        except (ValueError, IndexError):
            return not_available(recommended, f"cannot parse {current!r} from {path}", str(path))
        if good:
            return Verdict(Status.OK, current, recommended, source=str(path))
        sev, detail = severity(ctx, current) if callable(severity) else (severity, "")
        new = target(current) if target else recommended
        fix, persist = sysctl_fix(name, new)
        return Verdict(Status.CHANGE, current, recommended, sev, detail, fix, persist, str(path),
                       (Write(str(path), new),))

    return Rule(id, name, why, evaluate)


def at_least(n: int) -> Callable[[str], bool]:
    return lambda v: int(v.split()[0]) >= n


def equals(expected: str) -> Callable[[str], bool]:
    return lambda v: v == expected


def _numa_balancing_severity(ctx: HostContext, current: str) -> tuple[Severity, str]:
    if ctx.numa_nodes is not None and ctx.numa_nodes <= 1:
        return Severity.INFO, "This host has one NUMA node, so it costs little here."
    return Severity.WARNING, ""


def _swappiness_severity(ctx: HostContext, current: str) -> tuple[Severity, str]:
    if ctx.meminfo.get("SwapTotal") == 0:
        return Severity.INFO, "No swap is configured, so it has no effect until swap is added."
    return Severity.WARNING, ""


def _tcp_mem_max(v: str) -> int:
    return int(v.split()[2])


def _raise_tcp_max(v: str) -> str:
    low, default, _ = v.split()
    return f"{low} {default} {SOCKET_BUFFER}"


def _tcp_mem_rule(id: str, name: str, direction: str) -> Rule:
    return sysctl_rule(
        id, name,
        why=f"TCP autotuning never grows a socket's {direction} buffer past the third value; "
            "Gloo and NCCL's socket transport move whole gradient buckets per connection.",
        recommended=f"max >= {SOCKET_BUFFER}",
        ok=lambda v: _tcp_mem_max(v) >= SOCKET_BUFFER,
        severity=Severity.INFO,
        target=_raise_tcp_max,
    )


def _core_mem_rule(id: str, name: str, direction: str) -> Rule:
    return sysctl_rule(
        id, name,
        why=f"caps the {direction} buffer a socket may ask for with setsockopt; Gloo and NCCL's "
            "socket transport are bounded by it on 40G+ Ethernet.",
        recommended=f">= {SOCKET_BUFFER}",
        ok=at_least(SOCKET_BUFFER),
        severity=Severity.INFO,
        target=lambda v: str(SOCKET_BUFFER),
    )


# --- transparent hugepages ------------------------------------------------------------------


def thp_rule(id: str, name: str, *, why: str, recommended: str, good: set[str],
             severity: Severity) -> Rule:
    def evaluate(ctx: HostContext) -> Verdict:
        path = thp_path(ctx.paths, name)
        read = read_thp(ctx.paths, name)
        if read is None:
            return not_available(recommended, f"{path} does not exist (kernel without THP)", str(path))
        current, choices = read
        if current in good:
            return Verdict(Status.OK, current, recommended, source=str(path))
        writes = (Write(str(path), recommended, WriteKind.SELECTOR),) if recommended in choices else ()
        fix = f"echo {recommended} > /sys/{THP_DIR}/{name}"
        persist = ("add transparent_hugepage=" + recommended + " to the kernel command line"
                   if name == "enabled" else "reapply at boot (a systemd unit or tuned [sysfs])")
        return Verdict(Status.CHANGE, current, recommended, severity, "", fix, persist,
                       str(path), writes)

    return Rule(id, f"transparent_hugepage/{name}", why, evaluate)


# --- CPU frequency governor -----------------------------------------------------------------


def _summarize_governors(governors: dict[int, str]) -> str:
    by_name: dict[str, list[int]] = {}
    for cpu, name in governors.items():
        by_name.setdefault(name, []).append(cpu)
    return ", ".join(f"{name} (cpu {format_cpulist(cpus)})" for name, cpus in sorted(by_name.items()))


def _governor(ctx: HostContext) -> Verdict:
    recommended = "performance"
    governors = read_governors(ctx.paths)
    if not governors:
        return not_available(recommended, "no cpu*/cpufreq/scaling_governor: the hypervisor or "
                             "firmware controls the CPU frequency",
                             str(ctx.paths.sys / "devices/system/cpu"))
    current = _summarize_governors(governors)
    slow = [cpu for cpu, name in governors.items() if name != recommended]
    if not slow:
        return Verdict(Status.OK, current, recommended)
    files = governor_paths(ctx.paths)
    writes = tuple(Write(str(files[cpu]), recommended) for cpu in slow
                   if recommended in (available_governors(ctx.paths, cpu) or [recommended]))
    detail = "" if writes else "The cpufreq driver offers no 'performance' governor."
    return Verdict(Status.CHANGE, current, recommended, Severity.WARNING, detail,
                   "cpupower frequency-set -g performance",
                   "set governor=performance in a tuned profile or cpupower.service",
                   str(ctx.paths.sys / "devices/system/cpu/cpu*/cpufreq/scaling_governor"), writes)


# --- resource limits ------------------------------------------------------------------------


def _limit_text(name: str, soft: int | None, hard: int | None) -> str:
    fmt = human_bytes if name == "memlock" else (lambda n: "unlimited" if n is None else str(n))
    return f"soft {fmt(soft)}, hard {fmt(hard)}"


def _limit_fix(name: str, runtime_value: str | None, persist_value: str) -> tuple[str, str]:
    """(fix, persist). ``runtime_value`` is None when the hard limit is too low for ulimit."""
    flag = {"memlock": "-l", "nofile": "-n"}[name]
    systemd = {"memlock": "LimitMEMLOCK=infinity", "nofile": f"LimitNOFILE={persist_value}"}[name]
    docker = "-1" if persist_value == "unlimited" else persist_value
    lines = f"add '* soft {name} {persist_value}' and '* hard {name} {persist_value}' to {LIMITS_CONF}"
    services = f"{systemd} in slurmd/containerd units; docker --ulimit {name}={docker}"
    if runtime_value is None:
        return f"{lines}, then log in again", services
    return f"ulimit {flag} {runtime_value} (in the shell that starts aitrain)", f"{lines}; {services}"


def _memlock(ctx: HostContext) -> Verdict:
    recommended = "unlimited"
    limit = read_limit(ctx.paths, "memlock")
    if limit is None:
        return not_available(recommended, f"no 'Max locked memory' in {ctx.paths.proc}/self/limits")
    current = _limit_text("memlock", limit.soft, limit.hard)
    if limit.soft is None:
        return Verdict(Status.OK, current, recommended)
    fix, persist = _limit_fix("memlock", "unlimited" if limit.hard is None else None, "unlimited")
    if ctx.rdma:
        return Verdict(Status.CHANGE, current, recommended, Severity.ERROR,
                       "This host has RDMA devices: NCCL/UCX fail to register buffers "
                       "(ibv_reg_mr: Cannot allocate memory) or silently fall back to sockets.",
                       fix, persist)
    return Verdict(Status.CHANGE, current, recommended, Severity.INFO,
                   "No RDMA devices here, so only mlock() users are affected.", fix, persist)


NOFILE_MIN = 65536
NOFILE_PERSIST = 1048576


def _nofile(ctx: HostContext) -> Verdict:
    recommended = f">= {NOFILE_MIN}"
    limit = read_limit(ctx.paths, "nofile")
    if limit is None:
        return not_available(recommended, f"no 'Max open files' in {ctx.paths.proc}/self/limits")
    current = _limit_text("nofile", limit.soft, limit.hard)
    if limit.soft is None or limit.soft >= NOFILE_MIN:
        return Verdict(Status.OK, current, recommended)
    hard = limit.hard if limit.hard is not None else NOFILE_PERSIST
    fix, persist = _limit_fix("nofile", str(hard) if hard >= NOFILE_MIN else None, str(NOFILE_PERSIST))
    severity = Severity.WARNING if limit.soft < 4096 else Severity.INFO
    return Verdict(Status.CHANGE, current, recommended, severity, "", fix, persist)


# --- shared memory, irqbalance, hugetlb pages, cgroups --------------------------------------

SHM_MIN = 1 * GiB


def _shm(ctx: HostContext) -> Verdict:
    recommended = f">= {human_bytes(SHM_MIN)}"
    read = read_shm_size(ctx.paths)
    if read is None:
        return not_available(recommended, "/dev/shm is not mounted or its size is unknown")
    size, source = read
    if size >= SHM_MIN:
        return Verdict(Status.OK, human_bytes(size), recommended, source=source)
    return Verdict(Status.CHANGE, human_bytes(size), recommended, Severity.WARNING,
                   "NCCL's shared-memory transport fails with 'unhandled system error' and "
                   "DataLoader workers die with a bus error when it fills.",
                   "mount -o remount,size=16G /dev/shm",
                   "set size= on /dev/shm in /etc/fstab; containers: --shm-size=16g or --ipc=host",
                   source)


def _irqbalance(ctx: HostContext) -> Verdict:
    recommended = "running (or NIC IRQs pinned by hand)"
    names = process_names(ctx.paths)
    if names is None:
        return not_available(recommended, f"no process directories under {ctx.paths.proc}")
    if "irqbalance" in names:
        return Verdict(Status.OK, "running", recommended)
    return Verdict(Status.CHANGE, "not running", recommended, Severity.INFO,
                   "Fine if NIC interrupts are pinned by hand (e.g. Mellanox set_irq_affinity).",
                   "systemctl enable --now irqbalance",
                   "systemctl enable irqbalance")


def _hugepages(ctx: HostContext) -> Verdict:
    recommended = "0 unless something maps hugetlbfs"
    info = ctx.meminfo
    if "HugePages_Total" not in info:
        return not_available(recommended, f"no HugePages_Total in {ctx.paths.proc}/meminfo")
    total, free = info["HugePages_Total"], info.get("HugePages_Free", 0)
    reserved = info.get("Hugetlb", total * info.get("Hugepagesize", 0))
    if total == 0 and reserved == 0:
        return Verdict(Status.OK, "0", recommended)
    page = human_bytes(info.get("Hugepagesize"))
    current = f"{human_bytes(reserved)} reserved ({total} x {page}, {free} free)"
    if free < total:
        return Verdict(Status.OK, current, recommended)
    unused_share = reserved / info["MemTotal"] if info.get("MemTotal") else 0.0
    severity = Severity.WARNING if unused_share > 0.25 else Severity.INFO
    return Verdict(Status.CHANGE, current, recommended, severity,
                   f"None of it is in use; it is {unused_share:.0%} of RAM that ranks and "
                   "the page cache cannot use.",
                   "sysctl -w vm.nr_hugepages=0",
                   "remove hugepages= from the kernel command line and vm.nr_hugepages from /etc/sysctl.d")


def _cgroup_version(ctx: HostContext) -> Verdict:
    recommended = "2"
    info = ctx.cgroup
    if info is None:
        return not_available(recommended, "no cgroup mount in mountinfo and no /sys/fs/cgroup")
    if info.version == 2:
        return Verdict(Status.OK, "2", recommended, source=info.source)
    current = "1 (hybrid)" if info.hybrid else "1"
    return Verdict(Status.CHANGE, current, recommended, Severity.INFO, "",
                   "add systemd.unified_cgroup_hierarchy=1 to the kernel command line and reboot",
                   "", info.source)


def _cgroup_controllers(ctx: HostContext) -> Verdict:
    recommended = ",".join(REQUIRED_CONTROLLERS)
    info = ctx.cgroup
    if info is None:
        return not_available(recommended, "no cgroup hierarchy found")
    current = ",".join(info.controllers) or "(none)"
    missing = [c for c in REQUIRED_CONTROLLERS if c not in info.controllers]
    if not missing:
        return Verdict(Status.OK, current, recommended, source=info.source)
    return Verdict(Status.CHANGE, current, recommended, Severity.WARNING,
                   f"Missing {','.join(missing)}: a runaway rank cannot be confined.",
                   f"enable them: echo '+{' +'.join(missing)}' > /sys/fs/cgroup/cgroup.subtree_control"
                   if info.version == 2 else f"mount the {','.join(missing)} cgroup controllers",
                   "Delegate=yes for the service that starts ranks", info.source)


# --- scheduler knobs ------------------------------------------------------------------------


MIGRATION_COST = 5_000_000  # tuned's hpc-compute profile


def _migration_cost(ctx: HostContext) -> Verdict:
    recommended = f">= {MIGRATION_COST}"
    candidates = [ctx.paths.sysctl_path("kernel.sched_migration_cost_ns"),
                  ctx.paths.sys / "kernel/debug/sched/migration_cost_ns"]
    for path in candidates:
        raw = read_text(path)
        if raw is None or _int(raw) is None:
            continue
        current = normalize(raw)
        if int(current) >= MIGRATION_COST:
            return Verdict(Status.OK, current, recommended, source=str(path))
        if path == candidates[0]:
            fix, persist = sysctl_fix("kernel.sched_migration_cost_ns", str(MIGRATION_COST))
        else:
            fix = f"echo {MIGRATION_COST} > /sys/kernel/debug/sched/migration_cost_ns"
            persist = "reapply at boot (a systemd unit or tuned [scheduler])"
        return Verdict(Status.CHANGE, current, recommended, Severity.INFO, "", fix, persist,
                       str(path), (Write(str(path), str(MIGRATION_COST)),))
    return not_available(recommended, "neither kernel.sched_migration_cost_ns nor debugfs "
                         "sched/migration_cost_ns (mount debugfs to read it on kernels >= 5.13)")


# --- ephemeral ports ------------------------------------------------------------------------


def parse_port_list(text: str) -> set[int]:
    """``"29400,29500-29510"`` -> the ports in it (``ip_local_reserved_ports`` format)."""
    ports: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        ports.update(range(int(lo), int(hi or lo) + 1))
    return ports


def _port_range(ctx: HostContext) -> Verdict:
    name = "net.ipv4.ip_local_port_range"
    default = f"{DEFAULT_PORT_RANGE[0]} {DEFAULT_PORT_RANGE[1]}"
    width = DEFAULT_PORT_RANGE[1] - DEFAULT_PORT_RANGE[0] + 1
    ports = ",".join(map(str, ctx.rendezvous_ports))
    recommended = f">= {width} ports; {ports} outside or reserved"
    path = ctx.paths.sysctl_path(name)
    raw = read_text(path)
    try:
        lo, hi = (int(x) for x in (raw or "").split())
    except ValueError:
        return not_available(recommended, f"{path} is missing or unreadable", str(path))
    current = f"{lo} {hi}"
    if hi - lo + 1 < width:
        fix, persist = sysctl_fix(name, default)
        return Verdict(Status.CHANGE, current, recommended, Severity.INFO,
                       f"Only {hi - lo + 1} ephemeral ports for every outgoing connection on the host.",
                       fix, persist, str(path), (Write(str(path), default),))
    reserved_path = ctx.paths.sysctl_path("net.ipv4.ip_local_reserved_ports")
    reserved_raw = normalize(read_text(reserved_path) or "")
    try:
        reserved = parse_port_list(reserved_raw)
    except ValueError:
        reserved = set()
    exposed = [p for p in ctx.rendezvous_ports if lo <= p <= hi and p not in reserved]
    if not exposed:
        return Verdict(Status.OK, current, recommended, source=str(path))
    merged = ",".join(filter(None, [reserved_raw.replace(" ", ""), ",".join(map(str, exposed))]))
    fix, persist = sysctl_fix("net.ipv4.ip_local_reserved_ports", merged)
    return Verdict(Status.CHANGE, current, recommended, Severity.WARNING,
                   f"Port(s) {','.join(map(str, exposed))} are handed out to outgoing connections, "
                   "so the rendezvous store can fail with 'address already in use'.",
                   fix, persist, str(path), (Write(str(reserved_path), merged),))


RULES: tuple[Rule, ...] = (
    thp_rule("host-thp-enabled", "enabled", recommended="madvise", good={"always", "madvise"},
             severity=Severity.INFO,
             why="with 'never', allocators that ask for huge pages (PyTorch's CPU allocator, "
                 "glibc with hugetlb tunables) get 4 KiB pages and more TLB misses; 'always' "
                 "is also fine for dedicated training hosts."),
    thp_rule("host-thp-defrag", "defrag", recommended="madvise",
             good={"madvise", "defer", "defer+madvise", "never"},
             severity=Severity.WARNING,
             why="'always' makes every page fault that misses a huge page compact memory "
                 "synchronously; data loaders and pinned-memory allocations stall for "
                 "milliseconds."),
    sysctl_rule("host-numa-balancing", "kernel.numa_balancing", recommended="0", ok=equals("0"),
                severity=_numa_balancing_severity,
                why="automatic NUMA balancing unmaps pages to sample access and migrates them; "
                    "ranks bound to their GPU's NUMA node already place memory well, and the "
                    "faults stall pinned-memory copies."),
    Rule("host-cpu-governor", "cpufreq scaling_governor",
         "powersave/ondemand/schedutil lower the clock while a rank waits on the GPU or the "
         "network, then ramp it up too late for the next kernel launch or collective.",
         _governor),
    sysctl_rule("host-swappiness", "vm.swappiness", recommended="<= 10",
                ok=lambda v: int(v) <= 10, severity=_swappiness_severity, target=lambda v: "10",
                why="the kernel swaps out idle parts of ranks and data loaders to keep page "
                    "cache; touching them again stalls a step."),
    sysctl_rule("host-zone-reclaim", "vm.zone_reclaim_mode", recommended="0", ok=equals("0"),
                severity=Severity.WARNING,
                why="non-zero reclaims (and may write back) local memory instead of using a "
                    "neighbouring node's free memory; allocations stall."),
    _core_mem_rule("host-rmem-max", "net.core.rmem_max", "receive"),
    _core_mem_rule("host-wmem-max", "net.core.wmem_max", "send"),
    _tcp_mem_rule("host-tcp-rmem", "net.ipv4.tcp_rmem", "receive"),
    _tcp_mem_rule("host-tcp-wmem", "net.ipv4.tcp_wmem", "send"),
    sysctl_rule("host-netdev-max-backlog", "net.core.netdev_max_backlog", recommended=">= 250000",
                ok=at_least(250000), severity=Severity.INFO, target=lambda v: "250000",
                why="packets arriving faster than softirq drains them are dropped when this "
                    "queue is full; 100G NICs overrun the default 1000."),
    Rule("host-ip-local-port-range", "net.ipv4.ip_local_port_range",
         "every outgoing connection takes an ephemeral port from this range; a rendezvous port "
         "inside it can be taken by another connection before the store binds it.",
         _port_range),
    Rule("host-memlock", "RLIMIT_MEMLOCK",
         "RDMA (InfiniBand/RoCE) pins every buffer it registers against the locked-memory "
         "limit; NCCL and UCX need it unlimited.",
         _memlock),
    Rule("host-nofile", "RLIMIT_NOFILE",
         "each DataLoader worker, socket and shared-memory tensor holds a descriptor; "
         "'Too many open files' kills data loading.",
         _nofile),
    Rule("host-shm-size", "/dev/shm",
         "NCCL's intra-node shared-memory transport and DataLoader workers exchange tensors "
         "through /dev/shm.",
         _shm),
    Rule("host-irqbalance", "irqbalance",
         "spreads device interrupts over CPUs; with ranks bound to CPUs, interrupt storms on a "
         "rank's CPUs slow that rank and every rank waiting for it.",
         _irqbalance),
    Rule("host-hugepages", "vm.nr_hugepages",
         "static hugetlb pages are taken out of general memory at boot; PyTorch does not map "
         "hugetlbfs, so a reservation nothing uses is RAM lost to the job.",
         _hugepages),
    Rule("host-cgroup-version", "cgroup",
         "cgroup v2 is what systemd and container runtimes delegate to a launcher without root, "
         "so each rank can get its own CPU set and memory limit and one runaway rank cannot "
         "starve the node.",
         _cgroup_version),
    Rule("host-cgroup-controllers", "cgroup controllers",
         "cpu, cpuset and memory controllers confine a rank's CPU time, CPUs and memory.",
         _cgroup_controllers),
    sysctl_rule("host-sched-autogroup", "kernel.sched_autogroup_enabled", recommended="0",
                ok=equals("0"), severity=Severity.INFO,
                why="with autogroup, nice only reorders threads inside one session: 'nice -n 19' "
                    "on a general job started from another session does not lower its share "
                    "against the ranks."),
    sysctl_rule("host-sched-rt-runtime", "kernel.sched_rt_runtime_us", recommended="950000",
                ok=lambda v: int(v) >= 0, severity=Severity.WARNING,
                why="-1 lets a runaway SCHED_FIFO thread (an agent, a driver helper) keep a CPU "
                    "forever, stalling the rank bound there and with it the whole collective."),
    Rule("host-sched-migration-cost", "kernel.sched_migration_cost_ns",
         "the scheduler keeps a thread that ran within this window on its CPU (cache-hot); "
         "a longer window stops general work from bouncing rank and loader threads between CPUs.",
         _migration_cost),
)


def rule_ids() -> list[str]:
    return [r.id for r in RULES]
