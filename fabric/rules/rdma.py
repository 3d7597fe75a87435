"""Per-host RDMA rules: port state, rate, RoCE GIDs and MTU, firmware."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from aitrain.fabric.findings import Finding, Severity
from aitrain.fabric.probe.infiniband import netdev_mtu_for_roce, roce_mtu_for_netdev
from aitrain.fabric.rules import CheckOptions, HostView, fmt_rate
from aitrain.fabric.topology import GID_TYPE_ROCE_V2, RdmaDevice, RdmaPort

E, W, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO


def subject(dev: RdmaDevice, port: RdmaPort) -> str:
    return f"{dev.name}/{port.port}"


def no_rdma(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    if not view.topo.rdma_devices:
        yield view.finding(
            "rdma-none", INFO, "rdma",
            "no RDMA devices (nothing in /sys/class/infiniband): collectives between hosts "
            "will use TCP sockets",
            "fine on a single host or for small jobs; for multi-node GPU training load the "
            "HCA drivers (rdma-core, mlx5_ib) and check `ls /sys/class/infiniband`",
        )


def _not_active_hint(dev: RdmaDevice, port: RdmaPort) -> str:
    if port.is_roce:
        netdev = port.netdev or "<netdev>"
        return (f"a RoCE port follows its netdev: `ip link set {netdev} up` and check the "
                f"cable and switch port (`ethtool {netdev}`); or exclude it with NCCL_IB_HCA")
    if port.state == "INIT" and port.is_link_up:
        return ("the link is up but no subnet manager has configured the port: check that "
                "opensm/UFM runs and sees it (`sminfo`, `ibstat " + dev.name + "`)")
    if port.phys_state == "Polling":
        return (f"no link partner: check the cable, transceiver and switch port "
                f"(`ibstat {dev.name}`, `mlxlink -d {dev.name} -m`); or exclude the port "
                f"with NCCL_IB_HCA")
    return (f"check the cable and switch port (`ibstat {dev.name}`); or exclude the port "
            f"with NCCL_IB_HCA=^{dev.name}")


def port_state(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    for dev, port in view.topo.rdma_ports():
        s = subject(dev, port)
        data = {"state": port.state, "phys_state": port.phys_state}
        if port.state == "UNKNOWN":
            continue  # unreadable: the probe warning names the file
        if not port.is_active:
            if port.phys_state == "Disabled":
                yield view.finding(
                    "rdma-port-disabled", W, s,
                    f"{s} is administratively disabled ({port.state}, phys_state Disabled); "
                    f"it will carry no traffic",
                    f"if it should be used, enable the switch port or `ip link set "
                    f"{port.netdev or '<netdev>'} up`; otherwise exclude it with NCCL_IB_HCA=^{dev.name}",
                    **data,
                )
            else:
                yield view.finding(
                    "rdma-port-not-active", E, s,
                    f"{s} is {port.state} (phys_state {port.phys_state}); expected ACTIVE",
                    _not_active_hint(dev, port), **data,
                )
        elif not port.is_link_up and port.phys_state != "unknown":
            yield view.finding(
                "rdma-port-not-linkup", E, s,
                f"{s} is ACTIVE but its physical link is {port.phys_state}; expected LinkUp",
                f"the physical link is training or recovering: check the cable and transceiver "
                f"(`mlxlink -d {dev.name} -m`), and the switch port's error counters",
                **data,
            )


def _groups(view: HostView) -> dict[tuple[str, str], list[tuple[RdmaDevice, RdmaPort]]]:
    """Active ports grouped by (link layer, HCA model): only like is compared with like,
    so a 100G front-end NIC is not a slow port of a 400G compute fabric."""
    groups: dict[tuple[str, str], list[tuple[RdmaDevice, RdmaPort]]] = defaultdict(list)
    for dev, port in view.topo.rdma_ports():
        if port.is_active and port.rate_gbps is not None:
            groups[(port.link_layer, dev.hca_type or "?")].append((dev, port))
    return groups


def main_fabric(view: HostView) -> list[tuple[RdmaDevice, RdmaPort]]:
    """The largest group of like ports (ties: the faster), taken as the compute fabric."""
    groups = _groups(view)
    if not groups:
        return []
    return max(groups.values(), key=lambda ports: (len(ports), max(p.rate_gbps or 0 for _, p in ports)))


def port_rate(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    for (link_layer, hca), ports in _groups(view).items():
        best = max(p.rate_gbps or 0.0 for _, p in ports)
        for dev, port in ports:
            if port.rate_gbps is not None and port.rate_gbps < best:
                s = subject(dev, port)
                peers = sum(1 for _, p in ports if p.rate_gbps == best)
                yield view.finding(
                    "rdma-rate-below-peers", E, s,
                    f"{s} runs at {fmt_rate(port.rate_gbps)} ({port.rate_text or 'no rate text'}) while "
                    f"{peers} other {hca} {link_layer} port(s) on this host run at {fmt_rate(best)}: "
                    f"collectives run at the pace of the slowest rail",
                    f"a degraded link: reseat or replace the cable/transceiver, check "
                    f"`mlxlink -d {dev.name} -m`; or exclude the port with NCCL_IB_HCA=^{dev.name}",
                    rate_gbps=port.rate_gbps, peer_rate_gbps=best,
                )
    if opts.expected_rate_gbps is not None:
        for dev, port in main_fabric(view):
            if port.rate_gbps is not None and port.rate_gbps < opts.expected_rate_gbps:
                s = subject(dev, port)
                yield view.finding(
                    "rdma-rate-below-expected", E, s,
                    f"{s} runs at {fmt_rate(port.rate_gbps)} ({port.rate_text or 'no rate text'}); "
                    f"expected at least {fmt_rate(opts.expected_rate_gbps)} (fabric.expected_rate_gbps)",
                    f"check the cable, transceiver and switch port speed (`mlxlink -d {dev.name}`), "
                    f"or lower fabric.expected_rate_gbps if this is the fabric's real speed",
                    rate_gbps=port.rate_gbps, expected_rate_gbps=opts.expected_rate_gbps,
                )


def roce_gids(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    for dev, port in view.topo.rdma_ports():
        if not (port.is_roce and port.is_active):
            continue
        s = subject(dev, port)
        netdev = port.netdev or "<netdev>"
        if not port.gids_known:
            yield view.finding(
                "roce-gid-table-unknown", INFO, s,
                f"the GID table of RoCE port {s} was not readable, so its RoCE v2 GIDs were not checked",
                "run the probe on the live host, or check "
                f"`ls /sys/class/infiniband/{dev.name}/ports/{port.port}/gids`",
            )
            continue
        v2 = [g for g in port.gids if g.type == GID_TYPE_ROCE_V2 and not g.is_zero]
        if not v2:
            yield view.finding(
                "roce-no-v2-gid", E, s,
                f"RoCE port {s} has no RoCE v2 GID ({len(port.gids)} GIDs, none of type RoCE v2); "
                f"NCCL uses RoCE v2 by default and cannot connect",
                f"give {netdev} an IP address (each address adds a RoCE v2 GID; see `show_gids`), "
                f"or, only if the whole fabric is RoCE v1, set NCCL_IB_ROCE_VERSION_NUM=1",
                gids=len(port.gids),
            )
        elif not any(g.is_routable for g in v2):
            yield view.finding(
                "roce-only-link-local-gid", E, s,
                f"RoCE port {s} has only link-local RoCE v2 GIDs "
                f"({', '.join(g.gid for g in v2[:2])}): link-local GIDs are not routed, so "
                f"connections to other hosts time out in ibv_modify_qp",
                f"assign an IPv4 (or global IPv6) address to {netdev}: it adds a routable RoCE v2 "
                f"GID (::ffff:a.b.c.d); NCCL picks it, or pin it with NCCL_IB_GID_INDEX",
                gids=[g.gid for g in v2],
            )


def roce_mtu(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    for dev, port in view.topo.rdma_ports():
        if not (port.is_roce and port.is_active) or port.active_mtu is None:
            continue
        if port.active_mtu >= 4096 or (port.max_mtu is not None and port.max_mtu < 4096):
            continue
        s = subject(dev, port)
        nic = view.nics.get(port.netdev or "")
        netdev_mtu = nic.mtu if nic else None
        needed = netdev_mtu_for_roce(4096)
        if netdev_mtu is not None and netdev_mtu >= needed:
            yield view.finding(
                "roce-mtu-below-4096", W, s,
                f"RoCE port {s} runs with active MTU {port.active_mtu} although its netdev "
                f"{port.netdev} has MTU {netdev_mtu}, enough for 4096",
                f"reload the port's config (`ip link set {port.netdev} mtu {netdev_mtu}` again) or "
                f"check the driver's RoCE MTU setting; NCCL_IB_MTU can't exceed the active MTU",
                active_mtu=port.active_mtu, netdev_mtu=netdev_mtu,
            )
        elif netdev_mtu is not None:
            yield view.finding(
                "roce-mtu-limited-by-netdev", INFO, s,
                f"RoCE port {s} runs with active MTU {port.active_mtu} because netdev "
                f"{port.netdev} has MTU {netdev_mtu} (RoCE MTU {roce_mtu_for_netdev(netdev_mtu)})",
                f"if the switches allow jumbo frames, `ip link set {port.netdev} mtu 9000` "
                f"(at least {needed}) gives RoCE MTU 4096",
                active_mtu=port.active_mtu, netdev_mtu=netdev_mtu,
            )


def netdev_down(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    for dev, port in view.topo.rdma_ports():
        nic = view.nics.get(port.netdev or "")
        if port.is_active and nic is not None and nic.operstate == "down":
            s = subject(dev, port)
            yield view.finding(
                "rdma-netdev-down", W, s,
                f"{s} is ACTIVE but its netdev {nic.name} is down"
                + (" (IPoIB: rdma_cm and IP-based bootstrap over it fail)" if not port.is_roce else ""),
                f"`ip link set {nic.name} up` and check its configuration (`ip addr show {nic.name}`)",
                netdev=nic.name,
            )


def firmware(view: HostView, opts: CheckOptions) -> Iterable[Finding]:
    by_model: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for dev in view.topo.rdma_devices:
        if dev.hca_type and dev.fw_ver:
            by_model[dev.hca_type][dev.fw_ver].append(dev.name)
    for model, versions in by_model.items():
        if len(versions) < 2:
            continue
        common = max(versions, key=lambda v: len(versions[v]))
        for version, names in versions.items():
            if version == common:
                continue
            yield view.finding(
                "rdma-firmware-mismatch", W, ",".join(names),
                f"{model} firmware {version} on {', '.join(names)}; the other {model} devices run "
                f"{common}",
                "flash the same firmware on every HCA of one model (`mlxfwmanager --query`)",
                fw_ver=version, common_fw_ver=common,
            )


RULES = (no_rdma, port_state, port_rate, roce_gids, roce_mtu, netdev_down, firmware)
