"""A torchrun-compatible script for tests: rank FAIL_RANK raises, the others block in a collective."""

import os
import sys
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
pid_dir = os.environ.get("PID_DIR")
if pid_dir:
    with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
print(f"ready rank {rank}", flush=True)
mode = os.environ.get("MODE", "raise")
if mode == "raise" and rank == int(os.environ.get("FAIL_RANK", "1")):
    time.sleep(0.5)
    raise RuntimeError(f"deliberate failure on rank {rank}")
if mode == "sleep":
    time.sleep(600)
t = torch.ones(1)
dist.all_reduce(t)  # the healthy ranks wait here for the failed one
time.sleep(600)
sys.exit(0)
