"""Findings: what a check found, as data. Checks never print; the CLI renders these."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        return {"error": 0, "warning": 1, "info": 2}[self.value]


@dataclass(frozen=True)
class Finding:
    """One thing a check found on one host.

    ``id`` is stable and kebab-case (``rdma-port-not-active``) so scripts can match
    on it; ``subject`` names the thing (``mlx5_0/1``, ``eth0``, ``kernel.numa_balancing``);
    ``hint`` says how to fix it.
    """

    id: str
    severity: Severity
    host: str
    subject: str
    message: str
    hint: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["severity"] = self.severity.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        d = dict(d)
        d["severity"] = Severity(d["severity"])
        d.setdefault("data", {})
        return cls(**d)


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity is Severity.ERROR for f in findings)


def sort_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (f.severity.rank, f.host, f.id, f.subject))
