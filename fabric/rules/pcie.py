"""PCIe rules: links trained below their maximum, ACS redirecting peer-to-peer."""

from __future__ import annotations

from collections.abc import Iterable

from aitrain.fabric.findings import Finding, Severity
from aitrain.fabric.probe.pci import ACS_P2P_REDIRECT, effective_max
from aitrain.fabric.rules import CheckOptions, HostView

E, W, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO


def _name(view: HostView, address: str) -> str:
    return view.names_by_pci.get(address, address)


def link_degraded(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    for dev in view.topo.pci_devices:
        if dev.role not in ("nic", "gpu"):
            continue
        parent = view.pci.get(dev.upstream[-1]) if dev.upstream else None
        max_speed, max_width = effective_max(dev, parent)
        name = _name(view, dev.address)
        where = f"{name} ({dev.address})" if name != dev.address else dev.address
        if dev.current_width is not None and max_width is not None and dev.current_width < max_width:
            yield view.finding(
                "pcie-link-width-degraded", W, name,
                f"PCIe link of {where} runs at x{dev.current_width}; it can do x{max_width}: "
                f"{'network' if dev.role == 'nic' else 'GPU'} bandwidth is capped at "
                f"{dev.current_width}/{max_width} of its maximum",
                "reseat the card or riser, check the slot's wiring in the BIOS (bifurcation) "
                f"and `lspci -vv -s {dev.address}` (LnkSta vs LnkCap)",
                current_width=dev.current_width, max_width=max_width,
            )
        if dev.current_speed_gts is not None and max_speed is not None and dev.current_speed_gts < max_speed:
            idle_gpu = dev.role == "gpu"
            yield view.finding(
                "pcie-link-speed-degraded", INFO if idle_gpu else W, name,
                f"PCIe link of {where} runs at {dev.current_speed_gts:g} GT/s; it can do "
                f"{max_speed:g} GT/s"
                + (" (GPUs drop link speed when idle, so this may be power saving)" if idle_gpu else ""),
                ("re-check under load (`nvidia-smi -q -d PCIE`); if it stays low, reseat the GPU"
                 if idle_gpu else
                 f"check the slot generation in the BIOS, reseat the card and see "
                 f"`lspci -vv -s {dev.address}` (LnkSta vs LnkCap)"),
                current_speed_gts=dev.current_speed_gts, max_speed_gts=max_speed,
            )


def acs_enabled(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    """ACS P2P redirect sends GPU<->NIC and GPU<->GPU traffic up to the root complex:
    GPUDirect slows down or hangs. In a VM ACS is needed for passthrough, so only bare
    metal is checked."""
    topo = view.topo
    if topo.host.bare_metal is not True or not topo.gpus:
        return
    if not any(p.acs_ctrl and p.acs_ctrl & ACS_P2P_REDIRECT for p in topo.pci_devices):
        return
    above: dict[str, list[str]] = {}
    for dev in topo.pci_devices:
        if dev.role in ("gpu", "nic"):
            for bridge_address in dev.upstream:
                above.setdefault(bridge_address, []).append(_name(view, dev.address))
    for address, below in sorted(above.items()):
        bridge = view.pci.get(address)
        if bridge is None or bridge.acs_ctrl is None or not bridge.acs_ctrl & ACS_P2P_REDIRECT:
            continue
        yield view.finding(
            "pcie-acs-enabled", W, address,
            f"ACS P2P redirect is on (ACSCtl {bridge.acs_ctrl:#06x}) on bridge {address} above "
            f"{', '.join(sorted(set(below)))}: peer-to-peer PCIe traffic is forced through the root "
            f"complex, which slows GPUDirect RDMA and P2P or makes it hang",
            f"on bare metal disable ACS in the BIOS, or at boot: `setpci -s {address} ECAP_ACS+0x6.w=0000` "
            f"(NCCL troubleshooting: PCI Access Control Services)",
            acs_ctrl=bridge.acs_ctrl,
        )


RULES = (link_degraded, acs_enabled)
