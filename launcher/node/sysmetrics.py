"""System metrics of one node, sampled by the node agent (one process per node, not every rank).

Every ``interval_s`` the sampler appends one JSON line to ``<run_dir>/system-<node>.jsonl``;
the launcher's tracker forwards it to MLflow like the training metrics. Keys carry the
node name, ``system/<node>/<metric>``, so MLflow's "System metrics" view shows every node:

    cpu_util_pct, cpu_iowait_pct              /proc/stat (all CPUs, over the interval)
    mem_total_mib, mem_available_mib, mem_cached_mib, mem_used_pct      /proc/meminfo
    psi_<cpu|memory|io>_<some|full>_avg10     /proc/pressure/* (where the kernel has PSI)
    cgroup_memory_mib, cgroup_memory_max_mib, cgroup_cpu_cores          the job's cgroup (v2 or v1)
    net/<if>/rx_bytes_per_s, net/<if>/tx_bytes_per_s                    the fabric interface(s)
    rdma/<dev>_<port>/rx_bytes_per_s, .../tx_bytes_per_s, .../<error counter> (deltas)
    gpu/<i>/util_pct, gpu/<i>/mem_used_mib, gpu/<i>/power_w, gpu/<i>/temp_c          NVML

Readers take root paths (``proc``, ``sys``) so they run on captured trees in tests.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
# RDMA port counters whose deltas are worth a graph (the data counters count 4-byte words).
RDMA_ERROR_COUNTERS = (
    "symbol_error", "link_downed", "link_error_recovery", "port_rcv_errors", "port_rcv_remote_physical_errors",
    "port_xmit_discards", "port_xmit_constraint_errors", "port_rcv_constraint_errors",
    "excessive_buffer_overrun_errors", "local_link_integrity_errors", "port_xmit_wait",
)
RDMA_HW_COUNTERS = (  # hw_counters of mlx5 and friends: retransmits and congestion (RoCE)
    "out_of_sequence", "packet_seq_err", "local_ack_timeout_err", "rnr_nak_retry_err", "implied_nak_seq_err",
    "np_cnp_sent", "rp_cnp_handled", "np_ecn_marked_roce_packets",
)
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_name(text: str) -> str:
    """A string usable inside an MLflow metric key."""
    return _KEY_SAFE.sub("_", text)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


# -- /proc -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuTimes:
    total: int
    idle: int
    iowait: int


def read_cpu_times(proc: Path) -> CpuTimes | None:
    """The aggregate ``cpu`` line of ``/proc/stat`` (jiffies; guest time is already in user)."""
    text = _read(proc / "stat")
    if not text:
        return None
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            fields = values[:8]  # user nice system idle iowait irq softirq steal
            return CpuTimes(total=sum(fields), idle=fields[3], iowait=fields[4] if len(fields) > 4 else 0)
    return None


def read_meminfo(proc: Path) -> dict[str, int]:
    """``/proc/meminfo`` in bytes: {'MemTotal': ..., 'MemAvailable': ..., 'Cached': ...}."""
    out: dict[str, int] = {}
    for line in (_read(proc / "meminfo") or "").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        out[name.strip()] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
    return out


def read_pressure(proc: Path) -> dict[str, float]:
    """PSI ``avg10`` values: {'cpu_some': 1.5, 'memory_full': 0.0, ...}; empty without PSI."""
    out: dict[str, float] = {}
    for resource in ("cpu", "memory", "io"):
        for line in (_read(proc / "pressure" / resource) or "").splitlines():
            kind, *pairs = line.split()
            for pair in pairs:
                key, _, value = pair.partition("=")
                if key == "avg10":
                    try:
                        out[f"{resource}_{kind}"] = float(value)
                    except ValueError:
                        pass
    return out


# -- cgroups ---------------------------------------------------------------------------


def read_proc_cgroups(proc: Path, pid: int | str = "self") -> dict[str, str]:
    """``/proc/<pid>/cgroup`` -> {controller: path}; the v2 entry is under ''."""
    out: dict[str, str] = {}
    for line in (_read(proc / str(pid) / "cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            out[""] = path
        for c in controllers.split(","):
            if c:
                out[c.removeprefix("name=")] = path
    return out


@dataclass(frozen=True)
class CgroupUsage:
    memory_bytes: int | None = None
    memory_max_bytes: int | None = None
    cpu_usage_s: float | None = None


def read_cgroup_usage(cgroup_root: Path, cgroups: dict[str, str]) -> CgroupUsage:
    """Memory and CPU usage of a cgroup: v2 files first, then the v1 memory/cpuacct hierarchies."""
    memory = memory_max = None
    cpu_s: float | None = None
    if "" in cgroups:
        rel = cgroups[""].lstrip("/")
        for base in (cgroup_root, cgroup_root / "unified"):
            d = base / rel
            if not (base / "cgroup.controllers").exists():
                continue
            memory = _read_int(d / "memory.current")
            memory_max = _read_int(d / "memory.max")
            for line in (_read(d / "cpu.stat") or "").splitlines():
                k, _, v = line.partition(" ")
                if k == "usage_usec":
                    cpu_s = int(v) / 1e6
            break
    if memory is None and "memory" in cgroups:
        d = cgroup_root / "memory" / cgroups["memory"].lstrip("/")
        memory = _read_int(d / "memory.usage_in_bytes")
        limit = _read_int(d / "memory.limit_in_bytes")
        memory_max = limit if limit is not None and limit < (1 << 60) else None
    if cpu_s is None and "cpuacct" in cgroups:
        rel = cgroups["cpuacct"].lstrip("/")
        for mount in ("cpuacct", "cpu,cpuacct", "cpuacct,cpu"):
            ns = _read_int(cgroup_root / mount / rel / "cpuacct.usage")
            if ns is not None:
                cpu_s = ns / 1e9
                break
    return CgroupUsage(memory, memory_max, cpu_s)


# -- network and RDMA ------------------------------------------------------------------


def select_interfaces(sys: Path, wanted: Iterable[str] | None = None) -> list[str]:
    """Interfaces to watch: ``wanted`` names or NCCL-style prefixes (``^lo`` excludes, ``=eth0``
    is exact); by default every interface that is up, except loopback."""
    names = sorted(p.name for p in (sys / "class" / "net").glob("*")) if (sys / "class" / "net").is_dir() else []
    specs = [w.strip() for w in (wanted or []) if w and w.strip()]
    if specs:
        exclude = [s[1:] for s in specs if s.startswith("^")]
        include = [s for s in specs if not s.startswith("^")]
        out = []
        for n in names:
            if any(n.startswith(e.lstrip("=")) for e in exclude):
                continue
            if include and not any(n == s[1:] if s.startswith("=") else n.startswith(s) for s in include):
                continue
            if not include and n == "lo":
                continue
            out.append(n)
        return out
    return [n for n in names if n != "lo" and (_read(sys / "class" / "net" / n / "operstate") or "").strip() == "up"]


def read_net_counters(sys: Path, interfaces: Iterable[str]) -> dict[str, tuple[int, int]]:
    """{interface: (rx_bytes, tx_bytes)} from ``/sys/class/net/<if>/statistics``."""
    out = {}
    for name in interfaces:
        stats = sys / "class" / "net" / name / "statistics"
        rx, tx = _read_int(stats / "rx_bytes"), _read_int(stats / "tx_bytes")
        if rx is not None and tx is not None:
            out[name] = (rx, tx)
    return out


def read_rdma_counters(sys: Path) -> dict[str, dict[str, int]]:
    """{'mlx5_0_1': {'port_rcv_data': ..., 'symbol_error': ...}} for every RDMA port."""
    out: dict[str, dict[str, int]] = {}
    base = sys / "class" / "infiniband"
    if not base.is_dir():
        return out
    for dev in sorted(base.iterdir()):
        ports = dev / "ports"
        if not ports.is_dir():
            continue
        for port in sorted(ports.iterdir()):
            counters: dict[str, int] = {}
            for sub, names in (("counters", ("port_rcv_data", "port_xmit_data", "port_rcv_packets",
                                             "port_xmit_packets") + RDMA_ERROR_COUNTERS),
                               ("hw_counters", RDMA_HW_COUNTERS)):
                for name in names:
                    v = _read_int(port / sub / name)
                    if v is not None:
                        counters[name] = v
            if counters:
                out[f"{dev.name}_{port.name}"] = counters
    return out


# -- GPUs ------------------------------------------------------------------------------


class NvmlGpus:
    """GPU utilisation, memory, power and temperature through NVML (absent: no GPU metrics)."""

    def __init__(self) -> None:
        self.nvml: Any = None
        self.handles: list[Any] = []
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.nvml = pynvml
        except Exception:  # no library, no driver, no GPU
            self.nvml = None

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.nvml is None:
            return out
        n = self.nvml
        for i, h in enumerate(self.handles):
            for key, read in (
                ("util_pct", lambda h=h: n.nvmlDeviceGetUtilizationRates(h).gpu),
                ("mem_used_mib", lambda h=h: n.nvmlDeviceGetMemoryInfo(h).used / MIB),
                ("power_w", lambda h=h: n.nvmlDeviceGetPowerUsage(h) / 1000.0),
                ("temp_c", lambda h=h: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
            ):
                try:
                    out[f"gpu/{i}/{key}"] = float(read())
                except Exception:
                    pass
        return out

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass


# -- the sampler -----------------------------------------------------------------------


@dataclass
class SystemSampler:
    """Turns counters into one sample of gauges and rates (see module docstring for keys)."""

    node: str
    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    cgroup_root: Path = Path("/sys/fs/cgroup")
    interfaces: list[str] | None = None  # names/prefixes; None: every interface that is up
    cgroup_pid: Callable[[], int | str] = lambda: "self"  # whose cgroup is "the job's cgroup"
    gpus: Any = None  # NvmlGpus-like (sample() -> dict); None: no GPU metrics
    _prev: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"system/{metric_name(self.node)}/"

    def sample(self, now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        prev: dict[str, Any] = self._prev
        cur: dict[str, Any] = {"t": now}
        out: dict[str, float] = {}
        dt = now - prev["t"] if "t" in prev else 0.0

        cpu = read_cpu_times(self.proc)
        if cpu is not None:
            cur["cpu"] = cpu
            p = prev.get("cpu")
            if p is not None and cpu.total > p.total:
                total = cpu.total - p.total
                out["cpu_util_pct"] = 100.0 * (1 - (cpu.idle - p.idle + cpu.iowait - p.iowait) / total)
                out["cpu_iowait_pct"] = 100.0 * (cpu.iowait - p.iowait) / total

        mem = read_meminfo(self.proc)
        for src, key in (("MemTotal", "mem_total_mib"), ("MemAvailable", "mem_available_mib"),
                         ("Cached", "mem_cached_mib")):
            if src in mem:
                out[key] = mem[src] / MIB
        if mem.get("MemTotal") and "MemAvailable" in mem:
            out["mem_used_pct"] = 100.0 * (1 - mem["MemAvailable"] / mem["MemTotal"])

        for key, value in read_pressure(self.proc).items():
            out[f"psi_{key}_avg10"] = value

        try:
            pid = self.cgroup_pid()
        except Exception:
            pid = "self"
        cg = read_cgroup_usage(self.cgroup_root, read_proc_cgroups(self.proc, pid) or read_proc_cgroups(self.proc))
        if cg.memory_bytes is not None:
            out["cgroup_memory_mib"] = cg.memory_bytes / MIB
        if cg.memory_max_bytes is not None:
            out["cgroup_memory_max_mib"] = cg.memory_max_bytes / MIB
        if cg.cpu_usage_s is not None:
            cur["cg_cpu"] = cg.cpu_usage_s
            if "cg_cpu" in prev and dt > 0:
                out["cgroup_cpu_cores"] = max(0.0, cg.cpu_usage_s - prev["cg_cpu"]) / dt

        net = read_net_counters(self.sys, select_interfaces(self.sys, self.interfaces))
        cur["net"] = net
        for name, (rx, tx) in net.items():
            old = prev.get("net", {}).get(name)
            if old is not None and dt > 0:
                out[f"net/{metric_name(name)}/rx_bytes_per_s"] = max(0, rx - old[0]) / dt
                out[f"net/{metric_name(name)}/tx_bytes_per_s"] = max(0, tx - old[1]) / dt

        rdma = read_rdma_counters(self.sys)
        cur["rdma"] = rdma
        for port, counters in rdma.items():
            old = prev.get("rdma", {}).get(port)
            if old is None or dt <= 0:
                continue
            key = f"rdma/{metric_name(port)}/"
            delta = {k: max(0, v - old[k]) for k, v in counters.items() if k in old}
            if "port_rcv_data" in delta:
                out[key + "rx_bytes_per_s"] = delta.pop("port_rcv_data") * 4 / dt
            if "port_xmit_data" in delta:
                out[key + "tx_bytes_per_s"] = delta.pop("port_xmit_data") * 4 / dt
            for name in ("port_rcv_packets", "port_xmit_packets"):
                if name in delta:
                    out[key + name.replace("port_", "") + "_per_s"] = delta.pop(name) / dt
            for name, value in delta.items():
                out[key + name] = float(value)

        if self.gpus is not None:
            out.update(self.gpus.sample())

        self._prev = cur
        return {self.prefix + k: float(v) for k, v in out.items()}


class SystemMetricsThread:
    """Samples every ``interval_s`` into ``path`` (JSON lines with ``time`` and ``step``)."""

    def __init__(self, sampler: SystemSampler, path: Path, interval_s: float) -> None:
        self.sampler = sampler
        self.path = path
        self.interval_s = max(0.05, float(interval_s))
        self._stop = threading.Event()
        self._step = 0
        self._thread = threading.Thread(target=self._main, name="aitrain-sysmetrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _write(self, f: Any) -> None:
        values = self.sampler.sample()
        if values:
            self._step += 1
            f.write(json.dumps({"time": time.time(), "step": self._step, **values}) + "\n")
            f.flush()

    def _main(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                self.sampler.sample()  # the baseline for rates
                while not self._stop.wait(self.interval_s):
                    self._write(f)
                self._write(f)  # a last sample at the end, so short jobs get one too
        except Exception as e:  # metrics are best effort; the job goes on
            print(f"aitrain: system metrics stopped: {type(e).__name__}: {e}", flush=True)
        finally:
            close = getattr(self.sampler.gpus, "close", None)
            if close:
                close()


def interfaces_from_env(env: dict[str, str], explicit: str | None = None) -> list[str] | None:
    """The fabric interface(s) to watch: ``fabric.interface``, else NCCL/GLOO_SOCKET_IFNAME, else None."""
    if explicit:
        return [explicit]
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        if env.get(var):
            return [s for s in env[var].split(",") if s]
    return None


def node_name() -> str:
    return os.uname().nodename
