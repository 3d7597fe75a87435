"""Command-line arguments shared by ``aitrain fabric`` subcommands, and turning them
into host topologies."""

from __future__ import annotations

import argparse
from typing import Callable

from aitrain.fabric.topology import HostTopology


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
        from aitrain.errors import FabricError

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
    """Run a fabric subcommand; an AitrainError means it could not run at all: exit code 2."""
    from aitrain.errors import AitrainError

    try:
        return fn(args)
    except AitrainError as e:
        e.exit_code = 2
        raise
