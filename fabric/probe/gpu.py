"""GPUs: through NVML (nvidia-ml-py) when it works, else from PCI class codes in sysfs.

NVML only describes the live host, so it is used only when the probe reads the live
``/sys``; a captured tree always goes through sysfs.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from aitrain.fabric.probe import parse
from aitrain.fabric.probe.fs import Root
from aitrain.fabric.topology import Gpu, ProbeWarning

VENDORS = {"0x10de": "nvidia", "0x1002": "amd"}
# 0x0300 VGA, 0x0302 3D controller (datacenter NVIDIA), 0x0380 display (AMD Instinct)
GPU_CLASSES = ("0x0300", "0x0302", "0x0380")


def read_sysfs_gpus(sys: Root) -> list[Gpu]:
    gpus: list[Gpu] = []
    for address in sys.listdir("bus/pci/devices"):
        base = f"bus/pci/devices/{address}"
        cls = sys.read_value(f"{base}/class", quiet=True)
        if not cls or not cls.lower().startswith(GPU_CLASSES):
            continue
        vendor = VENDORS.get((sys.read_value(f"{base}/vendor", quiet=True) or "").lower())
        if vendor is None:
            continue  # BMC VGA (ASPEED, Matrox) and the like
        try:
            bdf = parse.parse_bdf(address)
        except ValueError:
            continue
        gpus.append(Gpu(
            index=len(gpus),
            vendor=vendor,
            pci_address=bdf,
            numa_node=sys.parse(f"{base}/numa_node", parse.parse_numa_node),
            source="sysfs",
        ))
    return gpus


def load_nvml() -> ModuleType | None:
    try:
        return importlib.import_module("pynvml")
    except Exception:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def read_nvml_gpus(
    sys: Root, warnings: list[ProbeWarning], nvml: ModuleType | None = None
) -> tuple[list[Gpu], str | None] | None:
    """(GPUs, driver version) from NVML, or None when NVML is missing or has no driver."""
    nvml = nvml if nvml is not None else load_nvml()
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception:
        return None  # no driver / no GPU: not worth a warning
    try:
        driver = None
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            pass
        gpus = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                gpu = Gpu(index=index, vendor="nvidia", source="nvml")
                gpu.name = _text(nvml.nvmlDeviceGetName(handle))
                gpu.uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                try:
                    gpu.pci_address = parse.parse_bdf(_text(nvml.nvmlDeviceGetPciInfo(handle).busId))
                except ValueError:
                    gpu.pci_address = None
                try:
                    gpu.memory_mib = int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // (1 << 20)
                except Exception:
                    pass
                if gpu.pci_address:
                    gpu.numa_node = sys.parse(f"bus/pci/devices/{gpu.pci_address}/numa_node", parse.parse_numa_node)
                gpus.append(gpu)
            except Exception as e:
                warnings.append(ProbeWarning(path=f"nvml:gpu{index}", message=str(e), kind="tool-failed"))
        return gpus, driver
    except Exception as e:
        warnings.append(ProbeWarning(path="nvml", message=str(e), kind="tool-failed"))
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
