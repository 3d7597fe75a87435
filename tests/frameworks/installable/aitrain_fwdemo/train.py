"""``python -m aitrain_fwdemo.train --steps N --report-dir DIR``: a few DDP steps on gloo.

Each rank writes ``rank<N>.json`` to ``--report-dir``: where the module was imported from
(``__file__``: the installed copy in site-packages), its version from the installed
metadata, ``sys.argv``, its working directory, the world size and the final loss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m aitrain_fwdemo.train")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--report-dir", required=True)
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    loss = torch.zeros(())
    for _ in range(args.steps):
        x = torch.randn(16, 4, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    Path(args.report_dir, f"rank{rank}.json").write_text(json.dumps({
        "file": __file__, "version": version("aitrain-fwdemo"), "argv": sys.argv, "cwd": os.getcwd(),
        "world_size": world, "mean_loss": total.item() / world,
    }))
    # Under torch 2.13 on gloo, a rank that destroys the group straight after a collective now and
    # then aborts at exit ("terminate called without an active exception", under plain torchrun
    # too): every rank waits for the others first, as tests/frameworks/scripts/accelerate_gather.py.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
