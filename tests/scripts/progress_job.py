"""A torchrun-compatible job for the observability tests: steps with a collective, progress
reports, rank 0's metrics spool, and switches (env) to hang or pause it.

    STEPS=30 STEP_SLEEP=0.05       steps and the pause in each
    HANG_RANK=1 HANG_STEP=3        that rank sleeps before the collective of that step; the others wait in it
    GATE_DIR=d GATE_STEPS=10,20    after those steps rank 0 waits for the file d/gate<step>
                                   (the others wait in the collective)
"""

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from aitrain.launcher import progress
from aitrain.launcher.metrics import MetricsWriter

progress.mark("startup")
dist.init_process_group("gloo")
progress.mark("pg_init")
rank, world = dist.get_rank(), dist.get_world_size()
steps = int(os.environ.get("STEPS", "10"))
pause = float(os.environ.get("STEP_SLEEP", "0.05"))
hang_rank, hang_step = int(os.environ.get("HANG_RANK", "-1")), int(os.environ.get("HANG_STEP", "-1"))
gate_dir = os.environ.get("GATE_DIR")
gates = {int(s) for s in os.environ.get("GATE_STEPS", "").split(",") if s}
metrics = MetricsWriter()
if rank == 0:
    progress.note(n_params=1000, device="cpu")

print("the same line on every rank", flush=True)
print(f"only rank {rank} says this", flush=True)
for step in range(1, steps + 1):
    t0 = time.perf_counter()
    if rank == hang_rank and step == hang_step:
        print(f"rank {rank} sleeps at step {step}", flush=True)
        time.sleep(600)
    t = torch.ones(1)
    dist.all_reduce(t)
    time.sleep(pause)
    dt = time.perf_counter() - t0
    progress.step(step)
    if rank == 0:
        metrics.log(step, loss=1.0 / step, tokens_per_s=1000.0 / dt, step_time_s=dt, lr=0.1)
    if rank == 0 and gate_dir and step in gates:
        gate = Path(gate_dir) / f"gate{step}"
        while not gate.exists():
            time.sleep(0.05)
progress.done()
metrics.close()
dist.barrier()  # gloo can abort if a peer destroys the group mid-collective
dist.destroy_process_group()
