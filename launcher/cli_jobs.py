"""``aitrain status|logs|cancel <handle>``: follow a submitted job by its handle.

Handles look like ``slurm://<cluster>/<jobid>`` (what ``aitrain launch backend=slurm``
prints) or ``ray://<head>:<dashboard port>/<submission id>`` (``backend=ray`` with a Jobs
API address, or ``aitrain.submit``); the scheme picks the backend.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from aitrain.errors import ConfigError

COMMANDS = ("status", "logs", "cancel")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="state of a submitted job, and which node/rank failed",
                       description="Show a submitted job's state, nodes, restarts and failures.")
    p.add_argument("handle", help="job handle, e.g. slurm://cluster/1234 or ray://head:8265/raysubmit_abc")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("logs", help="a submitted job's output (all ranks, or one)",
                       description="Print a submitted job's output; --follow keeps printing until it ends.")
    p.add_argument("handle")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")
    p.add_argument("--rank", type=int, default=None, help="only this global rank's lines")
    p = sub.add_parser("cancel", help="cancel a submitted job (idempotent)",
                       description="Cancel a submitted job. Cancelling a finished job is not an error.")
    p.add_argument("handle")


def backend_for(handle: str) -> Any:
    scheme = handle.split("://", 1)[0] if "://" in handle else ""
    if scheme == "slurm" or handle.isdigit():
        from aitrain.launcher.backends.slurm import SlurmBackend

        return SlurmBackend()
    if scheme == "ray" or handle.startswith("raysubmit_"):
        from aitrain.launcher.backends.ray import RayBackend

        return RayBackend()
    raise ConfigError(f"unknown job handle {handle!r}",
                      "handles look like slurm://<cluster>/<jobid> or ray://<head>:8265/<submission id>, "
                      "as printed by `aitrain launch`")


def run(args: argparse.Namespace) -> int:
    backend = backend_for(args.handle)
    if args.command == "status":
        st = backend.status(args.handle)
        print(json.dumps(st.to_dict(), indent=2) if args.json else st)
        if st.state == "UNKNOWN":
            return 2
        return 1 if st.failures or st.state in ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT") else 0
    if args.command == "logs":
        try:
            for line in backend.logs(args.handle, follow=args.follow, rank=args.rank):
                print(line, flush=True)
        except BrokenPipeError:
            sys.stderr.close()
        return 0
    print(backend.cancel(args.handle))
    return 0
