"""``check_host``: run every host rule and return findings (the same model as the fabric check)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from aitrain.errors import FabricError
from aitrain.fabric.findings import Finding, Severity
from aitrain.fabric.host.cpus import read_numa_nodes
from aitrain.fabric.host.model import HostContext, Rule, Status, Verdict
from aitrain.fabric.host.readers import (
    HostPaths,
    has_rdma_devices,
    read_cgroup,
    read_hostname,
    read_meminfo,
)
from aitrain.fabric.host.rules import RULES

DEFAULT_RENDEZVOUS_PORTS: tuple[int, ...] = (29400, 29500)  # torchrun c10d, MASTER_PORT


def host_context(
    paths: HostPaths,
    *,
    rdma: bool | None = None,
    rendezvous_ports: Iterable[int] = DEFAULT_RENDEZVOUS_PORTS,
) -> HostContext:
    """Read the facts several rules share. ``rdma=None`` looks for ``<sys>/class/infiniband``."""
    for root, flag in ((paths.proc, "--proc-root"), (paths.sys, "--sysfs-root")):
        if not os.path.isdir(root):  # os.path: Path.is_dir raises under an untraversable dir
            raise FabricError(f"cannot read host settings: {root} is not a directory",
                              f"pass {flag} pointing at a mounted or captured tree")
        try:
            os.listdir(root)
        except OSError as e:  # unreadable: every setting would read as "not available"
            raise FabricError(f"cannot read host settings: {root}: {e.strerror or e}",
                              f"run as a user who can read it (sudo), or pass {flag} pointing at "
                              "a readable tree") from e
    nodes = read_numa_nodes(paths.sys)
    return HostContext(
        paths=paths,
        rdma=has_rdma_devices(paths) if rdma is None else rdma,
        rendezvous_ports=tuple(sorted(set(rendezvous_ports))),
        numa_nodes=len(nodes) if nodes else None,
        meminfo=read_meminfo(paths),
        cgroup=read_cgroup(paths),
    )


@dataclass(frozen=True)
class Evaluated:
    """One rule with what it found."""

    rule: Rule
    verdict: Verdict


def evaluate_rules(ctx: HostContext, only: Iterable[str] | None = None) -> list[Evaluated]:
    """Every rule's verdict, in table order. ``only`` restricts to these finding ids."""
    wanted = select_rule_ids(only)
    return [Evaluated(rule, rule.evaluate(ctx)) for rule in RULES if wanted is None or rule.id in wanted]


def select_rule_ids(only: Iterable[str] | None) -> set[str] | None:
    """The ids in ``only`` as a set (None stays None); an unknown id lists the valid ones."""
    if only is None:
        return None
    wanted = set(only)
    known = {r.id for r in RULES}
    unknown = sorted(wanted - known)
    if unknown:
        raise FabricError(f"unknown host setting id(s): {', '.join(unknown)}",
                          f"valid ids: {', '.join(r.id for r in RULES)}")
    return wanted


def to_finding(item: Evaluated, host: str) -> Finding:
    rule, v = item.rule, item.verdict
    if v.status is Status.NOT_AVAILABLE:
        severity = Severity.INFO
        message = f"{rule.subject}: not available on this host ({v.detail})"
        hint = ""
    elif v.status is Status.OK:
        severity = Severity.INFO
        message = f"{rule.subject} = {v.current} (recommended {v.recommended})"
        hint = ""
    else:
        severity = v.severity
        message = f"{rule.subject} is {v.current}, recommended {v.recommended}: {rule.why}"
        if v.detail:
            message += f" {v.detail}"
        hint = v.fix + (f" (persist: {v.persist})" if v.persist else "")
    data = {
        "status": v.status.value,
        "current": v.current,
        "recommended": v.recommended,
        "why": rule.why,
        "fix": v.fix,
        "persist": v.persist,
        "tunable": bool(v.writes),
        "source": v.source,
    }
    return Finding(rule.id, severity, host, rule.subject, message, hint, data)


def check_host(
    paths: HostPaths | None = None,
    *,
    rdma: bool | None = None,
    rendezvous_ports: Iterable[int] = DEFAULT_RENDEZVOUS_PORTS,
    include_ok: bool = False,
    host: str | None = None,
) -> list[Finding]:
    """Findings for the host at ``paths`` (the live host by default), in table order.

    Settings that differ from the recommendation and settings the host does not
    expose (severity info, ``data["status"] == "not-available"``) are always
    returned; settings that match only with ``include_ok``. ``rdma`` (None: detect
    from sysfs) turns a low memlock limit into an error. Raises FabricError only
    when a root is not a directory.

    ``data`` of each finding: ``status`` (ok | change | not-available), ``current``,
    ``recommended``, ``why``, ``fix`` (a command to paste), ``persist`` (how to keep it
    across reboots), ``tunable`` (``host tune --apply`` would change it), ``source``.
    """
    paths = paths or HostPaths()
    ctx = host_context(paths, rdma=rdma, rendezvous_ports=rendezvous_ports)
    name = host or read_hostname(paths)
    findings = [to_finding(item, name) for item in evaluate_rules(ctx)]
    if include_ok:
        return findings
    return [f for f in findings if f.data["status"] != Status.OK.value]
