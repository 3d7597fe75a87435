"""Stored ``aitrain fabric tune --search`` winners, keyed by the cluster's topology
fingerprint, so ``aitrain launch`` on the same kind of cluster starts from the
measured best instead of the derived default.

The fingerprint describes the *shape* of the cluster, not its identity: host count
and, per host, the NICs (name, kind, MTU, speed, state, subnets), the RDMA ports
(link layer, rate, state), the GPUs and the NCCL version. Hostnames, host addresses,
boot ids and probe times are left out, so a relaunch (or a same-shaped allocation)
matches, while a port going down or a different NCCL does not.

Files: ``<dir>/<fingerprint>.json`` under ``$AITRAIN_CACHE_DIR/profiles`` or
``~/.cache/aitrain/profiles``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aitrain.fabric.topology import Cluster, HostTopology

PROFILE_SCHEMA = 1


def default_profile_dir() -> Path:
    if os.environ.get("AITRAIN_CACHE_DIR"):
        return Path(os.environ["AITRAIN_CACHE_DIR"]) / "profiles"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aitrain" / "profiles"


def host_shape(host: HostTopology) -> dict[str, Any]:
    nics = []
    for n in sorted(host.nics, key=lambda n: n.name):
        if n.kind == "loopback":
            continue
        nets = sorted({str(i.network) for i in n.addresses() if not i.ip.is_link_local})
        nics.append([n.name, n.kind, n.mtu, n.speed_mbps, n.is_up, nets])
    ports = [[d.name, p.port, p.link_layer, p.rate_gbps, p.state]
             for d, p in sorted(host.rdma_ports(), key=lambda dp: (dp[0].name, dp[1].port))]
    gpus = sorted(g.name or "gpu" for g in host.gpus)
    return {"nics": nics, "rdma": ports, "gpus": gpus, "nccl": host.host.nccl_version}


def cluster_fingerprint(cluster: Cluster | Iterable[HostTopology]) -> str:
    hosts = Cluster.of(cluster).hosts
    shapes = sorted(json.dumps(host_shape(h), sort_keys=True) for h in hosts)
    blob = json.dumps({"schema": PROFILE_SCHEMA, "hosts": shapes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class Profile:
    """The measured-best settings for one cluster shape."""

    fingerprint: str
    env: dict[str, str] = field(default_factory=dict)
    """Applied on every host over the derived values (user-set env still wins)."""
    interface: str | None = None
    """The socket interface that measured fastest (used where a host has it)."""
    summary: str = ""
    """One line: what was measured and by how much the winner won."""
    measurements: list[dict[str, Any]] = field(default_factory=list)
    created: float = 0.0
    schema: int = PROFILE_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass
class ProfileStore:
    directory: Path = field(default_factory=default_profile_dir)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)

    def path(self, fingerprint: str) -> Path:
        return self.directory / f"{fingerprint}.json"

    def save(self, profile: Profile) -> Path:
        profile.created = profile.created or time.time()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(profile.fingerprint)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(profile.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    def load(self, fingerprint: str) -> Profile | None:
        try:
            data = json.loads(self.path(fingerprint).read_text())
            profile = Profile.from_dict(data)
        except (OSError, ValueError, TypeError):
            return None
        return profile if profile.schema == PROFILE_SCHEMA and profile.fingerprint == fingerprint else None

    def find(self, cluster: Cluster | Iterable[HostTopology]) -> Profile | None:
        """The stored profile whose fingerprint matches this cluster, if any."""
        return self.load(cluster_fingerprint(cluster))

    def remove(self, fingerprint: str) -> bool:
        try:
            self.path(fingerprint).unlink()
            return True
        except OSError:
            return False
