"""The built-in training job: what each rank runs when no ``script=`` is given.

A torchrun-compatible program: it reads RANK/WORLD_SIZE/... from the
environment and the resolved job config from ``--config`` (written by the
launcher into the run directory). Run by hand with::

    torchrun --nproc-per-node 2 -m aitrain.launcher.train --config outputs/.../job.yaml
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.elastic.multiprocessing.errors import record

from aitrain.launcher.config import JobConfig, job_config_from_dict
from aitrain.launcher.data import MarkovTokens
from aitrain.launcher.metrics import MetricsWriter
from aitrain.strategies.model import GPT, GPTArgs, cross_entropy
from aitrain.strategies.plan import ParallelPlan


def resolve_device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def resolve_dist_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def lr_at(step: int, cfg: JobConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(t.steps - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / span, 1.0)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def load_job(path: str) -> JobConfig:
    with open(path) as f:
        return job_config_from_dict(yaml.safe_load(f))


def train(cfg: JobConfig) -> float:
    """Run the training loop; returns the last step's loss."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 or "MASTER_ADDR" in os.environ:
        dist.init_process_group(resolve_dist_backend(cfg.dist_backend, device))

    plan = ParallelPlan.resolve(world_size=world, **vars(cfg.parallel))
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    model = GPT(GPTArgs(m.vocab_size, m.seq_len, m.n_layer, m.n_head, m.d_model, m.mlp_ratio, m.dropout))
    model.to(device)
    if dist.is_initialized():
        from aitrain.strategies import apply

        model = apply(model, plan, strategy=cfg.strategy.name, cfg=cfg.strategy)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    data = MarkovTokens(m.vocab_size, m.seq_len, cfg.data.branching, cfg.train.seed)
    dp_rank, dp_size = rank % plan.dp, plan.dp
    metrics = MetricsWriter() if rank == 0 else MetricsWriter(path=None)
    tokens_per_step = cfg.train.global_batch_size * m.seq_len
    if rank == 0:
        print(
            f"aitrain: training {cfg.strategy.name} on {world} rank(s), device {device.type}, "
            f"{sum(p.numel() for p in model.parameters())} params per rank, "
            f"loss starts near {data.initial_loss:.2f}, floor {data.entropy:.2f}",
            flush=True,
        )
    loss_value = float("nan")
    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        inputs, targets = data.local_batch(step, cfg.train.global_batch_size, dp_rank, dp_size)
        inputs, targets = inputs.to(device), targets.to(device)
        loss = cross_entropy(model(inputs), targets)
        loss.backward()
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_t = loss.detach()
        if dist.is_initialized():
            dist.all_reduce(loss_t)  # gloo has no AVG
            loss_t /= world
        loss_value = float(loss_t)
        dt = time.perf_counter() - t0
        if rank == 0:
            metrics.log(step + 1, loss=loss_value, tokens_per_s=tokens_per_step / dt, step_time_s=dt,
                        lr=lr_at(step, cfg), grad_norm=float(grad_norm))
            if step == 0 or (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                print(f"step {step + 1}/{cfg.train.steps} loss {loss_value:.4f} "
                      f"tokens/s {tokens_per_step / dt:,.0f}", flush=True)
    metrics.close()
    if dist.is_initialized():
        # A barrier first: under torch 2.13, gloo aborts ("terminate called without an
        # active exception") in about half the runs when ranks destroy the group while
        # a peer is still finishing its last collective.
        dist.barrier()
        dist.destroy_process_group()
    return loss_value


@record
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aitrain.launcher.train")
    parser.add_argument("--config", required=True, help="resolved job config (YAML) written by aitrain")
    args = parser.parse_args(argv)
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by an elastic agent (aitrain or torchrun)
        from aitrain.launcher.supervise import die_with_parent

        die_with_parent()
    if not Path(args.config).is_file():
        print(f"aitrain.train: config file not found: {args.config}", file=sys.stderr)
        return 2
    train(load_job(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
