"""``aitrain fabric check``: refuse a fabric that will hang or crawl, and say why."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from aitrain.launcher.fabric_args import add_output_arguments, add_source_arguments, collect_hosts, write_stdout

EXIT_OK, EXIT_ERRORS, EXIT_FAILED = 0, 1, 2


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
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


def run(args: argparse.Namespace) -> int:
    from aitrain.errors import AitrainError

    if args.list_ids:
        from aitrain.fabric.checks import FINDING_IDS

        width = max(map(len, FINDING_IDS))
        for id_, what in FINDING_IDS.items():
            print(f"{id_.ljust(width)}  {what}")
        return EXIT_OK
    try:
        return _run(args)
    except AitrainError as e:
        e.exit_code = EXIT_FAILED
        raise
    except Exception as e:  # a bug must not read as "errors found" (exit 1)
        print(f"aitrain: error: the fabric check could not run: {type(e).__name__}: {e}", file=sys.stderr)
        if os.environ.get("AITRAIN_DEBUG"):
            traceback.print_exc()
        return EXIT_FAILED


def _run(args: argparse.Namespace) -> int:
    from aitrain.fabric import check, has_errors
    from aitrain.fabric.sources import resolve_rendezvous
    from aitrain.launcher.fabric_render import Style, render_findings, use_color

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
