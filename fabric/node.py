"""What one node reports about itself before a launch: its topology and its host findings.

Launchers run this on every node of a job, as ``python -m aitrain.fabric.probe --host-check``
(one command per node: ``srun``, ``nsenter``, a Ray actor calls :func:`node_document`
in-process), and read one JSON document per node back.
"""

from __future__ import annotations

from typing import Any

from aitrain.fabric.topology import gpu_nic_distances


def node_document(*, hostname: str | None = None, rendezvous: str | None = None, host_check: bool = True,
                  cache: bool = False, write_cache: bool = True) -> dict[str, Any]:
    """This host's :class:`~aitrain.fabric.topology.HostTopology` as a dict, with
    ``host_findings`` (``aitrain host check``) when ``host_check``.

    ``cache``: reuse a cached probe while the host's fingerprint is unchanged;
    ``write_cache=False`` reads the cache without storing a new probe (a dry run)."""
    from aitrain.fabric.cache import FabricCache
    from aitrain.fabric.probe import probe

    kwargs: dict[str, Any] = {"rendezvous": rendezvous}
    if hostname:
        kwargs["hostname"] = hostname
    if cache:
        topo, _ = FabricCache(read_only=not write_cache).probe(**kwargs)
        if hostname:
            topo.hostname = hostname
    else:
        topo = probe(**kwargs)
    doc = topo.to_dict()
    doc["gpu_nic_distances"] = [d.to_dict() for d in gpu_nic_distances(topo)]
    if host_check:
        from aitrain.fabric.host import HostPaths, check_host

        try:
            doc["host_findings"] = [f.to_dict() for f in check_host(HostPaths(), host=topo.hostname)]
        except Exception:  # noqa: BLE001 - the host check is advice; the probe is what the job needs
            doc["host_findings"] = []
    return doc
