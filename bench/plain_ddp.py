"""The baseline for bench/strategies.py: a plain torchrun + DistributedDataParallel script.

Trains the same built-in GPT on the same data with the same optimizer, schedule and clipping as
``aitrain launch +strategy=ddp``, with nothing from aitrain's strategies or launcher loop in the
step, and times each step over the same span (batch -> optimizer step). Writes one JSON line per
step (``step``, ``step_time_s``) to ``--out`` from rank 0.

    torchrun --nproc-per-node 2 bench/plain_ddp.py --n-layer 6 --d-model 256 ... --out times.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from aitrain.launcher.data import MarkovTokens
from aitrain.strategies.model import GPT, GPTArgs, cross_entropy


def main() -> None:
    p = argparse.ArgumentParser()
    for name, default in [("vocab-size", 256), ("seq-len", 256), ("n-layer", 6), ("n-head", 8), ("d-model", 256),
                          ("mlp-ratio", 4), ("batch", 8), ("steps", 20), ("warmup-steps", 10), ("seed", 0)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(a.seed)
    model = DistributedDataParallel(GPT(GPTArgs(a.vocab_size, a.seq_len, a.n_layer, a.n_head, a.d_model,
                                                a.mlp_ratio, 0.0)))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    data = MarkovTokens(a.vocab_size, a.seq_len, 4, a.seed)
    out = open(a.out, "w") if rank == 0 else None
    for step in range(a.steps):
        t0 = time.perf_counter()
        progress = min((step - a.warmup_steps) / max(a.steps - a.warmup_steps, 1), 1.0)
        lr = a.lr * (step + 1) / a.warmup_steps if step < a.warmup_steps else \
            a.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = data.local_batch(step, a.batch, rank, world)
        loss = cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        dt = time.perf_counter() - t0
        if out is not None:
            out.write(json.dumps({"step": step + 1, "step_time_s": dt, "loss": value}) + "\n")
            out.flush()
    if out is not None:
        out.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
