"""Parsers for rdma-core / infiniband-diags printouts: ``ibv_devinfo [-v]``, ``ibstat``,
``ibstatus``, and pyverbs' ``print(ctx.query_port(n))``.

They turn what users paste (or what a node's health check saved) into the same
:class:`RdmaDevice` model the sysfs reader produces, so the two can be compared and
checked. They are lenient: tabs or spaces, missing trailing newline, a tool that died
part-way (``ibpanic: ...``) all parse to what is there; an unparseable line is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from aitrain.fabric.probe import parse
from aitrain.fabric.probe.verbs import MTU_BYTES
from aitrain.fabric.topology import Gid, RdmaDevice, RdmaPort

T = TypeVar("T")

_KV = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_ ]*?)\s*:\s*(.*?)\s*$")
_GID_LINE = re.compile(r"^\s*GID\[\s*(\d+)\]\s*:\s*([0-9a-fA-F:.]+)\s*(?:,\s*(.+?))?\s*$")


def _mtu(text: str) -> int | None:
    m = re.match(r"^\s*(\d+)", text)
    if m and int(m.group(1)) in MTU_BYTES.values():
        return int(m.group(1))
    m = re.search(r"\((\d+)\)", text)
    return MTU_BYTES.get(int(m.group(1))) if m else None


def _safe(fn: Callable[[str], T], text: str) -> T | None:
    try:
        return fn(text)
    except ValueError:
        return None


def _speed_width_rate(width: str | None, speed: str | None) -> float | None:
    """``4X (2)`` x ``25.0 Gbps (32)`` -> 100.0."""
    if not width or not speed:
        return None
    w = re.match(r"^\s*(\d+)X", width)
    s = re.match(r"^\s*(\d+(?:\.\d+)?)\s*Gbps", speed)
    if not w or not s:
        return None
    return int(w.group(1)) * float(s.group(1))


def parse_ibv_devinfo(text: str) -> list[RdmaDevice]:
    """``ibv_devinfo`` and ``ibv_devinfo -v``."""
    devices: list[RdmaDevice] = []
    dev: RdmaDevice | None = None
    port: RdmaPort | None = None
    pending: dict[str, str] = {}

    def finish_port() -> None:
        if port is not None and "active_width" in pending:
            port.rate_gbps = _speed_width_rate(pending.get("active_width"), pending.get("active_speed"))

    for line in text.splitlines():
        g = _GID_LINE.match(line)
        if g and port is not None:
            gid = _safe(parse.parse_gid, g.group(2))
            if gid is not None:
                gtype = _safe(parse.parse_gid_type, g.group(3)) if g.group(3) else None
                port.gids.append(Gid(index=int(g.group(1)), gid=gid, type=gtype))
                port.gids_known = True
            continue
        m = _KV.match(line)
        if not m:
            continue
        key, value = m.group(1).strip().lower(), m.group(2)
        if key == "hca_id":
            finish_port()
            dev, port, pending = RdmaDevice(name=value, source="ibv_devinfo"), None, {}
            devices.append(dev)
        elif dev is None:
            continue
        elif key == "port":
            finish_port()
            port, pending = RdmaPort(port=int(value) if value.isdigit() else len(dev.ports) + 1), {}
            dev.ports.append(port)
        elif port is None:
            if key == "fw_ver":
                dev.fw_ver = value
            elif key == "node_guid":
                dev.node_guid = value
            elif key == "board_id":
                dev.board_id = value
            elif key == "vendor_part_id" and value.isdigit():
                dev.hca_type = f"MT{value}"
        elif key == "state":
            state = _safe(parse.parse_port_state, value)
            port.state = state[0] if state else "UNKNOWN"
        elif key == "phys_state":
            phys = _safe(parse.parse_phys_state, value)
            port.phys_state = phys[0] if phys else "unknown"
        elif key == "active_mtu":
            port.active_mtu = _mtu(value)
        elif key == "max_mtu":
            port.max_mtu = _mtu(value)
        elif key == "link_layer":
            port.link_layer = _safe(parse.parse_link_layer, value) or "unknown"
        elif key == "port_lid":
            port.lid = value
        elif key in ("active_width", "active_speed"):
            pending[key] = value
    finish_port()
    return devices


def parse_ibstat(text: str) -> list[RdmaDevice]:
    """``ibstat``: ``CA 'mlx5_0'`` blocks with ``Port N:`` sections."""
    devices: list[RdmaDevice] = []
    dev: RdmaDevice | None = None
    port: RdmaPort | None = None
    for line in text.splitlines():
        ca = re.match(r"^\s*CA\s+'([^']+)'", line)
        if ca:
            dev, port = RdmaDevice(name=ca.group(1), source="ibstat"), None
            devices.append(dev)
            continue
        if dev is None:
            continue
        p = re.match(r"^\s*Port\s+(\d+)\s*:\s*$", line)
        if p:
            port = RdmaPort(port=int(p.group(1)))
            dev.ports.append(port)
            continue
        m = _KV.match(line)
        if not m:
            continue
        key, value = m.group(1).strip().lower(), m.group(2)
        if port is None:
            if key == "ca type":
                dev.hca_type = value or None
            elif key == "firmware version":
                dev.fw_ver = value or None
            elif key == "node guid":
                dev.node_guid = value or None
        elif key == "state":
            state = _safe(parse.parse_port_state, value)
            port.state = state[0] if state else "UNKNOWN"
        elif key == "physical state":
            phys = _safe(parse.parse_phys_state, value)
            port.phys_state = phys[0] if phys else "unknown"
        elif key == "rate":
            port.rate_gbps = _safe(parse.parse_rate_gbps, value)
            port.rate_text = value
        elif key == "link layer":
            port.link_layer = _safe(parse.parse_link_layer, value) or "unknown"
        elif key == "base lid":
            port.lid = value
    return devices


def parse_ibstatus(text: str) -> list[RdmaDevice]:
    """``ibstatus``: ``Infiniband device 'mlx5_0' port 1 status:`` blocks."""
    devices: dict[str, RdmaDevice] = {}
    port: RdmaPort | None = None
    for line in text.splitlines():
        head = re.match(r"^\s*Infiniband device '([^']+)' port (\d+) status:", line)
        if head:
            dev = devices.setdefault(head.group(1), RdmaDevice(name=head.group(1), source="ibstatus"))
            port = RdmaPort(port=int(head.group(2)))
            dev.ports.append(port)
            continue
        m = _KV.match(line)
        if port is None or not m:
            continue
        key, value = m.group(1).strip().lower(), m.group(2)
        if key == "state":
            state = _safe(parse.parse_port_state, value)
            port.state = state[0] if state else "UNKNOWN"
        elif key == "phys state":
            phys = _safe(parse.parse_phys_state, value)
            port.phys_state = phys[0] if phys else "unknown"
        elif key == "rate":
            port.rate_gbps = _safe(parse.parse_rate_gbps, value)
            port.rate_text = value
        elif key == "link_layer":
            port.link_layer = _safe(parse.parse_link_layer, value) or "unknown"
        elif key == "default gid":
            gid = _safe(parse.parse_gid, value)
            if gid is not None:
                port.gids.append(Gid(index=0, gid=gid))
        elif key == "base lid":
            port.lid = value
    return list(devices.values())


def parse_pyverbs_port(text: str, number: int = 1) -> RdmaPort:
    """``print(ctx.query_port(n))`` (pyverbs' PortAttr), including its "Ative speed" typo."""
    port = RdmaPort(port=number)
    fields: dict[str, str] = {}
    for line in text.splitlines():
        m = _KV.match(line)
        if m:
            fields[m.group(1).strip().lower()] = m.group(2)
    if "port state" in fields:
        state = _safe(parse.parse_port_state, fields["port state"])
        port.state = state[0] if state else "UNKNOWN"
    if "phys state" in fields:
        phys = _safe(parse.parse_phys_state, fields["phys state"])
        port.phys_state = phys[0] if phys else "unknown"
    if "link layer" in fields:
        port.link_layer = _safe(parse.parse_link_layer, fields["link layer"]) or "unknown"
    if "active mtu" in fields:
        port.active_mtu = _mtu(fields["active mtu"])
    if "max mtu" in fields:
        port.max_mtu = _mtu(fields["max mtu"])
    speed = fields.get("active speed") or fields.get("ative speed")
    port.rate_gbps = _speed_width_rate(fields.get("active width"), speed)
    return port
