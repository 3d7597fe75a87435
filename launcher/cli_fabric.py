"""``aitrain fabric``: probe, check (and later tune, bench) the network fabric.

Each sub-subcommand lives in its own module exposing ``add_parser(subparsers)`` and
``run(args) -> int``, listed in :data:`FABRIC_SUBCOMMANDS`; a module that is not
there (yet) is simply not offered. Modules are imported lazily: no torch here.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

# name -> module. Order is the order shown in --help. Add "tune"/"bench" here.
FABRIC_SUBCOMMANDS: dict[str, str] = {
    "probe": "aitrain.launcher.cli_fabric_probe",
    "check": "aitrain.launcher.cli_fabric_check",
    "tune": "aitrain.launcher.cli_fabric_tune",
    "bench": "aitrain.launcher.cli_fabric_bench",
}

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


def available() -> dict[str, str]:
    return {name: module for name, module in FABRIC_SUBCOMMANDS.items()
            if importlib.util.find_spec(module) is not None}


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fabric",
        help="probe, check and tune the network fabric",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="fabric_command", metavar="SUBCOMMAND")
    for module in available().values():
        importlib.import_module(module).add_parser(sub)
    parser.set_defaults(fabric_parser=parser)
    return parser


def run(args: argparse.Namespace) -> int:
    name = getattr(args, "fabric_command", None)
    if not name:
        args.fabric_parser.print_help()
        return 2
    return int(importlib.import_module(available()[name]).run(args) or 0)
