"""``aitrain fabric tune --search``: measure candidate settings, keep the fastest.

The candidates are the few settings that matter and that the topology alone cannot
settle:

- the socket interface, among node 0's interfaces that every peer reaches (the
  derived choice ranks them by kind, speed and MTU; a measurement can disagree,
  e.g. two veths that both claim 10 Gb/s);
- for NCCL over RDMA: ``NCCL_IB_QPS_PER_CONNECTION``; for NCCL on any fabric:
  ``NCCL_MIN_CTAS`` and ``NCCL_BUFFSIZE``; for NCCL over TCP sockets:
  ``NCCL_SOCKET_NTHREADS`` x ``NCCL_NSOCKS_PERTHREAD``.

The search is coordinate descent from the derived env: one dimension at a time,
each value measured with the bench (all_reduce busbw at one size), a value kept only
when it beats the best so far by more than the noise margin. It is pure: ``measure``
is a function, the CLI supplies one that runs real ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aitrain.fabric.topology import Cluster
from aitrain.fabric.tune import TunedEnv, uses_nccl

if TYPE_CHECKING:
    from aitrain.fabric.profiles import ProfileStore

NOISE_MARGIN = 0.05  # a candidate must beat the best by 5% to replace it


@dataclass
class Dimension:
    name: str
    """``interface`` or an env variable."""
    values: list[str | None]
    """None means "leave it to the derived env / NCCL's default"."""


@dataclass
class Trial:
    setting: dict[str, str | None]
    busbw_gbps: float
    error: str | None = None


@dataclass
class SearchResult:
    best: dict[str, str | None] = field(default_factory=dict)
    best_busbw_gbps: float = 0.0
    baseline_busbw_gbps: float = 0.0
    trials: list[Trial] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {k: v for k, v in self.best.items() if k != "interface" and v is not None}

    @property
    def interface(self) -> str | None:
        return self.best.get("interface")


def interface_candidates(cluster: Cluster, rendezvous: str | None = None) -> list[str]:
    """Node 0's interfaces that every peer reaches and routes back through."""
    from aitrain.fabric.tune import peer_interface, primary_address, select_rendezvous_host, usable_socket_nics

    hosts = cluster.hosts
    i0 = select_rendezvous_host(cluster, rendezvous)
    node0 = hosts[i0]
    peers = [h for i, h in enumerate(hosts) if i != i0]
    out = []
    for nic in usable_socket_nics(node0):
        target = primary_address(nic)
        if target and all(peer_interface(p, target, node0, nic.name) is not None for p in peers):
            out.append(nic.name)
    return out


def dimensions(cluster: Cluster, tuned: dict[str, TunedEnv], *, backend: str = "auto",
               rendezvous: str | None = None) -> list[Dimension]:
    """What is worth measuring on this cluster."""
    dims: list[Dimension] = []
    if len(cluster) > 1:
        ifaces = interface_candidates(cluster, rendezvous)
        if len(ifaces) > 1:
            dims.append(Dimension("interface", list(ifaces)))
    if any(uses_nccl(h, backend) for h in cluster.hosts):
        rdma = any("NCCL_IB_HCA" in t.env for t in tuned.values())
        if rdma:
            dims.append(Dimension("NCCL_IB_QPS_PER_CONNECTION", [None, "2", "4"]))
        else:
            dims.append(Dimension("NCCL_SOCKET_NTHREADS", [None, "2", "4"]))
            dims.append(Dimension("NCCL_NSOCKS_PERTHREAD", [None, "2", "4"]))
        dims.append(Dimension("NCCL_MIN_CTAS", [None, "4", "16"]))
        dims.append(Dimension("NCCL_BUFFSIZE", [None, str(8 << 20), str(16 << 20)]))
    return dims


def env_for(cluster: Cluster, tuned: dict[str, TunedEnv], setting: dict[str, str | None],
            rendezvous: str | None = None) -> dict[str, dict[str, str]]:
    """Per-host env for one candidate setting (tuned env + the setting)."""
    out = {h: dict(t.env) for h, t in tuned.items()}
    iface = setting.get("interface")
    if iface:
        for host, name in zip(cluster.hosts, node_interfaces(cluster, iface, rendezvous), strict=True):
            user_set = tuned[host.hostname].user_set if host.hostname in tuned else []
            if name and not {"NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"} & set(user_set):
                out[host.hostname]["NCCL_SOCKET_IFNAME"] = f"={name}"
                out[host.hostname]["GLOO_SOCKET_IFNAME"] = name
    for key, value in setting.items():
        if key == "interface":
            continue
        for h in out:
            if value is None:
                if key not in (tuned[h].user_set if h in tuned else []):
                    out[h].pop(key, None)
            else:
                out[h][key] = value
    return out


def node_interfaces(cluster: Cluster, node0_interface: str, rendezvous: str | None = None) -> list[str | None]:
    """Per host, the interface to use when node 0 uses ``node0_interface``."""
    from aitrain.fabric.tune import peer_interface, primary_address, select_rendezvous_host

    i0 = select_rendezvous_host(cluster, rendezvous)
    node0 = cluster.hosts[i0]
    nic = node0.nic(node0_interface)
    target = primary_address(nic) if nic else None
    out: list[str | None] = []
    for i, h in enumerate(cluster.hosts):
        if i == i0:
            out.append(node0_interface)
        else:
            p = peer_interface(h, target, node0, node0_interface) if target else None
            out.append(p.name if p else None)
    return out


def coordinate_search(
    dims: Sequence[Dimension],
    measure: Callable[[dict[str, str | None]], float],
    *,
    start: dict[str, str | None] | None = None,
    margin: float = NOISE_MARGIN,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """One dimension at a time; ``measure(setting) -> busbw`` (raise or return 0 on failure);
    ``on_trial`` sees each trial as it ends."""
    result = SearchResult(best=dict(start or {}))

    def trial(setting: dict[str, str | None]) -> float:
        try:
            value = float(measure(dict(setting)))
            result.trials.append(Trial(dict(setting), value))
        except Exception as e:  # a setting that breaks the job is simply not a winner
            value = 0.0
            result.trials.append(Trial(dict(setting), 0.0, f"{type(e).__name__}: {e}"))
        if on_trial is not None:
            on_trial(result.trials[-1])
        return value

    best = trial(result.best)
    result.baseline_busbw_gbps = best
    for dim in dims:
        current = result.best.get(dim.name)
        for value in dim.values:
            if value == current:
                continue
            setting = {**result.best, dim.name: value}
            got = trial(setting)
            if got > best * (1 + margin):
                best, result.best = got, setting
    result.best_busbw_gbps = best
    return result


@dataclass
class SearchRun:
    """What ``aitrain fabric tune --search`` did: the trials and the stored winner."""

    size: str
    fingerprint: str
    path: str
    summary: str
    trials: list[dict[str, object]]

    def to_dict(self) -> dict[str, object]:
        return {"size": self.size, "fingerprint": self.fingerprint, "path": self.path, "summary": self.summary,
                "trials": self.trials}


def search_and_store(
    cluster: Cluster,
    tuned: dict[str, TunedEnv],
    measure_env: Callable[[dict[str, dict[str, str]]], float],
    store: ProfileStore,
    *,
    size: str,
    backend: str = "auto",
    rendezvous: str | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchRun:
    """The search over ``cluster`` from the derived env ``tuned``, the winner stored as a
    profile in ``store`` (a :class:`~aitrain.fabric.profiles.ProfileStore`).

    ``measure_env(env per host) -> busbw`` runs the bench with that env (the launcher runs
    real ranks); a failed measurement raises, and the trial records the error."""
    from aitrain.fabric.profiles import Profile, cluster_fingerprint

    dims = dimensions(cluster, tuned, backend=backend, rendezvous=rendezvous)
    node0 = next(iter(tuned.values()))
    start: dict[str, str | None] = {"interface": node0.interface} if any(d.name == "interface" for d in dims) else {}

    def measure(setting: dict[str, str | None]) -> float:
        return measure_env(env_for(cluster, tuned, setting, rendezvous))

    result = coordinate_search(dims, measure, start=start, on_trial=on_trial)
    fingerprint = cluster_fingerprint(cluster)
    gain = (result.best_busbw_gbps / result.baseline_busbw_gbps) if result.baseline_busbw_gbps else 0.0
    summary = f"all_reduce {size} busbw {result.best_busbw_gbps:.3f} GB/s ({gain:.2f}x the derived setting)"
    measurements: list[dict[str, object]] = [{"setting": t.setting, "busbw_gbps": t.busbw_gbps, "error": t.error}
                                             for t in result.trials]
    profile = Profile(fingerprint=fingerprint, env=result.env, interface=result.interface, summary=summary,
                      measurements=measurements)
    path = store.save(profile)
    return SearchRun(size=size, fingerprint=fingerprint, path=str(path), summary=summary, trials=measurements)
