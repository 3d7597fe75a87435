"""Host facts: kernel, CPUs and NUMA nodes, memory, limits, /dev/shm, hypervisor,
GPUDirect kernel support, and the software stack (torch, CUDA, NCCL, driver).

Everything comes from the procfs and sysfs roots, so a captured tree reports its own
host. The software versions describe the running Python environment and are read
only when asked (the live probe).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import platform
import re
from pathlib import Path

from aitrain.fabric.probe import parse
from aitrain.fabric.probe.fs import Root
from aitrain.fabric.topology import HostInfo, NumaNode

# Loaded modules worth reporting (the rest of /proc/modules is noise here).
RELEVANT_MODULES = (
    "nvidia", "nvidia_peermem", "nv_peer_mem", "nvidia_uvm", "ib_core", "ib_uverbs",
    "rdma_cm", "rdma_ucm", "mlx5_core", "mlx5_ib", "mlx4_ib", "irdma", "bnxt_re",
    "efa", "hfi1", "rdma_rxe", "siw", "amdgpu",
)
DMABUF_MIN_KERNEL = (5, 12)


def read_hostname(proc: Root) -> str | None:
    return proc.read_value("sys/kernel/hostname")


def read_host_info(sys: Root, proc: Root, *, software: bool = False) -> HostInfo:
    info = HostInfo()
    info.kernel = proc.read_value("sys/kernel/osrelease")
    info.boot_id = proc.read_value("sys/kernel/random/boot_id", quiet=True)
    _read_cpus(sys, info)
    meminfo = proc.read_text("meminfo")
    if meminfo is not None:
        info.mem_total_kib = parse.parse_meminfo(meminfo).get("MemTotal")
        if info.mem_total_kib is None:
            proc.warn(proc.join("meminfo"), "has no MemTotal line")
    read_limits(proc, info)
    mounts = proc.read_text("mounts", quiet=True)
    if mounts is not None:
        info.shm_bytes = parse.parse_shm_size(mounts)
    if info.shm_bytes is None and _is_live(proc):
        info.shm_bytes = _statvfs_size("/dev/shm")
    info.hypervisor = _hypervisor(sys, proc)
    _read_modules(sys, proc, info)
    if software:
        read_software(info)
    return info


def _read_cpus(sys: Root, info: HostInfo) -> None:
    online = sys.parse("devices/system/cpu/online", parse.parse_cpulist)
    if online is not None:
        info.cpus = len(online)
        info.cpulist = sys.read_value("devices/system/cpu/online")
    for entry in sys.listdir("devices/system/node"):
        m = re.fullmatch(r"node(\d+)", entry)
        if not m:
            continue
        base = f"devices/system/node/{entry}"
        cpus = sys.parse(f"{base}/cpulist", parse.parse_cpulist)
        node = NumaNode(id=int(m.group(1)), cpulist=sys.read_value(f"{base}/cpulist", quiet=True) or "",
                        cpus=len(cpus or []))
        meminfo = sys.read_text(f"{base}/meminfo", quiet=True)
        if meminfo:
            node.memory_kib = parse.parse_meminfo(meminfo).get("MemTotal")
        info.numa_nodes.append(node)
    info.numa_nodes.sort(key=lambda n: n.id)


def _is_live(root: Root) -> bool:
    try:
        return root.path.resolve() in (Path("/proc"), Path("/sys"))
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def _statvfs_size(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


def _hypervisor(sys: Root, proc: Root) -> str | None:
    dmi = parse.hypervisor_from_dmi(
        sys.read_value("class/dmi/id/sys_vendor", quiet=True),
        sys.read_value("class/dmi/id/product_name", quiet=True),
    )
    product = (sys.read_value("class/dmi/id/product_name", quiet=True) or "").lower()
    # the first CPU's flags line is enough; a many-core cpuinfo can pass the table cap
    cpuinfo = proc.read_text("cpuinfo", quiet=True, limit=1 << 20, prefix=True)
    if cpuinfo is not None and re.search(r"^flags\s*:", cpuinfo, re.MULTILINE):
        if parse.cpuinfo_has_hypervisor_flag(cpuinfo):
            return dmi or "unknown"
        return "none"
    if ".metal" in product:
        return "none"
    return dmi


def _read_modules(sys: Root, proc: Root, info: HostInfo) -> None:
    text = proc.read_text("modules", quiet=True)
    loaded: set[str] | None = parse.parse_modules(text) if text is not None else None
    if loaded is None and sys.is_dir("module"):
        loaded = set(sys.listdir("module"))
    if loaded is not None:
        info.kernel_modules = sorted(m for m in loaded if m in RELEVANT_MODULES)
        info.nvidia_peermem = bool({"nvidia_peermem", "nv_peer_mem"} & loaded)
    version_text = proc.read_text("driver/nvidia/version", quiet=True)
    open_module = None
    if version_text:
        try:
            info.driver_version, open_module = parse.parse_nvidia_driver(version_text)
        except ValueError as e:
            proc.warn(proc.join("driver/nvidia/version"), str(e))
    if info.driver_version is None:
        info.driver_version = sys.read_value("module/nvidia/version", quiet=True)
    if info.kernel and (open_module is not None):
        try:
            kernel_ok = parse.parse_kernel_version(info.kernel) >= DMABUF_MIN_KERNEL
        except ValueError:
            kernel_ok = False
        info.dmabuf = kernel_ok and open_module


def read_limits(proc: Root, info: HostInfo) -> None:
    text = proc.read_text("self/limits")
    if text is None:
        return
    try:
        limits = parse.parse_limits(text)
    except ValueError as e:
        proc.warn(proc.join("self/limits"), str(e))
        return
    info.memlock = limits.get("Max locked memory")
    info.nofile = limits.get("Max open files")


# --------------------------------------------------------------------------- software


def read_software(info: HostInfo) -> None:
    """torch / CUDA / NCCL versions of this Python environment, importing torch only
    when it is a CUDA build (the NCCL version is only known to torch then)."""
    info.python_version = platform.python_version()
    try:
        info.torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return
    info.cuda_version = _torch_build_constant("cuda")
    if info.cuda_version is None:
        return
    info.nccl_version = _nccl_from_wheel() or _nccl_from_torch()


def _torch_build_constant(name: str) -> str | None:
    """Reads ``torch/version.py`` without importing torch (seconds saved per probe)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and target.id == name and isinstance(value, ast.Constant):
            return None if value.value is None else str(value.value)
    return None


def _nccl_from_wheel() -> str | None:
    for dist in ("nvidia-nccl-cu13", "nvidia-nccl-cu12", "nvidia-nccl-cu11"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _nccl_from_torch() -> str | None:
    try:
        import torch

        version = torch.cuda.nccl.version()
    except Exception:
        return None
    if isinstance(version, tuple):
        return ".".join(str(v) for v in version)
    return str(version)
