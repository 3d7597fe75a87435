"""The ``aitrain`` command: every argparse command and all rendering live in this package.

Each subcommand module exposes ``add_parser(subparsers)`` and ``run(args) -> int``; modules
are imported when the command line needs them, so ``aitrain --help`` stays fast (no torch,
ray or mlflow import).

``aitrain launch`` is special (:mod:`.launch`): everything after it goes to Hydra
(overrides, ``-m``, ``--cfg job``, ``--help``), which is the edge where the config becomes
the dataclasses the rest of aitrain sees.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

from aitrain import __version__
from aitrain.errors import AitrainError

# name -> (module, one-line help). Order is the order shown in --help.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "launch": ("aitrain.launcher.cli.launch", "compose a job with Hydra overrides and run it"),
    "fabric": ("aitrain.launcher.cli.fabric", "probe, check and tune the network fabric"),
    "host": ("aitrain.launcher.cli.host", "check and tune host kernel settings and limits"),
    "list": ("aitrain.launcher.cli.jobs", "jobs launched from this machine, every backend, with their state"),
    "status": ("aitrain.launcher.cli.jobs", "state of a job by its handle"),
    "logs": ("aitrain.launcher.cli.jobs", "output of a job by its handle"),
    "cancel": ("aitrain.launcher.cli.jobs", "cancel a job by its handle"),
    "runs": ("aitrain.launcher.cli.runs", "recent launches from MLflow; compare two runs; replay a spool"),
}

EPILOG = """examples:
  aitrain launch                                  run the default job locally
  aitrain launch +strategy=ddp nproc_per_node=2 train.steps=50
  aitrain launch nproc_per_node=2 -- train.py --lr 1e-3   your own script, as with torchrun
  aitrain launch strategy=fsdp dry_run=true       print the plan, start nothing
  aitrain launch --help                           config groups and options
  aitrain fabric check --json                     validate this host's fabric
  aitrain list                                    jobs launched from here and their state
  aitrain status HANDLE | logs HANDLE -f | cancel HANDLE
"""


def _available() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (module, help_) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, help_)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aitrain",
        description="Distributed PyTorch training launcher and fabric tuner.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aitrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    added: set[str] = set()
    for name, (module, help_) in _available().items():
        if name == "launch":
            sub.add_parser(name, help=help_, add_help=False)
            continue
        if module not in added:  # one module may add several commands (status, logs, cancel)
            importlib.import_module(module).add_parser(sub)
            added.add(module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A log handler that cannot write (Hydra's aitrain.log on a full disk) must not print a
    # traceback per record; the failure itself is reported where it matters.
    logging.raiseExceptions = False
    try:
        if argv and argv[0] == "launch":
            from aitrain.launcher.cli.launch import run_launch

            return run_launch(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 0
        module = importlib.import_module(_available()[args.command][0])
        return int(module.run(args) or 0)
    except AitrainError as e:
        from aitrain.launcher.redact import redact_text

        print(f"aitrain: error: {redact_text(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("aitrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
