"""Collective benchmarks with nccl-tests' conventions, run inside the ranks of a job.

Per size: time per operation (the slowest rank's mean), algorithm bandwidth
``algbw = size / time`` and bus bandwidth ``busbw = algbw * factor`` with nccl-tests'
factors (``doc/PERFORMANCE.md`` there), so numbers compare with nccl-tests and across
rank counts:

=============== ============== ==============================================
collective      busbw factor   size means
=============== ============== ==============================================
all_reduce      2(n-1)/n       the buffer each rank holds
all_gather      (n-1)/n        the gathered (output) buffer
reduce_scatter  (n-1)/n        the input buffer (n output chunks)
broadcast       1              the buffer
all_to_all      (n-1)/n        the buffer each rank sends (n chunks)
sendrecv        1              the buffer each rank sends to the next rank
=============== ============== ==============================================

Every size is first run once on known data and checked (``correct``), then timed on
a separate buffer. The pure parts (sizes, formulas, tables, results) import nothing
heavy; the functions that run collectives import torch when called.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from aitrain.errors import FabricError

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "sendrecv")
ELEMENT_BYTES = 4  # float32
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


# --------------------------------------------------------------------------- formulas


def busbw_factor(collective: str, n: int) -> float:
    """nccl-tests' bus-bandwidth factor for ``n`` ranks."""
    if n < 1:
        raise ValueError(f"world size must be >= 1, got {n}")
    if collective == "all_reduce":
        return 2 * (n - 1) / n
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if collective in ("broadcast", "sendrecv"):
        return 1.0
    raise ValueError(f"unknown collective {collective!r}; known: {', '.join(COLLECTIVES)}")


def algbw_gbps(size_bytes: int, seconds: float) -> float:
    """GB/s (1e9 bytes per second), as nccl-tests prints it."""
    return size_bytes / seconds / 1e9 if seconds > 0 else 0.0


def busbw_gbps(collective: str, size_bytes: int, seconds: float, n: int) -> float:
    return algbw_gbps(size_bytes, seconds) * busbw_factor(collective, n)


# --------------------------------------------------------------------------- sizes


def parse_size(text: str | int) -> int:
    """``8K`` / ``256M`` / ``1G`` / ``64MiB`` / ``4096`` -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 8K, 256M, 1G or a byte count)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def fmt_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        size = _UNITS[unit]
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B" if n < 1024 else f"{n / 1024:.1f}K"


def size_sweep(spec: str = "8K:256M", factor: int = 4) -> list[int]:
    """``MIN:MAX`` stepping by ``factor`` (both ends included), or ``A,B,C``."""
    if "," in spec or ":" not in spec:
        return [parse_size(s) for s in spec.split(",") if s.strip()]
    lo_s, hi_s = spec.split(":", 1)
    lo, hi = parse_size(lo_s), parse_size(hi_s)
    if lo <= 0 or hi < lo:
        raise ValueError(f"bad size range {spec!r}: need 0 < MIN <= MAX")
    if factor < 2:
        raise ValueError(f"--factor must be >= 2, got {factor}")
    sizes, s = [], lo
    while s < hi:
        sizes.append(s)
        s *= factor
    sizes.append(hi)
    return sizes


def element_count(collective: str, size_bytes: int, n: int) -> int:
    """Elements of the *size* buffer, rounded down so it splits into ``n`` chunks
    where the collective needs that (at least one element per chunk)."""
    count = max(1, size_bytes // ELEMENT_BYTES)
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        count = max(n, count - count % n)
    return count


def default_iters(size_bytes: int, budget_bytes: int = 256 << 20, lo: int = 2, hi: int = 50) -> int:
    """Timed iterations: more for small sizes, at least ``lo``."""
    return max(lo, min(hi, math.ceil(budget_bytes / max(1, size_bytes))))


# --------------------------------------------------------------------------- results


@dataclass
class BenchRow:
    collective: str
    size_bytes: int
    count: int
    time_us: float = 0.0
    algbw_gbps: float = 0.0
    busbw_gbps: float = 0.0
    correct: bool | None = None
    iters: int = 0
    error: str | None = None


@dataclass
class BenchResult:
    world_size: int = 1
    backend: str = ""
    device: str = "cpu"
    rows: list[BenchRow] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """The fabric env the ranks ran with (NCCL_*/GLOO_*)."""
    nodes: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def correct(self) -> bool:
        return all(r.correct is not False and r.error is None for r in self.rows)

    def row(self, collective: str, size_bytes: int) -> BenchRow | None:
        return next((r for r in self.rows if r.collective == collective and r.size_bytes == size_bytes), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        rows = [BenchRow(**r) for r in d.get("rows", [])]
        return cls(world_size=d.get("world_size", 1), backend=d.get("backend", ""),
                   device=d.get("device", "cpu"), rows=rows, env=dict(d.get("env", {})),
                   nodes=list(d.get("nodes", [])), label=d.get("label", ""))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


TABLE_HEAD = f"{'size':>8} {'count':>11} {'time(us)':>11} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12} {'check':>6}"


def render_header(result: BenchResult) -> list[str]:
    lines = [f"# {result.world_size} rank(s), backend {result.backend}, device {result.device}"
             + (f", nodes {', '.join(result.nodes)}" if result.nodes else "")]
    for key in sorted(k for k in result.env if k.endswith("SOCKET_IFNAME") or k.startswith("NCCL_IB_HCA")):
        lines.append(f"#   {key}={result.env[key]}")
    return lines


def render_row(row: BenchRow, previous: str | None = None) -> list[str]:
    """A row's table line, after its collective's block heading when ``previous`` (the
    collective of the row before it) is another one."""
    lines = ["", f"## {row.collective}", TABLE_HEAD] if row.collective != previous else []
    if row.error:
        return [*lines, f"{fmt_size(row.size_bytes):>8} {row.count:>11} {'error: ' + row.error}"]
    check = {True: "ok", False: "WRONG", None: "-"}[row.correct]
    return [*lines, f"{fmt_size(row.size_bytes):>8} {row.count:>11} {row.time_us:>11.1f} "
                    f"{row.algbw_gbps:>12.3f} {row.busbw_gbps:>12.3f} {check:>6}"]


def render_table(result: BenchResult) -> str:
    """nccl-tests-like table, one block per collective."""
    lines = render_header(result)
    by_coll: dict[str, list[BenchRow]] = {}
    for r in result.rows:
        by_coll.setdefault(r.collective, []).append(r)
    for rows in by_coll.values():
        previous = None
        for r in rows:
            lines += render_row(r, previous)
            previous = r.collective
    return "\n".join(lines)


def plot_busbw(results: Sequence[BenchResult], path: str) -> str:
    """A PNG of busbw vs size, one line per (result, collective).

    Needs matplotlib, an optional extra (``aitrain[plot]``): without it this raises
    :class:`FabricError` saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise FabricError("--plot needs matplotlib, which is not installed",
                          "pip install 'aitrain[plot]' (or matplotlib) into aitrain's environment") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for res in results:
        by_coll: dict[str, list[BenchRow]] = {}
        for r in res.rows:
            if r.error is None:
                by_coll.setdefault(r.collective, []).append(r)
        for coll, rows in by_coll.items():
            label = f"{res.label + ': ' if res.label else ''}{coll}"
            ax.plot([r.size_bytes for r in rows], [r.busbw_gbps for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    n = results[0].world_size if results else 0
    ax.set_title(f"collective bus bandwidth, {n} ranks ({results[0].backend if results else ''})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- running (in ranks)


def pick_device(backend: str = "auto") -> tuple[str, str]:
    """(device, backend) like the built-in job: cuda + nccl when CUDA is there."""
    import os

    import torch

    if backend in ("auto", "nccl") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local % torch.cuda.device_count())
        return f"cuda:{torch.cuda.current_device()}", "nccl"
    if backend == "nccl":
        raise RuntimeError("backend nccl needs CUDA, which this host does not have")
    return "cpu", "gloo"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _op(collective: str, n: int, rank: int) -> Callable[[Any, Any], None]:
    import torch.distributed as dist

    if collective == "all_reduce":
        return lambda send, recv: dist.all_reduce(send)
    if collective == "all_gather":
        return lambda send, recv: dist.all_gather_into_tensor(recv, send)
    if collective == "reduce_scatter":
        return lambda send, recv: dist.reduce_scatter_tensor(recv, send)
    if collective == "broadcast":
        return lambda send, recv: dist.broadcast(send, src=0)
    if collective == "all_to_all":
        return lambda send, recv: dist.all_to_all_single(recv, send)
    if collective == "sendrecv":
        def sendrecv(send: Any, recv: Any) -> None:
            ops = [dist.P2POp(dist.isend, send, (rank + 1) % n), dist.P2POp(dist.irecv, recv, (rank - 1) % n)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return sendrecv
    raise ValueError(f"unknown collective {collective!r}")


def _buffers(collective: str, count: int, n: int, device: str, fill: bool, rank: int) -> tuple[Any, Any]:
    """(send, recv) for one collective; with ``fill`` the send buffer holds known data."""
    import torch

    send_count = count // n if collective == "all_gather" else count
    recv_count = {"all_gather": count, "reduce_scatter": count // n, "all_to_all": count,
                  "sendrecv": count}.get(collective, 0)
    if not fill:
        send = torch.zeros(send_count, dtype=torch.float32, device=device)
    elif collective == "reduce_scatter":  # chunk j holds (rank+1)*(j+1)
        send = (torch.arange(n, dtype=torch.float32, device=device) + 1).repeat_interleave(count // n) * (rank + 1)
    elif collective == "all_to_all":  # chunk j holds rank*n + j
        send = (torch.arange(n, dtype=torch.float32, device=device) + rank * n).repeat_interleave(count // n)
    elif collective == "broadcast":
        send = torch.full((send_count,), 42.0 if rank == 0 else 0.0, dtype=torch.float32, device=device)
    else:
        send = torch.full((send_count,), float(rank + 1), dtype=torch.float32, device=device)
    recv = torch.empty(recv_count, dtype=torch.float32, device=device) if recv_count else None
    return send, recv


def check_result(collective: str, send: Any, recv: Any, n: int, rank: int) -> bool:
    """Is the output what the known input must give?"""
    import torch

    if collective == "all_reduce":
        return bool((send == n * (n + 1) / 2).all())
    if collective == "broadcast":
        return bool((send == 42.0).all())
    if collective == "all_gather":  # chunk r holds r+1
        expect = (torch.arange(n, dtype=torch.float32, device=recv.device) + 1).repeat_interleave(recv.numel() // n)
        return bool(torch.equal(recv, expect))
    if collective == "reduce_scatter":  # sum over ranks of (rank+1)*(my_rank+1)
        return bool((recv == (rank + 1) * n * (n + 1) / 2).all())
    if collective == "all_to_all":  # chunk j came from rank j: j*n + my_rank
        sources = torch.arange(n, dtype=torch.float32, device=recv.device)
        expect = (sources * n + rank).repeat_interleave(recv.numel() // n)
        return bool(torch.equal(recv, expect))
    if collective == "sendrecv":
        return bool((recv == float((rank - 1) % n + 1)).all())
    raise ValueError(collective)


def run_collective(collective: str, size_bytes: int, *, iters: int | None = None, warmup: int = 1,
                   device: str = "cpu", check: bool = True) -> BenchRow:
    """Run one collective at one size on the default process group (every rank calls
    this with the same arguments). Returns the same row on every rank."""
    import torch
    import torch.distributed as dist

    n, rank = dist.get_world_size(), dist.get_rank()
    count = element_count(collective, size_bytes, n)
    row = BenchRow(collective=collective, size_bytes=count * ELEMENT_BYTES, count=count)
    if collective == "sendrecv" and n < 2:
        row.error = "needs 2 or more ranks"
        return row
    op = _op(collective, n, rank)
    if check:
        send, recv = _buffers(collective, count, n, device, True, rank)
        op(send, recv)
        _sync(device)
        ok = torch.tensor([1.0 if check_result(collective, send, recv, n, rank) else 0.0], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        row.correct = bool(ok.item() == 1.0)
        del send, recv
    iters = iters or default_iters(row.size_bytes)
    send, recv = _buffers(collective, count, n, device, False, rank)
    for _ in range(warmup):
        op(send, recv)
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        op(send, recv)
    _sync(device)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    seconds = float(elapsed.item()) / iters
    row.iters = iters
    row.time_us = seconds * 1e6
    row.algbw_gbps = algbw_gbps(row.size_bytes, seconds)
    row.busbw_gbps = row.algbw_gbps * busbw_factor(collective, n)
    return row


def run_sweep(collectives: Iterable[str], sizes: Iterable[int], *, iters: int | None = None,
              warmup: int = 1, device: str = "cpu", check: bool = True,
              on_row: Callable[[BenchRow], None] | None = None) -> list[BenchRow]:
    """Every collective at every size; ``on_row`` sees each row as soon as it is measured."""
    rows = []
    sizes = list(sizes)
    for coll in collectives:
        for size in sizes:
            rows.append(run_collective(coll, size, iters=iters, warmup=warmup, device=device, check=check))
            if on_row is not None:
                on_row(rows[-1])
    return rows
