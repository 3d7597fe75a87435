"""GPUs through NVML (a fake pynvml here) or from PCI class codes."""

from __future__ import annotations

import types

import pytest

from aitrain.fabric.probe.fs import Root
from aitrain.fabric.probe.gpu import read_nvml_gpus, read_sysfs_gpus


def fake_nvml(count=2, init_error=False, broken_index=None):
    m = types.ModuleType("pynvml")

    def init():
        if init_error:
            raise RuntimeError("NVML Shared Library Not Found")

    def handle(i):
        if i == broken_index:
            raise RuntimeError("GPU is lost")
        return i

    m.nvmlInit = init
    m.nvmlShutdown = lambda: None
    m.nvmlSystemGetDriverVersion = lambda: b"550.54.15"
    m.nvmlDeviceGetCount = lambda: count
    m.nvmlDeviceGetHandleByIndex = handle
    m.nvmlDeviceGetName = lambda h: "NVIDIA H100 80GB HBM3"
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h:08d}"
    m.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=f"00000000:{0x13 + 0x10 * h:02X}:00.0".encode())
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 << 30)
    return m


def test_nvml_gpus(hosts_dir):
    warnings: list = []
    gpus, driver = read_nvml_gpus(Root(hosts_dir / "dgx01" / "sys", warnings), warnings, fake_nvml())
    assert driver == "550.54.15" and warnings == []
    assert [(g.index, g.pci_address, g.numa_node, g.memory_mib, g.source) for g in gpus] == [
        (0, "0000:13:00.0", 0, 81920, "nvml"), (1, "0000:23:00.0", 0, 81920, "nvml")]
    assert gpus[0].name == "NVIDIA H100 80GB HBM3" and gpus[1].uuid == "GPU-00000001"


def test_nvml_without_driver_falls_back(hosts_dir):
    assert read_nvml_gpus(Root(hosts_dir, []), [], fake_nvml(init_error=True)) is None


def test_nvml_lost_gpu_is_a_warning(hosts_dir):
    warnings: list = []
    gpus, _ = read_nvml_gpus(Root(hosts_dir / "dgx01" / "sys", warnings), warnings, fake_nvml(3, broken_index=1))
    assert [g.index for g in gpus] == [0, 2] and warnings[0].path == "nvml:gpu1"


def test_sysfs_gpus_skip_bmc_vga_and_audio(tmp_path):
    def dev(bdf, vendor, cls):
        d = tmp_path / "bus/pci/devices" / bdf
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "class").write_text(cls + "\n")
        (d / "numa_node").write_text("1\n")

    dev("0000:03:00.0", "0x1a03", "0x030000")  # ASPEED BMC
    dev("0000:18:00.0", "0x10de", "0x030200")  # H100
    dev("0000:18:00.1", "0x10de", "0x040300")  # its audio function
    dev("0000:c1:00.0", "0x1002", "0x038000")  # MI300X
    gpus = read_sysfs_gpus(Root(tmp_path, []))
    assert [(g.pci_address, g.vendor, g.numa_node) for g in gpus] == [("0000:18:00.0", "nvidia", 1),
                                                                      ("0000:c1:00.0", "amd", 1)]


def test_live_machine_without_gpus():
    from aitrain.fabric import probe

    topo = probe()
    if topo.gpus:
        pytest.skip("this machine has GPUs")
    assert topo.sources["gpus"] in ("sysfs", "nvml")
