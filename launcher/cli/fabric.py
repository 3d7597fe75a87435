"""``aitrain fabric``: probe, check, tune and benchmark the network fabric.

    aitrain fabric probe                              this host, as a table
    aitrain fabric check --sysfs-root hosts/          every host tree under hosts/
    aitrain fabric tune --netns aitt-n1 --netns aitt-n2 --search
    aitrain fabric bench --collectives all --sizes 8K:256M

Each subcommand has ``add_<name>_parser(sub)`` and ``run_<name>(args) -> int``; the heavy
imports (torch, the probe readers) happen inside them, so ``aitrain --help`` stays fast.
Exit codes: 0 fine, 1 the check found errors or a bench result was wrong, 2 the command
could not run (bad input, an unreadable tree).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aitrain.errors import AitrainError, FabricError

if TYPE_CHECKING:
    from aitrain.fabric.topology import HostTopology
    from aitrain.launcher.nodes import Node

# 0 fine; 1 the check found errors (or a bench result was wrong); 2 the command could not run
EXIT_OK, EXIT_ERRORS, EXIT_FAILED = 0, 1, 2

DESCRIPTION = """Discover and validate the network fabric of this host or of captured hosts.

examples:
  aitrain fabric probe                              this host, as a table
  aitrain fabric probe --json                       this host, as JSON ({"hosts": [...]})
  aitrain fabric check                              validate this host
  aitrain fabric check --sysfs-root hosts/          every host tree under hosts/
  aitrain fabric check --sysfs-root a/sys --sysfs-root b/sys --rendezvous 10.0.0.1
  aitrain fabric check --from-json node*.json --expected-rate-gbps 400

exit codes of check: 0 no errors, 1 errors found, 2 the check could not run
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fabric",
        help="probe, check and tune the network fabric",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="fabric_command", metavar="SUBCOMMAND")
    for add in (add_probe_parser, add_check_parser, add_tune_parser, add_bench_parser):
        add(sub)
    parser.set_defaults(fabric_parser=parser)
    return parser


def run(args: argparse.Namespace) -> int:
    name = getattr(args, "fabric_command", None)
    if not name:
        args.fabric_parser.print_help()
        return 2
    return {"probe": run_probe, "check": run_check, "tune": run_tune, "bench": run_bench}[name](args)


# -- arguments shared by the subcommands -------------------------------------------------------
def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to probe (default: this host)")
    g.add_argument(
        "--sysfs-root", action="append", default=[], metavar="DIR",
        help="a sysfs tree (containing class/), a host tree (sys/ + proc/), a directory of "
             "host trees, or a path-map JSON; repeat for several hosts",
    )
    g.add_argument(
        "--proc-root", action="append", default=[], metavar="DIR",
        help="procfs root for the matching --sysfs-root (default: /proc for /sys, the tree's "
             "own proc/ for a captured tree)",
    )
    g.add_argument(
        "--from-json", action="append", default=[], metavar="FILE",
        help="`aitrain fabric probe --json` output of other hosts; repeatable",
    )
    g.add_argument("--rendezvous", metavar="ADDR",
                   help="the rendezvous (MASTER_ADDR) every host must reach")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the table (auto: only on a terminal, not with NO_COLOR)")


def collect_hosts(args: argparse.Namespace, *, use_cache: bool = False) -> list[HostTopology]:
    """The hosts the arguments name; this host when they name none."""
    from aitrain.fabric.sources import load_hosts

    hosts: list[HostTopology] = []
    if args.sysfs_root:
        hosts.extend(load_hosts(args.sysfs_root, args.proc_root, rendezvous=args.rendezvous))
    elif args.proc_root:
        raise FabricError("--proc-root needs a matching --sysfs-root",
                          "pass --sysfs-root DIR --proc-root DIR together")
    if args.from_json:
        hosts.extend(load_hosts(args.from_json))
    if not hosts:
        if use_cache:
            from aitrain.fabric.cache import FabricCache

            hosts.append(FabricCache().probe(rendezvous=args.rendezvous)[0])
        else:
            from aitrain.fabric.probe import probe

            hosts.append(probe(rendezvous=args.rendezvous))
    return hosts


def write_stdout(text: str) -> None:
    """Prints, and stays quiet when the reader went away (``| head``)."""
    import os
    import sys

    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def run_exit_2_on_error(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a fabric subcommand. An error means it could not run at all (bad input, an
    unreadable tree): exit code 2, one ``aitrain: error:`` line and a HINT, never a
    traceback, whatever raised it."""
    try:
        return fn(args)
    except AitrainError as e:
        e.exit_code = EXIT_FAILED
        raise
    except Exception as e:
        raise could_not_run(f"fabric {getattr(args, 'fabric_command', None) or ''}".strip(), e) from e


def could_not_run(command: str, e: Exception) -> FabricError:
    """The error for an exception no reader turned into a FabricError (with the traceback
    on stderr under ``AITRAIN_DEBUG=1``)."""
    if os.environ.get("AITRAIN_DEBUG"):
        traceback.print_exc()
    if isinstance(e, OSError) and e.filename is not None:
        err = FabricError(f"`aitrain {command}` failed on {e.filename}: {e.strerror or e}",
                          "check that the path exists and this user may use it (or run as one who "
                          "may); rerun with AITRAIN_DEBUG=1 for the traceback")
    else:
        err = FabricError(f"`aitrain {command}` could not run: {type(e).__name__}: {e}",
                          "this is a bug in aitrain: rerun with AITRAIN_DEBUG=1 for the traceback "
                          "and report it with the command line")
    err.exit_code = EXIT_FAILED
    return err


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("nodes to run on (default: this host)")
    g.add_argument("--netns", action="append", default=[], metavar="NS",
                   help="a host of the test rig: a network namespace under /var/run/netns entered "
                        "with nsenter --net (repeat, node 0 first)")
    g.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="ranks per node (default: 2 on this host, 1 per --netns node)")
    g.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds one run of the rank program may take (default 120)")


def parse_env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FabricError(f"--env {pair!r} is not NAME=value", "e.g. --env NCCL_IB_TC=106")
        out[key] = value
    return out


def nodes_from_args(args: argparse.Namespace) -> list[Node]:
    """The nodes ``--netns`` names, or this host."""
    import socket

    from aitrain.launcher.nodes import Node, netns_node

    if args.netns:
        return [netns_node(ns) for ns in args.netns]
    return [Node(name=socket.gethostname(), address="127.0.0.1")]


def probe_nodes(nodes: Sequence[Node], rendezvous: str | None = None) -> list[HostTopology]:
    """Probe every node (in its own namespace / host); this host directly."""
    if len(nodes) == 1 and not nodes[0].prefix:
        from aitrain.fabric.probe import probe

        return [probe(rendezvous=rendezvous)]
    from aitrain.launcher.nodes import probe_node

    return [probe_node(n, rendezvous) for n in nodes]



# -- aitrain fabric probe ------------------------------------------------------------------------


def add_probe_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
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


def _host_json(topo: HostTopology) -> dict[str, Any]:
    """The topology, plus the GPU<->NIC distances derived from it (ignored on load)."""
    from aitrain.fabric.topology import gpu_nic_distances

    data = topo.to_dict()
    data["gpu_nic_distances"] = [d.to_dict() for d in gpu_nic_distances(topo)]
    return data


def run_probe(args: argparse.Namespace) -> int:
    return run_exit_2_on_error(_run_probe, args)


def _run_probe(args: argparse.Namespace) -> int:
    from aitrain.launcher.cli.render import Style, render_topology, use_color

    hosts = collect_hosts(args, use_cache=args.cache)
    if args.json:
        docs = [_host_json(h) for h in hosts]
        if args.host_check:
            from aitrain.fabric.host import HostPaths, check_host

            if len(docs) != 1 or getattr(args, "sysfs_root", None) or getattr(args, "from_json", None):
                raise FabricError("--host-check checks the live host only",
                                  "run it on the host itself, without --sysfs-root/--from-json")
            docs[0]["host_findings"] = [f.to_dict() for f in check_host(HostPaths(), host=hosts[0].hostname)]
        write_stdout(json.dumps({"hosts": docs}, indent=2) + "\n")
        return 0
    style = Style(use_color(sys.stdout, args.color))
    write_stdout("\n\n".join(render_topology(h, style) for h in hosts) + "\n")
    return 0


# -- aitrain fabric check ------------------------------------------------------------------------

def add_check_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "check",
        help="validate one or many hosts' fabric (exit 1 on errors)",
        description="Check the fabric of this host or of captured hosts. Exit code: 0 no "
                    "errors, 1 errors found, 2 the check could not run.",
    )
    add_source_arguments(parser)
    add_output_arguments(parser)
    parser.add_argument("--expected-rate-gbps", type=float, metavar="GBPS",
                        help="the least rate every port of the main fabric must run at")
    parser.add_argument("--no-probe-warnings", action="store_true",
                        help="leave unreadable/garbage probe files out of the findings")
    parser.add_argument("--cache", action="store_true",
                        help="reuse a cached probe of this host while its fingerprint is unchanged")
    parser.add_argument("--list-ids", action="store_true", help="list every finding id and exit")
    return parser


def run_check(args: argparse.Namespace) -> int:
    if args.list_ids:
        from aitrain.fabric.checks import FINDING_IDS

        width = max(map(len, FINDING_IDS))
        for id_, what in FINDING_IDS.items():
            print(f"{id_.ljust(width)}  {what}")
        return EXIT_OK
    # a bug must not read as "errors found" (exit 1): it is exit 2 like any failure to run
    return run_exit_2_on_error(_run_check, args)


def _run_check(args: argparse.Namespace) -> int:
    from aitrain.fabric import check, has_errors
    from aitrain.fabric.sources import resolve_rendezvous
    from aitrain.launcher.cli.render import Style, render_findings, use_color

    hosts = collect_hosts(args, use_cache=args.cache)
    rendezvous = resolve_rendezvous(args.rendezvous, hosts) if args.rendezvous else None
    findings = check(
        hosts,
        expected_rate_gbps=args.expected_rate_gbps,
        rendezvous=rendezvous,
        include_probe_warnings=not args.no_probe_warnings,
    )
    if args.json:
        write_stdout(json.dumps({"findings": [f.to_dict() for f in findings]}, indent=2) + "\n")
    else:
        write_stdout(render_findings(findings, len(hosts), Style(use_color(sys.stdout, args.color))) + "\n")
    return EXIT_ERRORS if has_errors(findings) else EXIT_OK


# -- aitrain fabric tune -------------------------------------------------------------------------

TUNE_EXAMPLES = """examples:
    aitrain fabric tune                                   this host
    aitrain fabric tune --sysfs-root hosts/ --rendezvous 10.0.0.11 --nccl-version 2.18.3
    aitrain fabric tune --netns aitt-n1 --netns aitt-n2   hosts of the test rig
    aitrain fabric tune --netns aitt-n1 --netns aitt-n2 --search   measure, store the winner
    aitrain fabric tune --json                            {"hosts": [{"hostname", "env", "reasons", ...}]}
"""


def add_tune_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "tune",
        help="derive NCCL/Gloo env per host from the probed topology (--search: measure)",
        description="Derive the NCCL/Gloo/torch env of each host's ranks from the probed topology, "
                    "with the reason for every value. --search measures candidate settings with the "
                    "collective bench and stores the winner as a profile for `aitrain launch`.",
        epilog=TUNE_EXAMPLES,
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


def run_tune(args: argparse.Namespace) -> int:
    return run_exit_2_on_error(_run_tune, args)


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


def _run_tune(args: argparse.Namespace) -> int:
    from aitrain.fabric.profiles import ProfileStore
    from aitrain.fabric.tune import TuneOptions, tune

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
        from aitrain.launcher.cli.render import Style, use_color

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
        facts = [f"socket interface {t.interface}, {t.address}"] if t.interface else []
        facts.append(f"NCCL {t.nccl_version}" if t.nccl_version else "NCCL: none (gloo only)")
        head = f"{t.hostname}  ({'; '.join(facts)})"
        lines = [style(head, "bold")]
        width = max((len(f"{k}={v}") for k, v in t.env.items()), default=0)
        for k, v in t.env.items():
            tag = style("user-set", "yellow") + " " if k in t.user_set else ""
            lines.append(f"  {f'{k}={v}'.ljust(width)}  # {tag}{t.reasons.get(k, '')}")
        for k, why in t.notes.items():
            lines.append(style(f"  ({k} not set: {why})" if k.isupper() else f"  (note: {k}: {why})", "dim"))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_trial(trial: dict[str, Any]) -> str:
    setting = ", ".join(f"{k}={v}" for k, v in trial["setting"].items() if v is not None) or "derived"
    value = f"{trial['busbw_gbps']:.3f}" if not trial.get("error") else f"failed ({trial['error']})"
    return f"  {setting:<48} {value}"


def render_search(out: dict[str, Any]) -> str:
    lines = [f"search: all_reduce {out['size']} busbw per candidate (GB/s)"]
    lines += [render_trial(trial) for trial in out["trials"]]
    lines.append(f"winner: {out['summary']}; stored as profile {out['fingerprint']} ({out['path']})")
    return "\n".join(lines)


def measure_busbw(nodes: list[Any], per_host_env: dict[str, dict[str, str]], hosts: list[Any], *,
                  size: str, iters: int, nproc_per_node: int, timeout: float, run_dir: Path) -> float:
    """all_reduce busbw (GB/s) at ``size`` over ``nodes`` with the given env per host."""
    from aitrain.fabric.bench import BenchResult
    from aitrain.fabric.tune import primary_address
    from aitrain.launcher.nodes import run_on_nodes

    for node, host in zip(nodes, hosts, strict=True):
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
    """``--search``: the search itself is :func:`aitrain.fabric.search.search_and_store`; this
    side runs the bench on the nodes for each candidate env."""
    from aitrain.fabric.search import search_and_store
    from aitrain.fabric.topology import Cluster
    from aitrain.fabric.tune import tune

    if args.sysfs_root or args.from_json:
        raise FabricError("--search runs ranks on the hosts themselves, not on captured trees",
                          "run it on the nodes (this host, or --netns NS ...) without --sysfs-root/--from-json")
    run_nodes = nodes or nodes_from_args(args)
    cluster = Cluster(hosts=list(hosts))
    tuned = tune(cluster, rendezvous=args.rendezvous, nccl_version=nccl_version, user_env=user_env,
                 shell_env=os.environ, options=options, profile=None)
    base_dir = Path(tempfile.mkdtemp(prefix="aitrain-search-"))
    counter = iter(range(1000))

    def measure(env: dict[str, dict[str, str]]) -> float:
        return measure_busbw(run_nodes, env, hosts, size=args.search_size, iters=args.search_iters,
                             nproc_per_node=options.nproc_per_node, timeout=args.timeout,
                             run_dir=base_dir / f"trial{next(counter)}")

    done = iter(range(1, 1000))

    def on_trial(trial: Any) -> None:  # long work: each trial on stderr as it ends (stdout is the result)
        print(f"search trial {next(done)} ({args.search_size} all_reduce busbw, GB/s):"
              f"{render_trial({'setting': trial.setting, 'busbw_gbps': trial.busbw_gbps, 'error': trial.error})}",
              file=sys.stderr, flush=True)

    print(f"search: one all_reduce bench per candidate setting on {len(run_nodes)} node(s); each trial is "
          "printed as it ends", file=sys.stderr, flush=True)
    found = search_and_store(cluster, tuned, measure, store, size=args.search_size, backend=options.backend,
                             rendezvous=args.rendezvous, on_trial=on_trial)
    keep = any(t.get("error") for t in found.trials)  # the rank logs of the failed trials
    if not keep:
        shutil.rmtree(base_dir, ignore_errors=True)
    return {**found.to_dict(), "run_dir": str(base_dir) if keep else None}


# -- aitrain fabric bench ------------------------------------------------------------------------

BENCH_EXAMPLES = """examples:
    aitrain fabric bench                                   2 ranks on this host
    aitrain fabric bench --collectives all --sizes 8K:256M --factor 4 --plot busbw.png
    aitrain fabric bench --netns aitt-n1 --netns aitt-n2   one rank per rig host, tuned env
    aitrain fabric bench --netns aitt-n1 --netns aitt-n2 --no-tune   the environment as it is
    aitrain fabric bench --json

Ranks run through the node agent like `aitrain launch` (gloo on CPU, nccl on GPU),
with the env `aitrain fabric tune` derives for each host (unless --no-tune).
"""


def add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "bench",
        help="all_reduce/all_gather/... bandwidth over the ranks (time, algbw, busbw, checked)",
        description="Benchmark collectives over a size sweep across ranks: time, algbw and busbw "
                    "(nccl-tests' formulas), every result checked for correctness.",
        epilog=BENCH_EXAMPLES,
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


def run_bench(args: argparse.Namespace) -> int:
    return run_exit_2_on_error(_run_bench, args)


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
    from aitrain.launcher.nodes import apply_tuned

    nodes = nodes_from_args(args)
    nproc = args.nproc_per_node or (1 if args.netns else 2)
    user_env = parse_env_pairs(args.env)
    hosts = probe_nodes(nodes, args.rendezvous)
    tuned: dict[str, Any] = {}
    if args.no_tune:
        for node, host in zip(nodes, hosts, strict=True):
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


def _run_bench(args: argparse.Namespace) -> int:
    from aitrain.fabric.bench import COLLECTIVES, BenchResult, plot_busbw, render_header, size_sweep
    from aitrain.launcher.nodes import run_on_nodes

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
    rows_file = run_dir / "rows.jsonl"
    argv = [sys.executable, "-u", "-m", "aitrain.fabric.bench_rank", "--mode", "bench",
            "--collectives", ",".join(collectives), "--sizes", args.sizes, "--factor", str(args.factor),
            "--iters", str(args.iters), "--warmup", str(args.warmup), "--backend", args.backend,
            "--out", str(out), "--rows", str(rows_file), "--timeout", f"{args.timeout:g}"] \
        + (["--no-check"] if args.no_check else [])
    total = len(COLLECTIVES if "all" in collectives else collectives) * len(size_sweep(args.sizes, args.factor))
    with RowFollower(rows_file, total, table=not args.json):
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
    else:  # the rows are on stdout already, as they were measured
        text = "\n" + "\n".join(render_header(result))
        if args.plot:
            text += f"\n\nplot: {args.plot}"
        write_stdout(text + "\n")
    return 0 if result.correct else 1


class RowFollower:
    """Shows ``fabric bench`` rows as rank 0 measures them (it appends them to ``rows.jsonl``):
    the table's lines on stdout (unless ``--json``), and on a terminal a progress line on stderr
    saying how many of ``total`` rows are done."""

    def __init__(self, path: Path, total: int, *, table: bool, poll_s: float = 0.2) -> None:
        self.path, self.total, self.table, self.poll_s = path, total, table, poll_s
        self.offset = 0
        self.done_rows = 0
        self.previous: str | None = None
        self.tty = sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aitrain-bench-rows", daemon=True)

    def __enter__(self) -> RowFollower:
        if self.tty:
            self._progress("starting the ranks")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._follow()  # the last rows
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._follow()

    def _progress(self, what: str) -> None:
        sys.stderr.write(f"\r\033[Kfabric bench: {self.done_rows}/{self.total} rows, {what}")
        sys.stderr.flush()

    def _follow(self) -> None:
        from aitrain.fabric.bench import BenchRow, fmt_size, render_row

        try:
            with open(self.path) as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind("\n") + 1
        self.offset += len(chunk[:end].encode())
        for line in chunk[:end].splitlines():
            try:
                row = BenchRow(**json.loads(line))
            except (ValueError, TypeError):
                continue
            self.done_rows += 1
            if self.table:
                if self.tty:
                    sys.stderr.write("\r\033[K")
                    sys.stderr.flush()
                write_stdout("\n".join(render_row(row, self.previous)) + "\n")
            self.previous = row.collective
            if self.tty:
                self._progress(f"last {row.collective} {fmt_size(row.size_bytes)}")
