"""What one node runs: versions, GPUs, kernel. Written by the node agent to
``<run_dir>/nodes/<node>.json``; the tracker turns node 0's versions into MLflow tags and
uploads every node's file (``nodes/<node>.json``)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from typing import Any

from aitrain import __version__


def _torch_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    torch = sys.modules.get("torch")
    if torch is None:  # the agent imports torch anyway; elsewhere do not pay for it
        try:
            out["torch"] = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            pass
        return out
    out["torch"] = str(torch.__version__)
    cuda = getattr(torch.version, "cuda", None)
    if cuda:
        out["cuda_runtime"] = str(cuda)
        try:
            v = torch.cuda.nccl.version()
            out["nccl"] = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
        except Exception:
            pass
    return out


def _nvml() -> dict[str, Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return {}
    out: dict[str, Any] = {}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        out["driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        out["cuda_driver"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                         "memory_mib": round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**20)})
        out["gpus"] = gpus
    except Exception:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


def _os_release() -> str:
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def collect(node: str, node_rank: int = 0) -> dict[str, Any]:
    nvml = _nvml()
    versions = {"python": platform.python_version(), "aitrain": __version__, **_torch_versions()}
    for key in ("driver", "cuda_driver"):
        if key in nvml:
            versions[key] = nvml[key]
    return {
        "host": node,
        "node_rank": node_rank,
        "time": time.time(),
        "versions": versions,
        "gpus": nvml.get("gpus", []),
        "kernel": platform.release(),
        "os": _os_release(),
        "cpus": os.cpu_count(),
    }


# Dense peak throughput per GPU (FLOP/s) by NVML name fragment, for the MFU estimate:
# (bf16/fp16 tensor cores, fp32 without TF32). Data-sheet numbers; an estimate, not a measurement.
PEAK_FLOPS = (
    ("GB200", 2.5e15, 80e12), ("B200", 2.25e15, 80e12), ("H200", 989e12, 67e12),
    ("H100 PCIe", 756e12, 51e12), ("H100", 989e12, 67e12), ("H800", 989e12, 67e12),
    ("A100", 312e12, 19.5e12), ("A800", 312e12, 19.5e12), ("L40S", 362e12, 91.6e12),
    ("L40", 181e12, 90.5e12), ("L4", 121e12, 30.3e12), ("A10", 125e12, 31.2e12),
    ("V100", 125e12, 15.7e12), ("T4", 65e12, 8.1e12),
)


def peak_flops(gpu_name: str, dtype: str = "bf16") -> float | None:
    """Peak dense FLOP/s of one GPU for ``dtype`` (bf16 | fp16 | fp32), None if unknown."""
    for fragment, half, fp32 in PEAK_FLOPS:
        if fragment.lower() in gpu_name.lower():
            return fp32 if dtype == "fp32" else half
    return None
