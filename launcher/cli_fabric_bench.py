"""``aitrain fabric bench``: collective bandwidth over the job's ranks, nccl-tests style.

    aitrain fabric bench                                   2 ranks on this host
    aitrain fabric bench --collectives all --sizes 8K:256M --factor 4 --plot busbw.png
    aitrain fabric bench --netns aitt-n1 --netns aitt-n2   one rank per rig host, tuned env
    aitrain fabric bench --netns aitt-n1 --netns aitt-n2 --no-tune   the environment as it is
    aitrain fabric bench --json

Ranks run through the node agent like `aitrain launch` (gloo on CPU, nccl on GPU),
with the env `aitrain fabric tune` derives for each host (unless --no-tune).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from aitrain.launcher.fabric_args import write_stdout
from aitrain.launcher.fabric_nodes import add_node_arguments


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "bench",
        help="all_reduce/all_gather/... bandwidth over the ranks (time, algbw, busbw, checked)",
        description="Benchmark collectives over a size sweep across ranks: time, algbw and busbw "
                    "(nccl-tests' formulas), every result checked for correctness.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_node_arguments(parser)
    parser.add_argument("--collectives", default="all_reduce", metavar="LIST",
                        help="comma-separated: all_reduce, all_gather, reduce_scatter, broadcast, "
                             "all_to_all, sendrecv; or all (default all_reduce)")
    parser.add_argument("--sizes", default="8K:256M", metavar="MIN:MAX",
                        help="size sweep MIN:MAX (or A,B,C); K/M/G are binary units (default 8K:256M)")
    parser.add_argument("--factor", type=int, default=4, help="step between sizes (default 4)")
    parser.add_argument("--iters", type=int, default=0, help="timed iterations per size (0: fewer for big sizes)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per size (default 1)")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    parser.add_argument("--no-tune", action="store_true",
                        help="run with the environment as it is (no derived NCCL/Gloo env)")
    parser.add_argument("--rendezvous", metavar="ADDR", help="the rendezvous address tuning routes to")
    parser.add_argument("--nccl-version", metavar="V", help="NCCL version when torch has none")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra env for every rank (wins over tuning)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG of busbw vs size")
    parser.add_argument("--run-dir", metavar="DIR",
                        help="where rank logs go, kept (default: a temp dir, removed unless a result is wrong)")
    return parser


def run(args: argparse.Namespace) -> int:
    from aitrain.launcher.fabric_args import run_exit_2_on_error

    return run_exit_2_on_error(_run, args)


def default_route_address(host: Any) -> str | None:
    """What a naive setup uses as MASTER_ADDR: the address of the default route's NIC."""
    from aitrain.fabric.tune import primary_address

    for route in host.routes:
        if route.destination in ("0.0.0.0/0", "::/0"):
            nic = host.nic(route.interface)
            if nic is not None and primary_address(nic):
                return primary_address(nic)
    return None


def prepare_nodes(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """(nodes with env and address, tuned env per host or {})."""
    from aitrain.fabric.tune import TuneOptions, tune
    from aitrain.launcher.fabric_nodes import apply_tuned, nodes_from_args, parse_env_pairs, probe_nodes

    nodes = nodes_from_args(args)
    nproc = args.nproc_per_node or (1 if args.netns else 2)
    user_env = parse_env_pairs(args.env)
    hosts = probe_nodes(nodes, args.rendezvous)
    tuned: dict[str, Any] = {}
    if args.no_tune:
        for node, host in zip(nodes, hosts):
            node.env = dict(user_env)
            if node.prefix:
                node.address = default_route_address(host) or node.address
    else:
        options = TuneOptions(nproc_per_node=nproc, backend=args.backend,
                              multi_host=len(nodes) > 1 or None)
        tuned = tune(hosts, rendezvous=args.rendezvous, nccl_version=args.nccl_version, user_env=user_env,
                     shell_env=os.environ, options=options, profile="auto")
        apply_tuned(nodes, tuned, hosts)
    return nodes, tuned


def _run(args: argparse.Namespace) -> int:
    from aitrain.errors import FabricError
    from aitrain.fabric.bench import COLLECTIVES, BenchResult, plot_busbw, render_table, size_sweep
    from aitrain.launcher.fabric_nodes import run_on_nodes

    collectives = [c.strip() for c in args.collectives.split(",") if c.strip()]
    unknown = [c for c in collectives if c not in (*COLLECTIVES, "all")]
    if unknown:
        raise FabricError(f"unknown collective(s) {', '.join(unknown)}", f"use {', '.join(COLLECTIVES)} or all")
    try:
        size_sweep(args.sizes, args.factor)
    except ValueError as e:
        raise FabricError(str(e), "e.g. --sizes 8K:256M --factor 4, or --sizes 1M,64M") from e
    nodes, tuned = prepare_nodes(args)
    nproc = args.nproc_per_node or (1 if args.netns else 2)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="aitrain-bench-"))
    out = run_dir / "result.json"
    argv = [sys.executable, "-u", "-m", "aitrain.fabric.bench_rank", "--mode", "bench",
            "--collectives", ",".join(collectives), "--sizes", args.sizes, "--factor", str(args.factor),
            "--iters", str(args.iters), "--warmup", str(args.warmup), "--backend", args.backend,
            "--out", str(out), "--timeout", f"{args.timeout:g}"] + (["--no-check"] if args.no_check else [])
    result_run = run_on_nodes(nodes, argv, nproc_per_node=nproc, timeout=args.timeout, run_dir=run_dir)
    if not result_run.ok or not out.exists():
        raise FabricError(f"the benchmark failed: {result_run.failure()}",
                          f"rank logs are under {run_dir}; `aitrain fabric tune` shows the env the ranks got")
    result = BenchResult.from_dict(json.loads(out.read_text()))
    keep = bool(args.run_dir) or not result.correct  # the rank logs explain a wrong result
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    if args.plot:
        plot_busbw([result], args.plot)
    if args.json:
        doc = result.to_dict()
        doc["tuned"] = {h: t.to_dict() for h, t in tuned.items()}
        doc["run_dir"] = str(run_dir) if keep else None
        write_stdout(json.dumps(doc, indent=2) + "\n")
    else:
        text = render_table(result)
        if args.plot:
            text += f"\n\nplot: {args.plot}"
        write_stdout(text + "\n")
    return 0 if result.correct else 1
