"""The built-in training job: what each rank runs when no ``script=`` is given.

A torchrun-compatible program: it reads RANK/WORLD_SIZE/... from the
environment and the resolved job config from ``--config`` (written by the
launcher into the run directory). Run by hand with::

    torchrun --nproc-per-node 2 -m aitrain.launcher.train --config outputs/.../job.yaml

The step is strategy-neutral: ``aitrain.strategies`` parallelises the model and
drives forward/backward (a pipeline schedule under PP, micro-steps under
gradient accumulation), the gradient norm and the loss average; this file owns
the data, the optimizer, the schedule of the learning rate, metrics and
checkpoints.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.distributed.elastic.multiprocessing.errors import record

from aitrain.launcher import progress
from aitrain.launcher.config import JobConfig, job_config_from_dict
from aitrain.launcher.data import MarkovTokens
from aitrain.launcher.metrics import MetricsWriter
from aitrain.launcher.preemption import Stopper
from aitrain.launcher.util import STORAGE_ERRNOS
from aitrain.strategies import checkpoint as ckpt
from aitrain.strategies.api import apply, clip_grad_norm_, data_parallel_rank, forward_backward, mean_loss
from aitrain.strategies.model import GPT, GPTArgs, cross_entropy
from aitrain.strategies.options import StrategyOptions
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


def model_args(cfg: JobConfig) -> GPTArgs:
    m = cfg.model
    return GPTArgs(m.vocab_size, m.seq_len, m.n_layer, m.n_head, m.d_model, m.mlp_ratio, m.dropout)


def strategy_options(cfg: JobConfig) -> StrategyOptions:
    return StrategyOptions.from_config(cfg.strategy, cfg.pp)


def check_job(cfg: JobConfig, world_size: int) -> ParallelPlan:
    """Everything about the strategy that can be checked before training: the degrees against the
    world size and the strategy, the options, the model against the TP plan and the pipeline
    stages, the batch against dp x accumulation x micro-batches. The launcher runs the torch-free
    part (``strategies.rules.preflight``) before any process starts; ranks add the module walk."""
    from aitrain.strategies.compose import check_model
    from aitrain.strategies.rules import preflight

    plan = ParallelPlan.resolve(world_size=world_size, **vars(cfg.parallel))
    options = strategy_options(cfg)
    builtin = cfg.script is None and cfg.module is None
    preflight(cfg.strategy.name, plan, options, model=cfg.model if builtin else None,
              train=cfg.train if builtin else None)
    if builtin:
        with torch.device("meta"):
            model = GPT(model_args(cfg))
        check_model(model, plan, options, seq_len=cfg.model.seq_len)
    return plan


def checkpoint_root(cfg: JobConfig) -> Path:
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir).expanduser()
    run_dir = os.environ.get("AITRAIN_RUN_DIR") or cfg.run_dir or "."
    return Path(run_dir) / "checkpoints"


def resume(cfg: JobConfig, root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Load the checkpoint ``cfg.resume`` names into model and optimizer; the steps already taken.

    One path for every way a run comes back: ``resume=auto`` typed by a user, a Slurm requeue
    and a Ray restart (both run the job with ``resume=auto``). The checkpoint is verified
    first, every rank checksumming a share of its files; a damaged one is named on the console
    and the newest intact one before it is used."""
    rank = int(os.environ.get("RANK", "0"))
    point = ckpt.resume_point(cfg.resume, root, collective=dist.is_initialized())
    if rank == 0:
        for line in damaged_lines(point, root):
            print(line, flush=True)
    if point.path is None:
        if cfg.resume == "auto" and not point.skipped and rank == 0:
            print(f"aitrain: resume=auto found no complete checkpoint under {root}; starting fresh", flush=True)
        return 0
    info = ckpt.load(point.path, model, opt)
    start = int(info["step"])
    if rank == 0:
        print(f"aitrain: resumed from {point.path} (step {start}, saved by {info.get('strategy', '?')} on "
              f"{info.get('world_size', '?')} rank(s))", flush=True)
        if start >= cfg.train.steps:
            print(f"aitrain: the checkpoint is at step {start}, train.steps={cfg.train.steps}: nothing left to train",
                  flush=True)
    return start


def damaged_lines(point: ckpt.ResumePoint, root: Path) -> list[str]:
    """One console line per damaged checkpoint passed over, saying what comes next."""
    lines = []
    for i, (path, why) in enumerate(point.skipped):
        if i + 1 < len(point.skipped):
            then = f"trying {point.skipped[i + 1][0].name}"
        elif point.path is not None:
            then = f"resuming from {point.path.name}"
        else:
            then = f"no intact checkpoint left under {root}; starting fresh"
        lines.append(f"aitrain: checkpoint {path.name} is damaged ({why}); {then}")
    return lines


def train(cfg: JobConfig) -> float:
    """Run the training loop; returns the last step's loss."""
    progress.mark("startup")  # phase timings and the hang watchdog: launcher/progress.py
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 or "MASTER_ADDR" in os.environ:
        # The tuned timeout (fabric.collective_timeout_s): NCCL_IB_TIMEOUT/RETRY_CNT are fitted inside it.
        timeout = float(os.environ.get("AITRAIN_COLLECTIVE_TIMEOUT_S", "600"))
        dist.init_process_group(resolve_dist_backend(cfg.dist_backend, device),
                                timeout=datetime.timedelta(seconds=timeout))
        progress.mark("pg_init")

    plan = check_job(cfg, world)
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    model: torch.nn.Module = GPT(model_args(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    progress.note(n_params=n_params, device=device.type)  # for the tracker's MFU estimate
    model.to(device)
    if dist.is_initialized():
        model = apply(model, plan, strategy=cfg.strategy.name, options=strategy_options(cfg))

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    data = MarkovTokens(m.vocab_size, m.seq_len, cfg.data.branching, cfg.train.seed)
    dp_rank, dp_size = data_parallel_rank(model)
    metrics = MetricsWriter() if rank == 0 else MetricsWriter(path=None)
    tokens_per_step = cfg.train.global_batch_size * m.seq_len
    root = checkpoint_root(cfg)
    start = resume(cfg, root, model, opt)
    if rank == 0:
        print(
            f"aitrain: training {cfg.strategy.name} on {world} rank(s) ({plan.describe()}), device {device.type}, "
            f"{n_params} params, {_local_numel(model)} on this rank, "
            f"loss starts near {data.initial_loss:.2f}, floor {data.entropy:.2f}",
            flush=True,
        )
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    every = cfg.checkpoint.every_n_steps
    # The scheduler's warning (Slurm), and SIGTERM / Ctrl-C when the job checkpoints: save, then stop.
    stopper = Stopper.from_env(terminate=every > 0, save_timeout_s=cfg.checkpoint.save_timeout_s)
    loss_value = float("nan")
    try:
        for step in range(start, cfg.train.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            inputs, targets = data.local_batch(step, cfg.train.global_batch_size, dp_rank, dp_size)
            inputs, targets = inputs.to(device), targets.to(device)
            loss = forward_backward(model, inputs, targets, cross_entropy, grad_accum=cfg.train.grad_accum)
            grad_norm = clip_grad_norm_(model, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_value = mean_loss(model, loss) if dist.is_initialized() else float(loss)  # type: ignore[arg-type]
            dt = time.perf_counter() - t0
            progress.step(step + 1)
            if rank == 0:
                metrics.log(step + 1, loss=loss_value, tokens_per_s=tokens_per_step / dt, step_time_s=dt,
                            lr=lr, grad_norm=float(grad_norm))
                if step == start or (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                    print(f"step {step + 1}/{cfg.train.steps} loss {loss_value:.4f} "
                          f"tokens/s {tokens_per_step / dt:,.0f}", flush=True)
            saved = bool(every and ((step + 1) % every == 0 or step + 1 == cfg.train.steps))
            if saved:
                _save(root, step + 1, model, opt, cfg, plan)
            stop = stopper.should_stop()  # every rank agrees at this step boundary
            if stop is not None:
                if rank == 0 and not stop.preempted:
                    print(f"aitrain: {stop.signal} at step {step + 1}: "
                          + ("checkpoint already saved" if saved else
                             f"saving a checkpoint before stopping (at most checkpoint.save_timeout_s="
                             f"{cfg.checkpoint.save_timeout_s:g}s; Ctrl-C again to stop at once)"), flush=True)
                if not saved:
                    _save(root, step + 1, model, opt, cfg, plan)
                stopper.saved()
                if rank == 0:
                    if stop.preempted:
                        Stopper.mark(os.environ.get("AITRAIN_RUN_DIR") or cfg.run_dir or ".", step + 1)
                    why = "the scheduler's signal" if stop.preempted else stop.signal
                    print(f"aitrain: stopping at step {step + 1} on {why}; checkpoint saved", flush=True)
                break
    except Exception:
        stopper.end_as_signalled()  # stopping, and a peer is gone: end as the signal would have, not as a failure
        raise
    finally:
        stopper.close()
    metrics.close()
    progress.done()
    if dist.is_initialized():
        # A barrier first: under torch 2.13, gloo aborts ("terminate called without an
        # active exception") in about half the runs when ranks destroy the group while
        # a peer is still finishing its last collective.
        dist.barrier()
        dist.destroy_process_group()
    return loss_value


def _local_numel(model: Any) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def _save(root: Path, step: int, model: Any, opt: Any, cfg: JobConfig, plan: ParallelPlan) -> None:
    t0 = time.perf_counter()
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        path = ckpt.save(root, step, model, opt, keep=cfg.checkpoint.keep,
                         info={"strategy": cfg.strategy.name, "plan": vars(plan)})
    except (OSError, CheckpointException) as e:
        # torch's writer names no file, and wraps a rank's OSError in a CheckpointException (a
        # BaseException): the rank's last line says which checkpoint and the errno.
        cause = e if isinstance(e, OSError) else next(
            (x for x, _ in e.failures.values() if isinstance(x, OSError)), None)
        if cause is None or cause.errno is None:
            raise
        name = errno.errorcode.get(cause.errno, str(cause.errno))
        raise OSError(cause.errno, f"{os.strerror(cause.errno)} ({name}) saving checkpoint step {step} "
                                   f"under {root}") from e
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"aitrain: checkpoint step {step} saved to {path} in {time.perf_counter() - t0:.2f}s", flush=True)


@record
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aitrain.launcher.train")
    parser.add_argument("--config", required=True, help="resolved job config (YAML) written by aitrain")
    args = parser.parse_args(argv)
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by an elastic agent (aitrain or torchrun)
        from aitrain.launcher.supervise import die_with_parent

        die_with_parent()  # no rank outlives its agent, even one that was SIGKILLed
    if not Path(args.config).is_file():
        print(f"aitrain.train: config file not found: {args.config}", file=sys.stderr)
        return 2
    try:
        train(load_job(args.config))
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        # A full or failing disk: @record's error file (on the same disk) would be written
        # half, and the agent would read it as none (launcher/agent.py). The traceback goes
        # to this rank's log; its last line (the errno and the path) is what the launch reports.
        traceback.print_exc()
        raise SystemExit(1) from None
    return 0


def _leave(code: int) -> None:
    """Exit a rank of a distributed launch without the interpreter's shutdown.

    With torch 2.13 and gloo, a rank that finished (barrier, group destroyed, everything
    written) still aborts now and then while the interpreter shuts down ("terminate called
    without an active exception", no Python frame left), turning a finished job into a
    failed one. Nothing of ours needs the shutdown: outputs are closed, logs flushed here.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = int(main() or 0)
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        _leave(code)
    sys.exit(code)
