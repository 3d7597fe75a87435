"""Time from `aitrain launch` to the end of the first optimizer step, vs torchrun.

Both sides run the same tiny GPT under DDP at 2 ranks on this machine:
aitrain runs its built-in job (default config: Hydra composition, MLflow
tracking on), torchrun --standalone runs a plain script with the same model,
data and optimizer. Each side is timed from process start until rank 0 prints
its first step line. Repetitions are interleaved so drift hits both alike.

    python bench/first_step.py [--reps 5] [--nproc 2]

Target: aitrain <= 0.8x torchrun (median): the ranks are forked from the node agent's
zygote, which has imported torch while Hydra composed the job (launcher/zygote.py).
`AITRAIN_FORK_SERVER=0` in the environment measures fresh rank interpreters instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN_SCRIPT = '''
import os, time, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from aitrain.strategies.model import GPT, GPTArgs, cross_entropy
from aitrain.launcher.data import MarkovTokens
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = DDP(GPT(GPTArgs()))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
data = MarkovTokens(256, 64, 4, 0)
steps = int(os.environ.get("BENCH_STEPS", "1"))
for step in range(1, steps + 1):
    x, y = data.local_batch(step - 1, 16, rank, world)
    loss = cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if rank == 0:
        print(f"step {step}/{steps} loss {loss.item():.4f}", flush=True)
dist.barrier()
dist.destroy_process_group()
'''


def time_to_marker(argv: list[str], cwd: Path, marker: str = "step 1/", timeout: float = 120) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    elapsed = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if elapsed is None and marker in line:
            elapsed = time.perf_counter() - t0
    proc.wait(timeout)
    if elapsed is None or proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode} without printing {marker!r}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    bindir = Path(sys.executable).parent
    aitrain = [str(bindir / "aitrain"), "launch", f"nproc_per_node={args.nproc}", "train.steps=1"]
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        script = cwd / "plain_ddp.py"
        script.write_text(PLAIN_SCRIPT)
        torchrun = [str(bindir / "torchrun"), "--standalone", f"--nproc-per-node={args.nproc}", str(script)]
        # Warm-up: page cache, and MLflow's one-time sqlite schema creation.
        time_to_marker(aitrain, cwd)
        time_to_marker(torchrun, cwd)
        a, t = [], []
        for i in range(args.reps):
            a.append(time_to_marker(aitrain, cwd))
            t.append(time_to_marker(torchrun, cwd))
            print(f"rep {i + 1}: aitrain {a[-1]:.2f}s  torchrun {t[-1]:.2f}s", flush=True)
    ma, mt = statistics.median(a), statistics.median(t)
    ratio = ma / mt
    print(f"median time to first optimizer step: aitrain {ma:.2f}s, torchrun {mt:.2f}s, ratio {ratio:.3f} "
          f"(target <= 0.8): {'OK' if ratio <= 0.8 else 'ABOVE TARGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
