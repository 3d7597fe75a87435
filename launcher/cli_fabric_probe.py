"""``aitrain fabric probe``: what this host's (or a captured tree's) fabric looks like."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from aitrain.launcher.fabric_args import add_output_arguments, add_source_arguments, collect_hosts, write_stdout

if TYPE_CHECKING:
    from aitrain.fabric.topology import HostTopology


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "probe",
        help="show NICs, RDMA ports and GIDs, GPUs, PCIe links and host limits",
        description="Probe the fabric of this host, or of captured sysfs/procfs trees.",
    )
    add_source_arguments(parser)
    add_output_arguments(parser)
    parser.add_argument("--cache", action="store_true",
                        help="reuse a cached probe of this host while its fingerprint is unchanged")
    parser.add_argument("--host-check", action="store_true",
                        help="with --json: add this host's `aitrain host check` findings to its entry "
                             "(host_findings); multi-node launches probe every node this way")
    return parser


def _host_json(topo: "HostTopology") -> dict:
    """The topology, plus the GPU<->NIC distances derived from it (ignored on load)."""
    from aitrain.fabric.topology import gpu_nic_distances

    data = topo.to_dict()
    data["gpu_nic_distances"] = [d.to_dict() for d in gpu_nic_distances(topo)]
    return data


def run(args: argparse.Namespace) -> int:
    from aitrain.errors import AitrainError
    from aitrain.launcher.fabric_render import Style, render_topology, use_color

    try:
        hosts = collect_hosts(args, use_cache=args.cache)
    except AitrainError as e:
        e.exit_code = 2
        raise
    if args.json:
        docs = [_host_json(h) for h in hosts]
        if args.host_check:
            from aitrain.fabric.host import HostPaths, check_host

            if len(docs) != 1 or getattr(args, "sysfs_root", None) or getattr(args, "from_json", None):
                err = AitrainError("--host-check checks the live host only",
                                   "run it on the host itself, without --sysfs-root/--from-json")
                err.exit_code = 2
                raise err
            docs[0]["host_findings"] = [f.to_dict() for f in check_host(HostPaths(), host=hosts[0].hostname)]
        write_stdout(json.dumps({"hosts": docs}, indent=2) + "\n")
        return 0
    style = Style(use_color(sys.stdout, args.color))
    write_stdout("\n\n".join(render_topology(h, style) for h in hosts) + "\n")
    return 0
