"""``aitrain list|status|logs|cancel``: the jobs launched from this machine, by their handles.

Handles name where a job runs: ``local://<host>/<id>`` (an ``aitrain launch`` on this machine,
in the foreground or submitted detached), ``slurm://<cluster>/<jobid>`` (what ``aitrain launch
backend=slurm`` prints) and ``ray://<head>:<dashboard port>/<submission id>`` (the Ray Jobs
API); the scheme picks the backend. Every backend reports the same states: PENDING, RUNNING,
SUCCEEDED, FAILED, CANCELLED, PREEMPTED, UNKNOWN.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from aitrain.errors import AitrainError

HANDLE_HELP = "job handle: local://host/id, slurm://cluster/1234 or ray://head:8265/raysubmit_abc"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("list", help="jobs launched from this machine, every backend, with their state",
                       description="The jobs launched from this machine (foreground and submitted, every "
                                   "backend), newest first, with their state as their backend reports it.")
    p.add_argument("-n", "--limit", type=int, default=20, metavar="N", help="how many (default 20; 0: all)")
    p.add_argument("--backend", choices=("local", "slurm", "ray"), help="only this backend's jobs")
    p.add_argument("--json", action="store_true", help="machine-readable output (a list of status objects)")
    p = sub.add_parser("status", help="state of a job, and which node/rank failed",
                       description="Show a job's state, nodes, restarts and failures (root cause first). "
                                   "Exit code: 0 pending/running/succeeded, 1 failed, 2 unknown.")
    p.add_argument("handle", help=HANDLE_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("logs", help="a job's output (all ranks, or one)",
                       description="Print a job's output; --follow keeps printing until it ends.")
    p.add_argument("handle", help=HANDLE_HELP)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")
    p.add_argument("--rank", type=int, default=None, help="only this global rank's lines (its own log file)")
    p = sub.add_parser("cancel", help="cancel a job (idempotent)",
                       description="Cancel a job. Cancelling a job that has ended is not an error.")
    p.add_argument("handle", help=HANDLE_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output: the handle and its state after")


def run(args: argparse.Namespace) -> int:
    from aitrain.launcher.backends import backend_for_handle

    if args.command == "list":
        from aitrain.launcher.ghosts import recover_from_registry

        recover_from_registry()  # MLflow runs left RUNNING by a launcher that was killed
        return list_jobs(args)
    backend = backend_for_handle(args.handle)
    if args.command == "status":
        st = backend.status(args.handle)
        print(json.dumps(st.to_dict(), indent=2) if args.json else st)
        if st.state.value == "UNKNOWN":
            return 2
        return 1 if st.state.value == "FAILED" else 0
    if args.command == "logs":
        try:
            for line in backend.logs(args.handle, follow=args.follow, rank=args.rank):
                print(line, flush=True)
        except BrokenPipeError:
            sys.stderr.close()
        return 0
    message = backend.cancel(args.handle)
    if args.json:
        try:
            st = backend.status(args.handle)
            state: dict[str, Any] = {"state": st.state.value, "native_state": st.native_state}
        except AitrainError:
            state = {"state": "UNKNOWN", "native_state": ""}
        print(json.dumps({"handle": args.handle, "cancelled": message.startswith("cancelled"),
                          "message": message, **state}, indent=2))
    else:
        print(message)
    return 0


def list_jobs(args: argparse.Namespace) -> int:
    from aitrain.launcher.backends.api import list_jobs as registered

    jobs = registered(args.backend, args.limit or None)
    if args.json:
        print(json.dumps([j.to_dict() for j in jobs], indent=2))
        return 0
    if not jobs:
        print("no jobs launched from this machine yet (`aitrain launch` records each one here)")
        return 0
    rows = [["HANDLE", "BACKEND", "STATE", "SUBMITTED", "RUN DIR"]]
    for j in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.submitted_at)) if j.submitted_at else "-"
        state = j.state.value + (f" ({j.native_state})" if j.native_state and j.native_state != j.state.value else "")
        rows.append([j.handle, j.backend or "-", state, when, j.run_dir or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0
