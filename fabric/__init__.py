"""Fabric discovery, validation and tuning.

Topology in, findings and env out: this package imports nothing from
``aitrain.launcher`` or ``aitrain.strategies``, and nothing heavy (torch) at import.

- ``probe(sysfs_root="/sys", proc_root="/proc", ...) -> HostTopology``
- ``check(cluster, *, expected_rate_gbps=None, rendezvous=None) -> list[Finding]``
- ``preflight(...)``: probe + check with a per-host cache, for ``aitrain launch``
- ``tune(cluster, *, rendezvous=None, nccl_version=None, user_env=None, ...) -> {host: TunedEnv}``
"""

from aitrain.fabric import probe  # the readers package, made callable below
from aitrain.fabric.checks import FINDING_IDS, check
from aitrain.fabric.findings import Finding, Severity, has_errors, sort_findings
from aitrain.fabric.topology import (
    Cluster,
    Gid,
    Gpu,
    HostInfo,
    HostTopology,
    Limit,
    Nic,
    PciDevice,
    ProbeWarning,
    RdmaDevice,
    RdmaPort,
    Route,
    RouteLookup,
)

__all__ = [
    "FINDING_IDS",
    "Cluster",
    "Finding",
    "Gid",
    "Gpu",
    "HostInfo",
    "HostTopology",
    "Limit",
    "Nic",
    "PciDevice",
    "ProbeWarning",
    "RdmaDevice",
    "RdmaPort",
    "Route",
    "RouteLookup",
    "Severity",
    "check",
    "has_errors",
    "probe",
    "sort_findings",
]

from aitrain.fabric.cache import FabricCache, PreflightResult, preflight  # noqa: E402

__all__ += ["FabricCache", "PreflightResult", "preflight"]


class _CallableProbePackage(type(probe)):  # type: ignore[misc]
    """``aitrain.fabric.probe`` is the readers package *and* ``probe(...)``.

    Binding the function to the package's name would hide the package from
    ``import aitrain.fabric.probe.verbs as v``; calling the package keeps both."""

    def __call__(self, *args: object, **kwargs: object) -> HostTopology:
        return self.probe(*args, **kwargs)

    __call__.__doc__ = probe.probe.__doc__


probe.__class__ = _CallableProbePackage

from aitrain.fabric import tune  # noqa: E402  (the tuning module, made callable below)


class _CallableTuneModule(type(tune)):  # type: ignore[misc]
    """``aitrain.fabric.tune(cluster, ...)`` is ``aitrain.fabric.tune.tune``; the module
    (``from aitrain.fabric.tune import TuneOptions``) stays what it is."""

    def __call__(self, *args: object, **kwargs: object) -> dict[str, tune.TunedEnv]:
        return self.tune(*args, **kwargs)

    __call__.__doc__ = tune.tune.__doc__


tune.__class__ = _CallableTuneModule
__all__ += ["tune"]
