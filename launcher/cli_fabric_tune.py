"""``aitrain fabric tune``: the NCCL/Gloo env each host's ranks get, and why.

    aitrain fabric tune                                   this host
    aitrain fabric tune --sysfs-root hosts/ --rendezvous 10.0.0.11 --nccl-version 2.18.3
    aitrain fabric tune --netns aitt-n1 --netns aitt-n2   hosts of the test rig
    aitrain fabric tune --netns aitt-n1 --netns aitt-n2 --search   measure, store the winner
    aitrain fabric tune --json                            {"hosts": [{"hostname", "env", "reasons", ...}]}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from aitrain.launcher.fabric_args import add_output_arguments, add_source_arguments, collect_hosts, write_stdout
from aitrain.launcher.fabric_nodes import add_node_arguments


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "tune",
        help="derive NCCL/Gloo env per host from the probed topology (--search: measure)",
        description="Derive the NCCL/Gloo/torch env of each host's ranks from the probed topology, "
                    "with the reason for every value. --search measures candidate settings with the "
                    "collective bench and stores the winner as a profile for `aitrain launch`.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_source_arguments(parser)
    add_output_arguments(parser)
    add_node_arguments(parser)
    t = parser.add_argument_group("tuning")
    t.add_argument("--nccl-version", metavar="V",
                   help="NCCL version when torch has no NCCL (e.g. 2.18.3); gates NCCL_IB_GID_INDEX")
    t.add_argument("--interface", metavar="IF", help="force the socket interface (fabric.interface)")
    t.add_argument("--ib-tc", type=int, metavar="N", help="NCCL_IB_TC (fabric.ib_tc)")
    t.add_argument("--ib-sl", type=int, metavar="N", help="NCCL_IB_SL (fabric.ib_sl)")
    t.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="which collectives library the ranks use (auto: nccl where GPUs are)")
    t.add_argument("--collective-timeout", type=float, default=600.0, metavar="S",
                   help="process-group timeout the transport timeouts are fitted into (default 600)")
    t.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="user env (like fabric.env.NAME=VALUE): always wins, reported as user-set")
    t.add_argument("--profile", default="auto", metavar="auto|none|FILE",
                   help="apply a stored --search winner matching the cluster (default auto)")
    s = parser.add_argument_group("search (runs ranks)")
    s.add_argument("--search", action="store_true",
                   help="measure candidate settings with the bench and store the fastest as a profile")
    s.add_argument("--search-size", default="16M", metavar="SIZE",
                   help="all_reduce size each candidate is measured at (default 16M)")
    s.add_argument("--search-iters", type=int, default=3, metavar="N")
    s.add_argument("--profile-dir", metavar="DIR", help="where profiles are stored "
                   "(default ~/.cache/aitrain/profiles)")
    return parser


def run(args: argparse.Namespace) -> int:
    from aitrain.launcher.fabric_args import run_exit_2_on_error

    return run_exit_2_on_error(_run, args)


def local_nccl_version() -> str | None:
    """NCCL's version from this Python's torch, when torch has NCCL (imports torch)."""
    try:
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_nccl_available():
            return None
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:
        return None


def _needs_nccl_version(hosts: list[Any]) -> bool:
    return any(p.is_roce and not h.host.nccl_version for h in hosts for _, p in h.rdma_ports())


def _run(args: argparse.Namespace) -> int:
    from aitrain.fabric.profiles import ProfileStore
    from aitrain.fabric.tune import TuneOptions, tune
    from aitrain.launcher.fabric_nodes import nodes_from_args, parse_env_pairs, probe_nodes

    nodes = nodes_from_args(args) if args.netns else None
    hosts = probe_nodes(nodes, args.rendezvous) if nodes else collect_hosts(args)
    nccl_version = args.nccl_version
    if nccl_version is None and _needs_nccl_version(hosts):
        nccl_version = local_nccl_version()
    user_env = parse_env_pairs(args.env)
    nproc = args.nproc_per_node or (1 if args.netns else 2)
    options = TuneOptions(interface=args.interface, nproc_per_node=nproc, backend=args.backend,
                          ib_tc=args.ib_tc, ib_sl=args.ib_sl, collective_timeout_s=args.collective_timeout)
    store = ProfileStore(Path(args.profile_dir)) if args.profile_dir else ProfileStore()
    search_out = None
    if args.search:
        search_out = _search(args, hosts, nodes, nccl_version, user_env, options, store)
    profile: Any = args.profile
    if profile == "auto":
        profile = store.find(hosts)
    tuned = tune(hosts, rendezvous=args.rendezvous, nccl_version=nccl_version, user_env=user_env,
                 shell_env=os.environ, options=options, profile=profile)
    if args.json:
        doc: dict[str, Any] = {"hosts": [t.to_dict() for t in tuned.values()]}
        if profile is not None and not isinstance(profile, str):
            doc["profile"] = profile.fingerprint
        if search_out is not None:
            doc["search"] = search_out
        write_stdout(json.dumps(doc, indent=2) + "\n")
    else:
        from aitrain.launcher.fabric_render import Style, use_color

        style = Style(use_color(sys.stdout, args.color))
        text = render_tuned(tuned, style)
        if search_out is not None:
            text = render_search(search_out) + "\n\n" + text
        write_stdout(text + "\n")
    return 0


def render_tuned(tuned: dict[str, Any], style: Any = None) -> str:
    style = style or (lambda text, color: text)
    blocks = []
    for t in tuned.values():
        head = f"{t.hostname}" + (f"  (socket interface {t.interface}, {t.address})" if t.interface else "")
        lines = [style(head, "bold")]
        width = max((len(f"{k}={v}") for k, v in t.env.items()), default=0)
        for k, v in t.env.items():
            tag = style("user-set", "yellow") + " " if k in t.user_set else ""
            lines.append(f"  {f'{k}={v}'.ljust(width)}  # {tag}{t.reasons.get(k, '')}")
        for k, why in t.notes.items():
            lines.append(style(f"  ({k} not set: {why})" if k.isupper() else f"  (note: {k}: {why})", "dim"))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_search(out: dict[str, Any]) -> str:
    lines = [f"search: all_reduce {out['size']} busbw per candidate (GB/s)"]
    for trial in out["trials"]:
        setting = ", ".join(f"{k}={v}" for k, v in trial["setting"].items() if v is not None) or "derived"
        value = f"{trial['busbw_gbps']:.3f}" if not trial.get("error") else f"failed ({trial['error']})"
        lines.append(f"  {setting:<48} {value}")
    lines.append(f"winner: {out['summary']}; stored as profile {out['fingerprint']} ({out['path']})")
    return "\n".join(lines)


def measure_busbw(nodes: list[Any], per_host_env: dict[str, dict[str, str]], hosts: list[Any], *,
                  size: str, iters: int, nproc_per_node: int, timeout: float, run_dir: Path) -> float:
    """all_reduce busbw (GB/s) at ``size`` over ``nodes`` with the given env per host."""
    from aitrain.fabric.bench import BenchResult
    from aitrain.fabric.tune import primary_address
    from aitrain.launcher.fabric_nodes import run_on_nodes

    for node, host in zip(nodes, hosts):
        node.env = dict(per_host_env[host.hostname])
        if node.prefix:
            nic = host.nic(node.env.get("GLOO_SOCKET_IFNAME"))
            node.address = (primary_address(nic) if nic else None) or node.address
    out = run_dir / "result.json"
    argv = [sys.executable, "-u", "-m", "aitrain.fabric.bench_rank", "--mode", "bench",
            "--collectives", "all_reduce", "--sizes", size, "--iters", str(iters), "--no-check",
            "--out", str(out), "--timeout", f"{timeout:g}"]
    run = run_on_nodes(nodes, argv, nproc_per_node=nproc_per_node, timeout=timeout, run_dir=run_dir)
    if not run.ok:
        raise RuntimeError(run.failure())
    result = BenchResult.from_dict(json.loads(out.read_text()))
    return result.rows[0].busbw_gbps


def _search(args: argparse.Namespace, hosts: list[Any], nodes: list[Any] | None, nccl_version: Any,
            user_env: dict[str, str], options: Any, store: Any) -> dict[str, Any]:
    from aitrain.fabric.profiles import Profile, cluster_fingerprint
    from aitrain.fabric.search import coordinate_search, dimensions, env_for
    from aitrain.fabric.topology import Cluster
    from aitrain.fabric.tune import tune
    from aitrain.launcher.fabric_nodes import nodes_from_args

    if args.sysfs_root or args.from_json:
        from aitrain.errors import FabricError

        raise FabricError("--search runs ranks on the hosts themselves, not on captured trees",
                          "run it on the nodes (this host, or --netns NS ...) without --sysfs-root/--from-json")
    nodes = nodes or nodes_from_args(args)
    cluster = Cluster(hosts=list(hosts))
    tuned = tune(cluster, rendezvous=args.rendezvous, nccl_version=nccl_version, user_env=user_env,
                 shell_env=os.environ, options=options, profile=None)
    dims = dimensions(cluster, tuned, backend=options.backend, rendezvous=args.rendezvous)
    node0 = next(iter(tuned.values()))
    start: dict[str, str | None] = {"interface": node0.interface} if any(d.name == "interface" for d in dims) else {}
    base_dir = Path(tempfile.mkdtemp(prefix="aitrain-search-"))
    counter = iter(range(1000))

    def measure(setting: dict[str, str | None]) -> float:
        env = env_for(cluster, tuned, setting, args.rendezvous)
        return measure_busbw(nodes, env, hosts, size=args.search_size, iters=args.search_iters,
                             nproc_per_node=options.nproc_per_node, timeout=args.timeout,
                             run_dir=base_dir / f"trial{next(counter)}")

    result = coordinate_search(dims, measure, start=start)
    fingerprint = cluster_fingerprint(cluster)
    gain = (result.best_busbw_gbps / result.baseline_busbw_gbps) if result.baseline_busbw_gbps else 0.0
    summary = (f"all_reduce {args.search_size} busbw {result.best_busbw_gbps:.3f} GB/s "
               f"({gain:.2f}x the derived setting)")
    profile = Profile(fingerprint=fingerprint, env=result.env, interface=result.interface, summary=summary,
                      measurements=[{"setting": t.setting, "busbw_gbps": t.busbw_gbps, "error": t.error}
                                    for t in result.trials])
    path = store.save(profile)
    keep = any(t.error for t in result.trials)  # the rank logs of the failed trials
    if not keep:
        import shutil

        shutil.rmtree(base_dir, ignore_errors=True)
    return {"size": args.search_size, "fingerprint": fingerprint, "path": str(path), "summary": summary,
            "trials": profile.measurements, "run_dir": str(base_dir) if keep else None}
