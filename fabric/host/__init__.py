"""Host checks and tuning: kernel settings and limits that decide training throughput.

Readers take a proc root and a sysfs root (``HostPaths``), so the same code runs on
the live host and on captured trees in tests. ``check_host`` returns findings (the
model of ``aitrain fabric check``); ``plan_tune``/``apply_tune``/``revert`` change
the tunable ones and put them back exactly. ``cpu_sets_for_ranks`` gives the CPU
binding of local ranks.
"""

from aitrain.fabric.host.check import DEFAULT_RENDEZVOUS_PORTS, check_host
from aitrain.fabric.host.cpus import (
    CpuTopology,
    cpu_sets_for_ranks,
    format_cpulist,
    parse_cpulist,
    read_cpu_topology,
    read_numa_nodes,
    read_online_cpus,
    read_thread_siblings,
)
from aitrain.fabric.host.model import Status
from aitrain.fabric.host.readers import HostPaths
from aitrain.fabric.host.rules import RULES, rule_ids
from aitrain.fabric.host.tune import (
    PlannedChange,
    RevertResult,
    TunePlan,
    TuneResult,
    apply_tune,
    plan_tune,
    revert,
)

__all__ = [
    "DEFAULT_RENDEZVOUS_PORTS",
    "RULES",
    "CpuTopology",
    "HostPaths",
    "PlannedChange",
    "RevertResult",
    "Status",
    "TunePlan",
    "TuneResult",
    "apply_tune",
    "check_host",
    "cpu_sets_for_ranks",
    "format_cpulist",
    "parse_cpulist",
    "plan_tune",
    "read_cpu_topology",
    "read_numa_nodes",
    "read_online_cpus",
    "read_thread_siblings",
    "revert",
    "rule_ids",
]
