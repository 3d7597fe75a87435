"""``aitrain host check`` and ``aitrain host tune``: kernel settings and limits of this host.

Rendering only: the checks and the tuning live in ``aitrain.fabric.host`` and
return data. Imported lazily by the dispatcher; no torch here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aitrain.errors import AitrainError, FabricError

if TYPE_CHECKING:
    from aitrain.fabric.findings import Finding
    from aitrain.fabric.host import HostPaths, PlannedChange, RevertResult, TunePlan, TuneResult
    from aitrain.fabric.host.tune import StateEntry

EXIT_OK, EXIT_ERRORS, EXIT_CANNOT_RUN = 0, 1, 2

CHECK_EPILOG = """exit status: 0 no errors, 1 at least one error, 2 the check could not run.

examples:
  aitrain host check                          this host, as a table
  aitrain host check --json                   {"findings": [...]} with current/recommended/fix in data
  aitrain host check --proc-root t/proc --sysfs-root t/sys   a captured tree
"""

TUNE_EPILOG = """Without --apply or --revert nothing is written: it prints what --apply would change
and the settings left to the admin (limits, /dev/shm, cgroups, irqbalance).

--apply (root) saves the current value of every setting it changes to the state file,
then writes the recommendations; --revert writes the saved values back exactly and
removes the state file. Applying twice keeps the values from before the first apply.
Changes are runtime only (lost at reboot); each finding's 'persist' says how to keep one.

state file: /var/lib/aitrain/host-tune.json as root, otherwise
$XDG_STATE_HOME/aitrain/host-tune.json (~/.local/state/aitrain/host-tune.json).

exit status: 0 done, 1 some settings were refused or could not be restored, 2 could not run.
"""


def default_state_file() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/aitrain/host-tune.json")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local/state")
    return Path(base) / "aitrain/host-tune.json"


def _add_roots(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proc-root", type=Path, default=Path("/proc"), metavar="DIR",
                   help="procfs to read (default /proc; a captured tree in tests)")
    p.add_argument("--sysfs-root", type=Path, default=Path("/sys"), metavar="DIR",
                   help="sysfs to read (default /sys)")
    p.add_argument("--shm", type=Path, default=None, metavar="PATH",
                   help="tmpfs to measure (default /dev/shm on the live host, the /dev/shm mount "
                        "in <proc-root>/self/mounts otherwise)")
    rdma = p.add_mutually_exclusive_group()
    rdma.add_argument("--rdma", dest="rdma", action="store_true", default=None,
                      help="treat the host as using RDMA (a low memlock limit is then an error)")
    rdma.add_argument("--no-rdma", dest="rdma", action="store_false",
                      help="treat the host as not using RDMA (default: look for /sys/class/infiniband)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_parser(subparsers: Any) -> None:
    host = subparsers.add_parser("host", help="check and tune host kernel settings and limits",
                                 description="Check and tune the host settings that decide training "
                                             "throughput: THP, NUMA balancing, CPU governor, limits, "
                                             "/dev/shm, socket buffers, cgroups, scheduler knobs.")
    sub = host.add_subparsers(dest="host_command", metavar="ACTION")
    sub.required = True
    check = sub.add_parser("check", help="report each setting: current, recommended, why, fix",
                           epilog=CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_roots(check)
    tune = sub.add_parser("tune", help="apply (or revert) the recommendations this tool can set",
                          description="Print, apply or revert host tuning.", epilog=TUNE_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    action = tune.add_mutually_exclusive_group()
    action.add_argument("--apply", action="store_true", help="write the changes (needs root)")
    action.add_argument("--revert", action="store_true",
                        help="restore the values saved by --apply (needs root)")
    tune.add_argument("--state-file", type=Path, default=None, metavar="PATH",
                      help="where --apply saves previous values and --revert reads them")
    tune.add_argument("--only", type=_ids, default=None, metavar="IDS",
                      help="comma-separated finding ids to tune (e.g. host-numa-balancing)")
    tune.add_argument("--skip", type=_ids, default=(), metavar="IDS",
                      help="comma-separated finding ids to leave alone")
    _add_roots(tune)


def _ids(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def run(args: argparse.Namespace) -> int:
    """Exit 2 with one ``aitrain: error:`` line and a HINT when the command cannot run,
    whatever raised: never a traceback (``AITRAIN_DEBUG=1`` prints it as well)."""
    try:
        try:
            if args.host_command == "check":
                return _check(args)
            return _tune(args)
        except AitrainError:
            raise
        except Exception as e:
            from aitrain.launcher.cli.fabric import could_not_run

            raise could_not_run(f"host {args.host_command}", e) from e
    except AitrainError as e:
        from aitrain.launcher.redact import redact_text

        print(f"aitrain: error: {redact_text(str(e))}", file=sys.stderr)
        return EXIT_CANNOT_RUN


def _paths(args: argparse.Namespace) -> HostPaths:
    from aitrain.fabric.host import HostPaths

    return HostPaths(args.proc_root, args.sysfs_root, args.shm)


# --- check ------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from aitrain.fabric.findings import has_errors
    from aitrain.fabric.host import check_host

    findings = check_host(_paths(args), rdma=args.rdma, include_ok=True)
    if args.json:
        print(json.dumps({"findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        _print_check(findings)
    return EXIT_ERRORS if has_errors(findings) else EXIT_OK


def _status_label(f: Finding) -> str:
    status = str(f.data["status"])
    if status == "ok":
        return "ok"
    if status == "not-available":
        return "n/a"
    return f.severity.value


def _print_check(findings: list[Finding]) -> None:
    host = findings[0].host if findings else "?"
    rows = [[f.subject, f.data["current"] or "-", f.data["recommended"], _status_label(f),
             f.data["fix"] if f.data["status"] == "change" else ""] for f in findings]
    print(f"host check on {host}")
    print(_table(["SETTING", "CURRENT", "RECOMMENDED", "STATUS", "FIX"], rows))
    problems = [f for f in findings if f.data["status"] == "change"]
    if problems:
        print("\nwhy:")
        for f in problems:
            print(f"  [{f.severity.value}] {f.id}: {f.message}")
            if f.data.get("persist"):
                print(f"      persist: {f.data['persist']}")
    counts = {label: sum(_status_label(f) == label for f in findings)
              for label in ("error", "warning", "info", "n/a", "ok")}
    print("\n" + ", ".join(f"{n} {label}" for label, n in counts.items()))


def _table(headers: Sequence[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [list(headers), *rows]) for i in range(len(headers) - 1)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row, widths, strict=False)] + [str(row[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --- tune -------------------------------------------------------------------------------------


def _tune(args: argparse.Namespace) -> int:
    from aitrain.fabric.host import apply_tune, plan_tune, revert
    from aitrain.fabric.host.tune import load_state

    state_file = args.state_file or default_state_file()
    if args.revert:
        saved = load_state(state_file) if state_file.exists() else []
        _require_root([e.path for e in saved], "--revert")
        reverted = revert(state_file)
        _print_revert(reverted, state_file, args.json)
        return EXIT_ERRORS if reverted.failed else EXIT_OK
    plan = plan_tune(_paths(args), rdma=args.rdma, only=args.only, skip=args.skip)
    if not args.apply:
        _print_plan(plan, args.json)
        return EXIT_OK
    _require_root([c.path for c in plan.changes], "--apply")
    result = apply_tune(plan, state_file)
    _print_apply(plan, result, args.json)
    return EXIT_ERRORS if result.refused else EXIT_OK


def _require_root(files: list[str], flag: str) -> None:
    """Writing the live /proc/sys or /sys needs root; a captured tree (tests) does not."""
    live = [f for f in files if os.path.realpath(f).startswith(("/proc/", "/sys/"))]
    if live and os.geteuid() != 0:
        raise FabricError(
            f"aitrain host tune {flag} writes kernel settings ({live[0]} and {len(live) - 1} more) "
            f"and needs root; running as uid {os.geteuid()}, nothing was changed",
            f"run 'sudo aitrain host tune {flag}', or run 'aitrain host tune' without flags to "
            "see what it would change",
        )


def _change_dict(c: PlannedChange) -> dict[str, Any]:
    return {"id": c.id, "subject": c.subject, "path": c.path, "current": c.current,
            "value": c.value}


def _print_plan(plan: TunePlan, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"mode": "dry-run", "host": plan.host,
                          "changes": [_change_dict(c) for c in plan.changes],
                          "manual": [f.to_dict() for f in plan.manual]}, indent=2))
        return
    if plan.changes:
        print(f"host tune on {plan.host}: --apply would change {len(plan.changes)} setting(s) "
              "(dry run, nothing written)")
        print(_table(["SETTING", "CURRENT", "NEW", "FILE"],
                     [[c.subject, c.current or "-", c.value, c.path] for c in plan.changes]))
    else:
        print(f"host tune on {plan.host}: nothing to change")
    _print_manual(plan.manual)


def _print_manual(manual: list[Finding]) -> None:
    if not manual:
        return
    print("\nleft to the admin (aitrain does not change these):")
    print(_table(["SETTING", "CURRENT", "RECOMMENDED", "FIX"],
                 [[f.subject, f.data["current"] or "-", f.data["recommended"], f.data["fix"]]
                  for f in manual]))


def _print_apply(plan: TunePlan, result: TuneResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "mode": "apply", "host": plan.host,
            "applied": [_change_dict(c) for c in result.applied],
            "unchanged": [_change_dict(c) for c in result.unchanged],
            "refused": [{**_change_dict(c), "reason": r} for c, r in result.refused],
            "manual": [f.to_dict() for f in plan.manual],
            "state_file": str(result.state_file) if result.state_file else None,
        }, indent=2))
        return
    for c in result.applied:
        print(f"set {c.subject}: {c.current} -> {c.value}")
    for c, reason in result.refused:
        print(f"refused {c.subject}: {reason}", file=sys.stderr)
    print(f"applied {len(result.applied)}, already set {len(result.unchanged)}, "
          f"refused {len(result.refused)}")
    if result.state_file:
        print(f"previous values saved in {result.state_file}; undo with: "
              f"aitrain host tune --revert --state-file {result.state_file}")
    _print_manual(plan.manual)


def _print_revert(result: RevertResult, state_file: Path, as_json: bool) -> None:
    if as_json:
        def entry(e: StateEntry) -> dict[str, Any]:
            return {"id": e.id, "subject": e.subject, "path": e.path, "restored": e.previous_value()}

        print(json.dumps({
            "mode": "revert",
            "restored": [entry(e) for e in result.restored],
            "failed": [{**entry(e), "reason": r} for e, r in result.failed],
            "drifted": [{**entry(e), "found": now, "applied": e.value} for e, now in result.drifted],
            "state_file": str(state_file),
        }, indent=2))
        return
    if result.state_file is None:
        print(f"nothing to revert: no saved host settings at {state_file}")
        return
    for e, now in result.drifted:
        print(f"note: {e.subject} was changed since apply (found {now!r}, applied {e.value!r})")
    for e in result.restored:
        print(f"restored {e.subject} = {e.previous_value()}")
    for e, reason in result.failed:
        print(f"could not restore {e.subject}: {reason}", file=sys.stderr)
    if result.failed:
        print(f"kept the unrestored entries in {state_file}; fix the cause and run --revert again",
              file=sys.stderr)
