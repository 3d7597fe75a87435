"""Across hosts: what must be the same everywhere for collectives not to hang or crawl.

Each rule takes one value per host, finds the most common one (the reference) and
reports every host that differs, naming how many hosts have the reference: linear in
the number of hosts.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

from aitrain.fabric.findings import Finding, Severity
from aitrain.fabric.rules import CheckOptions, HostView
from aitrain.fabric.topology import LINK_LAYER_ETHERNET, LINK_LAYER_IB

E, W = Severity.ERROR, Severity.WARNING
K = TypeVar("K", bound=Hashable)

EXAMPLES = 3


def _deviants(
    views: list[HostView],
    value: Callable[[HostView], K | None],
    prefer: Callable[[K], object] | None = None,
) -> tuple[K | None, str, list[tuple[HostView, K]]]:
    """(reference value, "N of M hosts (e.g. a, b, c)" text, [(host, its other value)]).

    The reference is the most common known value; a tie goes to the value ``prefer``
    ranks highest (else the one seen first). Hosts whose value is unknown (None) are
    left out. One pass over the hosts."""
    known = [(v, x) for v in views if (x := value(v)) is not None]
    if not known:
        return None, "", []
    counts = Counter(x for _, x in known)
    top = max(counts.values())
    tied = [x for x, c in counts.items() if c == top]
    reference = max(tied, key=prefer) if prefer is not None else tied[0]  # type: ignore[arg-type]
    count = top
    examples = [v.host for v, x in known if x == reference][:EXAMPLES]
    who = f"{count} of {len(views)} hosts (e.g. {', '.join(examples)})"
    return reference, who, [(v, x) for v, x in known if x != reference]


def active_hca_count(views: list[HostView], opts: CheckOptions) -> Iterable[Finding]:
    def count(v: HostView) -> int:
        return len(v.topo.active_rdma_devices())

    if len(views) < 2:
        return
    reference, who, bad = _deviants(views, count, prefer=lambda n: n)  # a tie: fewer is the broken one
    for view, value in bad:
        yield view.finding(
            "hosts-active-hca-count-mismatch", E, "rdma",
            f"{view.host} has {value} RDMA device(s) with an active port; {who} have {reference}",
            "NCCL builds the same rings on every host: bring the missing ports up (see the "
            "rdma-port-* findings) or restrict every host to the same HCAs with NCCL_IB_HCA",
            active=value, expected=reference,
        )


def _link_layers(v: HostView) -> tuple[str, ...] | None:
    layers = sorted({p.link_layer for _, p in v.topo.rdma_ports() if p.is_active})
    return tuple(layers) if layers else None


def link_layer(views: list[HostView], opts: CheckOptions) -> Iterable[Finding]:
    reference, who, bad = _deviants(views, _link_layers)
    for view, value in bad:
        yield view.finding(
            "hosts-link-layer-mismatch", E, "rdma",
            f"{view.host}'s active RDMA ports are {'+'.join(value)}; {who} use "
            f"{'+'.join(reference or ())}: InfiniBand and RoCE ports cannot talk to each other",
            "run the job on hosts of one fabric, or select the common one on every host "
            "with NCCL_IB_HCA",
            link_layers=list(value), expected=list(reference or ()),
        )


def _rdma_mtu(layer: str) -> Callable[[HostView], int | None]:
    def value(v: HostView) -> int | None:
        mtus = [p.active_mtu for _, p in v.topo.rdma_ports()
                if p.is_active and p.link_layer == layer and p.active_mtu is not None]
        return min(mtus) if mtus else None
    return value


def _roce_netdev_mtu(v: HostView) -> int | None:
    mtus = []
    for _, p in v.topo.rdma_ports():
        nic = v.nics.get(p.netdev or "")
        if p.is_active and p.is_roce and nic is not None and nic.mtu is not None:
            mtus.append(nic.mtu)
    return min(mtus) if mtus else None


def _socket_mtu(opts: CheckOptions) -> Callable[[HostView], int | None]:
    def value(v: HostView) -> int | None:
        if not opts.rendezvous:
            return None
        lookup = v.route_to(opts.rendezvous)
        nic = v.nics.get(lookup.interface or "")
        return nic.mtu if nic is not None and not lookup.local else None
    return value


def mtu(views: list[HostView], opts: CheckOptions) -> Iterable[Finding]:
    checks = (
        (_roce_netdev_mtu, E, "roce-netdev", "RoCE netdev MTU",
         "jumbo frames on some hosts only: frames larger than a peer's MTU are dropped and "
         "RoCE connections hang"),
        (_rdma_mtu(LINK_LAYER_ETHERNET), W, "roce", "RoCE active MTU",
         "the path MTU falls back to the smallest one"),
        (_rdma_mtu(LINK_LAYER_IB), W, "infiniband", "InfiniBand active MTU",
         "the path MTU falls back to the smallest one"),
        (_socket_mtu(opts), W, "socket", "MTU of the interface to the rendezvous host",
         "large frames between these hosts are dropped or fragmented"),
    )
    for value, severity, subject, what, effect in checks:
        reference, who, bad = _deviants(views, value)
        for view, got in bad:
            yield view.finding(
                "hosts-mtu-mismatch", severity, subject,
                f"{what} is {got} on {view.host}; {who} use {reference}: {effect}",
                "use one MTU on every host and switch port of the fabric (`ip link set <netdev> mtu ...`)",
                mtu=got, expected=reference, what=what,
            )


VERSION_RULES = (
    ("torch_version", "torch", "hosts-torch-version-mismatch", E,
     "ranks on different torch builds disagree on collective protocols and pickled state",
     "install the same torch on every host (one container image, or one pinned wheel)"),
    ("nccl_version", "NCCL", "hosts-nccl-version-mismatch", E,
     "NCCL versions must match across ranks; a mismatch hangs or fails at init",
     "install the same torch/NCCL build on every host (NCCL comes with the torch wheel)"),
    ("driver_version", "NVIDIA driver", "hosts-driver-version-mismatch", W,
     "mixed drivers give different CUDA/NCCL features per host",
     "install one driver version on every node of the cluster"),
)


def versions(views: list[HostView], opts: CheckOptions) -> Iterable[Finding]:
    for attr, what, id_, severity, effect, hint in VERSION_RULES:
        def value(v: HostView, attr: str = attr) -> str | None:
            return getattr(v.topo.host, attr)

        reference, who, bad = _deviants(views, value)
        for view, got in bad:
            yield view.finding(
                id_, severity, what,
                f"{view.host} runs {what} {got}; {who} run {reference}: {effect}",
                hint, version=got, expected=reference,
            )


def firmware(views: list[HostView], opts: CheckOptions) -> Iterable[Finding]:
    per_model: dict[str, Counter[str]] = defaultdict(Counter)
    for v in views:
        for d in v.topo.rdma_devices:
            if d.hca_type and d.fw_ver:
                per_model[d.hca_type][d.fw_ver] += 1
    common = {model: counts.most_common(1)[0][0] for model, counts in per_model.items() if len(counts) > 1}
    if not common:
        return
    for v in views:
        odd: dict[tuple[str, str], list[str]] = defaultdict(list)
        for d in v.topo.rdma_devices:
            if d.hca_type in common and d.fw_ver and d.fw_ver != common[d.hca_type]:
                odd[(d.hca_type, d.fw_ver)].append(d.name)
        for (model, version), names in odd.items():
            yield v.finding(
                "hosts-firmware-mismatch", W, ",".join(names),
                f"{model} firmware {version} on {v.host} ({', '.join(names)}); most {model} devices "
                f"in the cluster run {common[model]}",
                "flash one firmware version on every HCA of a model (`mlxfwmanager`)",
                fw_ver=version, common_fw_ver=common[model],
            )


def duplicate_hostnames(views: list[HostView], opts: CheckOptions) -> Iterable[Finding]:
    counts = Counter(v.host for v in views)
    for name, n in counts.items():
        if n > 1:
            yield Finding(
                id="hosts-duplicate-hostname", severity=W, host=name, subject="hostname",
                message=f"{n} probed hosts are named {name}: results for them cannot be told apart",
                hint="give every node a unique hostname (or probe each node once)",
                data={"count": n},
            )


RULES = (active_hca_count, link_layer, mtu, versions, firmware, duplicate_hostnames)
