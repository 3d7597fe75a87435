"""The data a host rule produces: a verdict per setting, and the writes that would fix it."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from aitrain.fabric.findings import Severity
from aitrain.fabric.host.readers import CgroupInfo, HostPaths


class Status(str, enum.Enum):
    OK = "ok"
    CHANGE = "change"  # differs from the recommendation
    NOT_AVAILABLE = "not-available"


class WriteKind(str, enum.Enum):
    VALUE = "value"  # a sysctl-style file: reads back what was written
    SELECTOR = "selector"  # "always [madvise] never": reads back the choice in brackets


@dataclass(frozen=True)
class Write:
    """One file ``aitrain host tune --apply`` would write, and the value it would write."""

    path: str
    value: str
    kind: WriteKind = WriteKind.VALUE


@dataclass(frozen=True)
class Verdict:
    """What one rule found: current vs recommended, and how to fix it.

    ``fix`` is the runtime command an admin can paste; ``persist`` says how to keep
    it across reboots; ``writes`` is what ``host tune`` does (empty: a manual fix).
    """

    status: Status
    current: str | None
    recommended: str
    severity: Severity = Severity.INFO
    detail: str = ""
    fix: str = ""
    persist: str = ""
    source: str = ""
    writes: tuple[Write, ...] = ()


@dataclass(frozen=True)
class HostContext:
    """Everything a rule may look at besides the files it reads itself."""

    paths: HostPaths
    rdma: bool
    rendezvous_ports: tuple[int, ...]
    numa_nodes: int | None
    meminfo: dict[str, int]
    cgroup: CgroupInfo | None


@dataclass(frozen=True)
class Rule:
    """A host setting, why it matters for training, and how to judge it."""

    id: str
    subject: str
    why: str
    evaluate: Callable[[HostContext], Verdict]
