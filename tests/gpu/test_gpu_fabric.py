"""The fabric commands on a real GPU host, checked against nvidia-smi and torch.

`aitrain fabric probe --json` must find every GPU nvidia-smi lists, at the same PCI address
(and with NVML, the same name and memory), read its PCIe link from sysfs, and report the
CUDA/NCCL/driver versions the GPU stack really has. `aitrain fabric tune` must say which NCCL
version its NCCL settings are for: the version torch's NCCL reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gpu_testing import nvidia_smi, nvml_installed

from aitrain_testing import run_aitrain

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]


def probe_host(tmp_path: Path) -> dict[str, Any]:
    r = run_aitrain(["fabric", "probe", "--json"], tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    hosts = json.loads(r.stdout)["hosts"]
    assert len(hosts) == 1, [h["hostname"] for h in hosts]
    host: dict[str, Any] = hosts[0]
    return host


def test_fabric_probe_reads_the_gpu_and_its_pcie_link(tmp_path: Path, gpu: dict[str, Any], note: Any) -> None:
    from aitrain.fabric.probe.parse import parse_bdf

    host = probe_host(tmp_path)
    smi = {parse_bdf(bus): (name, int(mem), int(width)) for bus, name, mem, width
           in nvidia_smi("pci.bus_id,name,memory.total,pcie.link.width.current")}
    gpus = {g["pci_address"]: g for g in host["gpus"]}
    # sysfs (no NVML) lists every GPU on the PCI bus, also those a container does not expose.
    same = sorted(gpus) == sorted(smi) if nvml_installed() else set(smi) <= set(gpus)
    assert same, f"probe found GPUs at {sorted(gpus)}, nvidia-smi at {sorted(smi)}"
    assert all(g["vendor"] == "nvidia" for g in gpus.values()), host["gpus"]
    if nvml_installed():
        assert host["sources"]["gpus"] == "nvml", host["sources"]
        for address, (name, memory_mib, _) in smi.items():
            g = gpus[address]
            assert g["name"] == name and g["uuid"].startswith("GPU-"), g
            assert abs(g["memory_mib"] - memory_mib) <= 0.01 * memory_mib, (g, memory_mib)
    else:
        assert host["sources"]["gpus"] == "sysfs", host["sources"]

    pci = {d["address"]: d for d in host["pci_devices"]}
    links = []
    for address, (_, _, width) in smi.items():
        d = pci.get(address)
        assert d is not None and d["role"] == "gpu", (address, sorted(pci))
        assert d["vendor_id"] == "0x10de" and d["root"], d
        for key in ("current_speed_gts", "current_width", "max_speed_gts", "max_width"):
            assert d[key], f"{key} of the GPU at {address} not read: {d}"
        # Idle GPUs drop the link speed to save power, never above the maximum; the width stays.
        assert d["current_speed_gts"] <= d["max_speed_gts"] and d["current_width"] <= d["max_width"], d
        assert d["current_width"] == width, f"probe x{d['current_width']}, nvidia-smi x{width}"
        links.append(f"{address} {d['current_speed_gts']:g}/{d['max_speed_gts']:g} GT/s "
                     f"x{d['current_width']}/x{d['max_width']}")

    info = host["host"]
    driver = nvidia_smi("driver_version")[0][0]
    assert info["driver_version"] == driver, (info["driver_version"], driver)
    assert info["torch_version"] == gpu["torch"] and info["cuda_version"] == gpu["cuda"], info
    assert info["nccl_version"] == gpu["nccl"], f"probe says NCCL {info['nccl_version']}, torch {gpu['nccl']}"
    note(f"probe: {len(smi)} GPU(s) via {host['sources']['gpus']}; PCIe (current/max) " + "; ".join(links)
         + f"; driver {driver}, CUDA {info['cuda_version']}, NCCL {info['nccl_version']}")


def test_fabric_tune_reports_the_nccl_version(tmp_path: Path, gpu: dict[str, Any], note: Any) -> None:
    expected = gpu.get("nccl")
    assert expected, f"torch has no NCCL version: {gpu}"
    args = ["fabric", "tune", "--backend", "nccl", "--nproc-per-node", "1"]
    text = run_aitrain(args, tmp_path, timeout=120)
    assert text.returncode == 0, text.stderr + text.stdout[-2000:]
    as_json = run_aitrain([*args, "--json"], tmp_path, timeout=120)
    assert as_json.returncode == 0, as_json.stderr + as_json.stdout[-2000:]
    hosts = json.loads(as_json.stdout)["hosts"]
    assert hosts and all(h["env"].get("NCCL_SOCKET_IFNAME") for h in hosts), hosts
    missing = []
    if f"NCCL {expected}" not in text.stdout:
        missing.append(f"the table names no 'NCCL {expected}' (each host's header line should)")
    if [h.get("nccl_version") for h in hosts] != [expected] * len(hosts):
        missing.append(f"--json hosts[].nccl_version is {[h.get('nccl_version') for h in hosts]}, "
                       f"expected {expected!r}")
    assert not missing, ("`aitrain fabric tune` does not say which NCCL version it tuned for: "
                         + "; ".join(missing) + "\n--- table\n" + text.stdout[:2000])
    note(f"tune: NCCL {expected} reported")
