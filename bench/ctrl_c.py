"""Ctrl-C (and SIGTERM) to every rank gone: aitrain vs torchrun, at 2 and 8 ranks.

Both sides run the same training loop (a tiny DDP model stepping in a loop, as a user's
script). Once every rank is stepping, the whole foreground process group gets SIGINT (what
a terminal's Ctrl-C does), or the launcher alone gets SIGTERM (what `kill`, Slurm and
`aitrain cancel` do); the clock stops when the last rank process is gone. Also counted: the
lines printed after the signal and the tracebacks among them (torchrun shows one
KeyboardInterrupt traceback per rank). Repetitions are interleaved.

    python bench/ctrl_c.py [--reps 3] [--nproc 2 8] [--signal INT TERM]

Target: at most 3 s at 2 and at 8 ranks; no tracebacks from ranks that were told to stop.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LOOP = '''
import os, sys, time, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
dist.init_process_group("gloo")
model = DDP(torch.nn.Linear(64, 64))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.pid"), "w") as f:
    f.write(str(os.getpid()))
while True:
    model(torch.randn(8, 64)).sum().backward()
    opt.step()
    opt.zero_grad()
'''


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def one(argv: list[str], n: int, sig: str, work: Path) -> tuple[float, int, int]:
    """(seconds from the signal to the last rank gone, lines printed after it, tracebacks)."""
    pids_dir = Path(tempfile.mkdtemp(dir=work))
    proc = subprocess.Popen([*argv, str(pids_dir)], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter(), x) for x in proc.stdout or ()))
    reader.start()
    deadline = time.monotonic() + 120
    while len(list(pids_dir.glob("rank*.pid"))) < n or not all(p.read_text() for p in pids_dir.glob("rank*.pid")):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"{argv[:6]}... did not start {n} ranks")
        time.sleep(0.05)
    pids = [int(p.read_text()) for p in pids_dir.glob("rank*.pid")]
    time.sleep(1.0)  # every rank is stepping
    t0 = time.perf_counter()
    if sig == "INT":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    while any(_alive(p) for p in pids) and time.perf_counter() - t0 < 60:
        time.sleep(0.01)
    gone = time.perf_counter() - t0
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10)
    after = [x for t, x in lines if t >= t0]
    return gone, len(after), sum("Traceback" in x for x in after)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 8])
    p.add_argument("--signal", nargs="+", default=["INT", "TERM"], choices=["INT", "TERM"])
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aitrain-bench-ctrlc-"))
    script = work / "loop.py"
    script.write_text(LOOP)
    py = sys.executable
    print(f"# {os.cpu_count()} CPUs; {args.reps} reps, interleaved; seconds from the signal to the last rank gone")
    print(f"{'signal':<7}{'ranks':>6}  {'torchrun':>9} {'aitrain':>9} {'ratio':>6}  "
          f"{'lines after (t/a)':>18} {'tracebacks (t/a)':>17}")
    worst = 0.0
    for sig in args.signal:
        for n in args.nproc:
            sides = {
                "torchrun": [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(script)],
                "aitrain": [py, "-m", "aitrain.launcher.cli", "launch", "tracking=none", f"nproc_per_node={n}",
                            f"run_root={work / 'runs'}", "--", str(script)],
            }
            res: dict[str, list[tuple[float, int, int]]] = {k: [] for k in sides}
            for _ in range(args.reps):
                for name, argv in sides.items():
                    res[name].append(one(argv, n, sig, work))
            t = statistics.median(r[0] for r in res["torchrun"])
            a = statistics.median(r[0] for r in res["aitrain"])
            worst = max(worst, a)
            lines = f"{max(r[1] for r in res['torchrun'])}/{max(r[1] for r in res['aitrain'])}"
            tbs = f"{max(r[2] for r in res['torchrun'])}/{max(r[2] for r in res['aitrain'])}"
            print(f"SIG{sig:<4}{n:>6}  {t:>8.2f}s {a:>8.2f}s {a / t:>5.2f}x  {lines:>18} {tbs:>17}", flush=True)
    print(f"target: aitrain <= 3 s everywhere: {'met' if worst <= 3 else 'NOT met'} (worst {worst:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
