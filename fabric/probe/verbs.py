"""RDMA devices through pyverbs (rdma-core's Python bindings), when importable.

This is a second, independent reader of the same devices as the sysfs one: it asks
libibverbs, so it sees active/max MTU, which sysfs lacks. No RDMA devices is a normal
answer: ``get_device_list()`` raising ``PyverbsRDMAError`` ("Failed to get devices
list") or returning [] both mean zero devices, never a crash.

Debian/Ubuntu ship pyverbs as ``python3-pyverbs``; ``scripts/expose_pyverbs.py``
makes that package importable from a virtualenv.
"""

from __future__ import annotations

import importlib
import socket
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from aitrain.fabric.probe import parse
from aitrain.fabric.topology import (
    GID_TYPE_IB_ROCE_V1,
    GID_TYPE_ROCE_V2,
    LINK_LAYER_ETHERNET,
    LINK_LAYER_IB,
    Gid,
    ProbeWarning,
    RdmaDevice,
    RdmaPort,
)

MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
WIDTH_LANES = {1: 1, 2: 4, 4: 8, 8: 12, 16: 2}
# Gb/s per lane as the kernel's sysfs ``rate`` counts it (EDR 25, FDR 14, ...)
SPEED_GBPS = {1: 2.5, 2: 5.0, 4: 10.0, 8: 10.0, 16: 14.0, 32: 25.0, 64: 50.0, 128: 100.0, 256: 200.0}
GID_TYPES = {0: GID_TYPE_IB_ROCE_V1, 1: GID_TYPE_IB_ROCE_V1, 2: GID_TYPE_ROCE_V2}
LINK_LAYERS = {0: LINK_LAYER_IB, 1: LINK_LAYER_IB, 2: LINK_LAYER_ETHERNET}
MELLANOX_VENDOR_ID = 0x02C9

MAX_GIDS = 256


@dataclass
class VerbsResult:
    status: str
    """``unavailable`` (pyverbs not importable), ``no-devices``, ``ok`` or ``error``."""
    devices: list[RdmaDevice] = field(default_factory=list)
    warnings: list[ProbeWarning] = field(default_factory=list)
    detail: str = ""


def load_pyverbs() -> ModuleType | None:
    try:
        return importlib.import_module("pyverbs.device")
    except Exception:  # ImportError, or a broken binary module (OSError, ...)
        return None


def rate_gbps(active_width: int, active_speed: int) -> float | None:
    lanes = WIDTH_LANES.get(active_width)
    per_lane = SPEED_GBPS.get(active_speed)
    if lanes is None or per_lane is None:
        return None
    return lanes * per_lane


def _guid(module: ModuleType, value: Any) -> str | None:
    if isinstance(value, str):
        return value
    try:
        return str(module.guid_format(value))
    except Exception:
        return None


def _name(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _ifname(ifindex: int) -> str | None:
    if not ifindex:
        return None
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return None


def read_verbs_devices(module: ModuleType | None = None) -> VerbsResult:
    """Every device libibverbs sees, with ports and GID tables."""
    module = module if module is not None else load_pyverbs()
    if module is None:
        return VerbsResult(status="unavailable", detail="pyverbs is not importable")
    try:
        listed = module.get_device_list()
    except Exception as e:  # PyverbsRDMAError: no devices / no kernel support
        return VerbsResult(status="no-devices", detail=str(e))
    if not listed:
        return VerbsResult(status="no-devices")
    result = VerbsResult(status="ok")
    for entry in listed:
        name = _name(getattr(entry, "name", entry))
        try:
            result.devices.append(_read_device(module, name))
        except Exception as e:
            result.warnings.append(ProbeWarning(
                path=f"pyverbs:{name}", message=f"cannot query device: {e}", kind="tool-failed"))
    return result


def _read_device(module: ModuleType, name: str) -> RdmaDevice:
    ctx = module.Context(name=name)
    try:
        attr = ctx.query_device()
        vendor_id = getattr(attr, "vendor_id", None)
        part = getattr(attr, "vendor_part_id", None)
        dev = RdmaDevice(
            name=name,
            fw_ver=str(attr.fw_version) or None,
            node_guid=_guid(module, getattr(attr, "node_guid", None)),
            hca_type=f"MT{part}" if vendor_id == MELLANOX_VENDOR_ID and part else None,
            source="pyverbs",
        )
        table = _gid_table(ctx)
        for number in range(1, int(attr.phys_port_cnt) + 1):
            dev.ports.append(_read_port(module, ctx, number, table))
        return dev
    finally:
        try:
            ctx.close()
        except Exception:
            pass


def _gid_table(ctx: Any) -> list[Any] | None:
    try:
        return list(ctx.query_gid_table(MAX_GIDS * 4))
    except Exception:
        return None  # older kernels: fall back to query_gid per index


def _read_port(module: ModuleType, ctx: Any, number: int, table: list[Any] | None) -> RdmaPort:
    pa = ctx.query_port(number)
    port = RdmaPort(
        port=number,
        state=parse.PORT_STATES.get(int(pa.state), "UNKNOWN"),
        phys_state=parse.PHYS_STATES.get(int(pa.phys_state), "<unknown>"),
        rate_gbps=rate_gbps(int(pa.active_width), int(pa.active_speed)),
        link_layer=LINK_LAYERS.get(int(pa.link_layer), "unknown"),
        active_mtu=MTU_BYTES.get(int(pa.active_mtu)),
        max_mtu=MTU_BYTES.get(int(pa.max_mtu)),
        lid=hex(int(pa.lid)) if getattr(pa, "lid", None) is not None else None,
    )
    if table is not None:
        for entry in table:
            if int(entry.port_num) != number:
                continue
            gid = _gid_text(entry)
            if gid is None:
                continue
            port.gids.append(Gid(
                index=int(entry.gid_index),
                gid=gid,
                type=GID_TYPES.get(int(entry.gid_type)),
                netdev=_ifname(int(getattr(entry, "ndev_ifindex", 0) or 0)),
            ))
        port.gids_known = True
    else:
        port.gids, port.gids_known = _query_gids(ctx, number, int(getattr(pa, "gid_tbl_len", 0) or 0))
    port.gids.sort(key=lambda g: g.index)
    netdevs = [g.netdev for g in port.gids if g.netdev]
    port.netdev = netdevs[0] if netdevs else None
    return port


def _gid_text(entry: Any) -> str | None:
    raw = entry.gid_str() if callable(getattr(entry, "gid_str", None)) else getattr(entry, "gid_str", None)
    if raw is None:
        return None
    try:
        gid = parse.parse_gid(_name(raw))
    except ValueError:
        return None
    return None if int(gid.replace(":", ""), 16) == 0 else gid


def _query_gids(ctx: Any, port: int, length: int) -> tuple[list[Gid], bool]:
    gids = []
    for index in range(min(length, MAX_GIDS)):
        try:
            gid = parse.parse_gid(str(ctx.query_gid(port, index)))
        except Exception:
            continue
        if int(gid.replace(":", ""), 16) == 0:
            continue
        try:
            gtype = GID_TYPES.get(int(ctx.query_gid_type(port, index)))
        except Exception:
            gtype = None
        gids.append(Gid(index=index, gid=gid, type=gtype))
    return gids, length > 0


def disagreements(sysfs: list[RdmaDevice], verbs: list[RdmaDevice]) -> list[str]:
    """Where two readers of the same devices differ: device and port sets, port state,
    physical state, link layer, rate, firmware, node GUID, HCA type and GID tables.
    Fields one side does not know (None) are not compared."""
    out: list[str] = []
    a = {d.name: d for d in sysfs}
    b = {d.name: d for d in verbs}
    for name in sorted(a.keys() ^ b.keys()):
        out.append(f"{name}: only in {'sysfs' if name in a else 'pyverbs'}")
    for name in sorted(a.keys() & b.keys()):
        da, db = a[name], b[name]
        for what in ("fw_ver", "node_guid", "hca_type"):
            va, vb = getattr(da, what), getattr(db, what)
            if va is not None and vb is not None and va != vb:
                out.append(f"{name}: sysfs says {what}={va}, pyverbs says {vb}")
        pa = {p.port: p for p in da.ports}
        pb = {p.port: p for p in db.ports}
        for number in sorted(pa.keys() ^ pb.keys()):
            out.append(f"{name}/{number}: only in {'sysfs' if number in pa else 'pyverbs'}")
        for number in sorted(pa.keys() & pb.keys()):
            x, y = pa[number], pb[number]
            for what in ("state", "phys_state", "link_layer", "rate_gbps"):
                vx, vy = getattr(x, what), getattr(y, what)
                if vx is not None and vy is not None and vx != vy:
                    out.append(f"{name}/{number}: sysfs says {what}={vx}, pyverbs says {vy}")
            if x.gids_known and y.gids_known:
                gx = {(g.index, g.gid, g.type) for g in x.gids}
                gy = {(g.index, g.gid, g.type) for g in y.gids}
                for index, gid, gtype in sorted(gx ^ gy):
                    side = "sysfs" if (index, gid, gtype) in gx else "pyverbs"
                    out.append(f"{name}/{number}: GID[{index}] {gid} ({gtype}) only in {side}")
    return out


def merge(sysfs: list[RdmaDevice], verbs: list[RdmaDevice], warnings: list[ProbeWarning]) -> list[RdmaDevice]:
    """sysfs devices completed with what only verbs knows (active/max MTU); every
    disagreement is a warning; verbs-only devices (sysfs hidden, e.g. in a container)
    are added."""
    for problem in disagreements(sysfs, verbs):
        if "only in sysfs" in problem:
            continue  # a device libibverbs has no provider for: nothing to merge
        path, _, message = problem.partition(": ")
        warnings.append(ProbeWarning(path=f"pyverbs:{path}", message=message, kind="sysfs-verbs-mismatch"))
    by_name = {d.name: d for d in sysfs}
    out = list(sysfs)
    for vdev in verbs:
        sdev = by_name.get(vdev.name)
        if sdev is None:
            out.append(vdev)
            continue
        sdev.source = "sysfs+pyverbs"
        for vport in vdev.ports:
            sport = sdev.port(vport.port)
            if sport is None:
                sdev.ports.append(vport)
                continue
            if vport.active_mtu is not None:
                sport.active_mtu = vport.active_mtu
            if vport.max_mtu is not None:
                sport.max_mtu = vport.max_mtu
            if not sport.gids_known and vport.gids_known:
                sport.gids, sport.gids_known = vport.gids, True
    return out
