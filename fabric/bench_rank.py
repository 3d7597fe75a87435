"""The rank program of ``aitrain fabric bench`` and of the pre-launch smoke test.

A torchrun-compatible script: it reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
from the environment (the node agent sets them), joins a process group (nccl on
CUDA, gloo on CPU, as the built-in job does) and

- ``--mode bench``: runs the collective sweep; rank 0 writes the results as JSON
  (``--out``);
- ``--mode smoke``: checks that the socket interface it was told to use is up,
  then runs one short all_reduce, checks the result and exits 0; any failure or a
  timeout (``--timeout``) exits non-zero naming this host;
- ``--mode precheck``: only the interface check (no torch, no process group).

    python -m aitrain.fabric.bench_rank --mode bench --sizes 8K:256M --factor 4 --out r.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

EXIT_INTERFACE_DOWN = 3
EXIT_WRONG_RESULT = 4


def node_name() -> str:
    return os.environ.get("AITRAIN_NODE_NAME") or socket.gethostname()


def socket_interfaces() -> list[str]:
    """The interface(s) the env tells gloo / NCCL to use (exact names only)."""
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        value = os.environ.get(key, "")
        if value and not value.startswith("^"):
            return [n for n in value.lstrip("=").split(",") if n]
    return []


def interface_problem(names: list[str]) -> str | None:
    """Why the configured socket interface cannot carry traffic, or None."""
    from aitrain.fabric.probe.netns import read_kernel_links

    links = read_kernel_links()
    if links is None:
        return None
    by_name = {lk.name: lk for lk in links}
    for name in names:
        link = by_name.get(name)
        if link is None:
            return f"interface {name} does not exist on {node_name()}"
        if link.operstate != "up":
            return f"interface {name} is down on {node_name()}"
    return None


def _die_with_parent() -> None:
    """The agent starts ranks in their own session: make sure they die with it."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _row_writer(path: str) -> Callable[[Any], None]:
    """Appends each measured row to ``path`` (one JSON line, flushed) for the CLI to show."""
    import dataclasses

    def write(row: Any) -> None:
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps(dataclasses.asdict(row)) + "\n")
        except OSError:
            pass  # the rows are a view; the result file is what counts

    return write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("bench", "smoke", "precheck"), default="bench",
                    help="precheck: only check that this node's socket interface is up (no torch)")
    ap.add_argument("--collectives", default="all_reduce")
    ap.add_argument("--sizes", default="8K:256M")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--iters", type=int, default=0, help="timed iterations per size (0: by size)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    ap.add_argument("--timeout", type=float, default=None,
                    help="process-group timeout in seconds (default: AITRAIN_COLLECTIVE_TIMEOUT_S or 600)")
    ap.add_argument("--out", default=None, help="rank 0 writes the JSON result here")
    ap.add_argument("--rows", default=None, help="rank 0 appends each row here (JSON lines) as it is measured")
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)
    _die_with_parent()

    if args.mode in ("smoke", "precheck"):
        problem = interface_problem(socket_interfaces())
        if problem:
            print(f"aitrain smoke: {problem}", file=sys.stderr, flush=True)
            return EXIT_INTERFACE_DOWN
        if args.mode == "precheck":
            return 0

    import torch.distributed as dist

    from aitrain.fabric import bench

    timeout = args.timeout or float(os.environ.get("AITRAIN_COLLECTIVE_TIMEOUT_S") or 600)
    device, backend = bench.pick_device(args.backend)
    t0 = time.monotonic()
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    rank, n = dist.get_rank(), dist.get_world_size()
    try:
        if args.mode == "smoke":
            row = bench.run_collective("all_reduce", 1 << 20, iters=1, warmup=0, device=device)
            if not row.correct:
                print(f"aitrain smoke: all_reduce gave a wrong result on {node_name()}", file=sys.stderr)
                return EXIT_WRONG_RESULT
            if rank == 0:
                print(f"aitrain smoke: all_reduce over {n} ranks ok in {time.monotonic() - t0:.2f}s", flush=True)
            result = bench.BenchResult(world_size=n, backend=backend, device=device, rows=[row])
        else:
            collectives = [c.strip() for c in args.collectives.split(",") if c.strip()]
            if collectives == ["all"]:
                collectives = list(bench.COLLECTIVES)
            sizes = bench.size_sweep(args.sizes, args.factor)
            rows = bench.run_sweep(collectives, sizes, iters=args.iters or None, warmup=args.warmup,
                                   device=device, check=not args.no_check,
                                   on_row=_row_writer(args.rows) if rank == 0 and args.rows else None)
            result = bench.BenchResult(world_size=n, backend=backend, device=device, rows=rows,
                                       label=args.label)
        names: list[object] = [None] * n
        dist.all_gather_object(names, node_name())
        result.nodes = list(dict.fromkeys(str(x) for x in names))
        result.env = {k: v for k, v in os.environ.items()
                      if k.startswith(("NCCL_", "GLOO_", "TORCH_NCCL_")) or k == "OMP_NUM_THREADS"}
        if rank == 0 and args.out:
            tmp = f"{args.out}.tmp"
            with open(tmp, "w") as fh:
                fh.write(result.to_json())
            os.replace(tmp, args.out)
        dist.barrier()
        return 0 if result.correct else EXIT_WRONG_RESULT
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
