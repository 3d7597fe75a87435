"""The public API user scripts call (and the built-in job uses).

    from aitrain import strategies

    model = strategies.apply(model)               # the strategy `aitrain launch` was asked for
    opt = torch.optim.AdamW(model.parameters())
    x, y = my_batch(*strategies.data_parallel_rank(model))
    loss = strategies.forward_backward(model, x, y, loss_fn, grad_accum=2)
    strategies.clip_grad_norm_(model, 1.0)
    opt.step(); opt.zero_grad()
    print(strategies.mean_loss(model, loss))
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from aitrain.errors import ConfigError
from aitrain.strategies.context import ParallelContext, context_of
from aitrain.strategies.options import StrategyOptions
from aitrain.strategies.plan import ParallelPlan
from aitrain.strategies.registry import check, lookup

# Degrees a strategy gets when nothing says otherwise (the configs/strategy/*.yaml defaults).
DEFAULT_DEGREES: dict[str, dict[str, int]] = {
    "ddp": dict(dp_replicate=-1, dp_shard=1, tp=1, pp=1),
    "fsdp": dict(dp_replicate=1, dp_shard=-1, tp=1, pp=1),
    "hsdp": dict(dp_replicate=2, dp_shard=-1, tp=1, pp=1),
    "tp": dict(dp_replicate=1, dp_shard=1, tp=-1, pp=1),
    "pp": dict(dp_replicate=1, dp_shard=1, tp=1, pp=-1),
    "fsdp_tp": dict(dp_replicate=1, dp_shard=-1, tp=2, pp=1),
    "fsdp_tp_pp": dict(dp_replicate=1, dp_shard=-1, tp=2, pp=2),
}


@dataclass(frozen=True)
class LaunchSettings:
    """What ``aitrain launch`` was asked for: strategy name, resolved degrees, options."""

    strategy: str
    plan: ParallelPlan
    options: StrategyOptions


def launch_settings(world_size: int | None = None) -> LaunchSettings:
    """Read the job's strategy from the launcher (``$AITRAIN_RUN_DIR/job.yaml``, ``$AITRAIN_STRATEGY``).

    Outside ``aitrain launch`` (plain torchrun) this is DDP over every rank.
    """
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    job: dict[str, Any] = {}
    run_dir = os.environ.get("AITRAIN_RUN_DIR")
    if run_dir and (Path(run_dir) / "job.yaml").is_file():
        import yaml

        job = yaml.safe_load((Path(run_dir) / "job.yaml").read_text()) or {}
    strategy = (job.get("strategy") or {}).get("name") or os.environ.get("AITRAIN_STRATEGY") or "ddp"
    degrees = dict(DEFAULT_DEGREES.get(strategy, DEFAULT_DEGREES["ddp"]))
    degrees.update(job.get("parallel") or {})
    plan = ParallelPlan.resolve(world_size=world_size, **degrees)
    options = StrategyOptions.from_config(job.get("strategy"), job.get("pp"))
    return LaunchSettings(strategy, plan, options)


def apply(model: nn.Module, plan: ParallelPlan | None = None, *, strategy: str | None = None,
          mesh: Any = None, options: StrategyOptions | None = None, cfg: Any = None) -> nn.Module:
    """Parallelise ``model`` with a registered strategy over one DeviceMesh.

    With no arguments, uses what ``aitrain launch`` was asked for (see :func:`launch_settings`).
    ``plan``: the degrees (default: the strategy's defaults over the world size); ``mesh``: a
    DeviceMesh with dims (pp, dp_replicate, dp_shard, tp), built when None; ``options``:
    :class:`StrategyOptions` (``cfg`` is read into one when given instead). Needs an initialised
    process group. Returns the module to train: call it as usual, or — always for pipeline
    parallelism — drive steps with :func:`forward_backward`.
    """
    if plan is None and strategy is None and options is None and cfg is None:
        s = launch_settings()
        plan, strategy, options = s.plan, s.strategy, s.options
    strategy = strategy or "ddp"
    spec = lookup(strategy)  # unknown names list the known ones
    if options is None:
        options = StrategyOptions.from_config(cfg, getattr(cfg, "pp", None)) if cfg is not None \
            else StrategyOptions()
    if plan is None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        plan = ParallelPlan.resolve(world_size=world, **DEFAULT_DEGREES.get(strategy, DEFAULT_DEGREES["ddp"]))
    check(strategy, plan, options)
    return spec.fn(model, plan=plan, mesh=mesh, options=options)


def data_parallel_rank(model: nn.Module) -> tuple[int, int]:
    """(index of this rank's slice of the global batch, number of slices). Ranks that differ
    only in tensor/pipeline coordinates get the same slice."""
    ctx = context_of(model)
    if ctx is None:
        if dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    coord = ctx.mesh.get_coordinate()  # (pp, dp_replicate, dp_shard, tp)
    return coord[1] * ctx.plan.dp_shard + coord[2], ctx.plan.dp


@contextlib.contextmanager
def _grad_sync(model: nn.Module, ctx: ParallelContext | None, sync: bool) -> Iterator[None]:
    if sync or ctx is None:
        yield
    elif ctx.data_parallel == "ddp":
        with model.no_sync():  # type: ignore[operator]
            yield
    elif ctx.data_parallel == "fsdp":
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    else:
        yield


def _autocast(ctx: ParallelContext | None) -> Any:
    if ctx is None or ctx.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=ctx.autocast_dtype)


def forward_backward(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                     grad_accum: int = 1) -> torch.Tensor | None:
    """Forward and backward over this rank's batch, in ``grad_accum`` sequential micro-steps.

    Gradients end up as those of the batch's mean loss (synchronised once, on the last
    micro-step). Under pipeline parallelism the batch runs through the schedule
    (``pp.microbatches`` per micro-step). Returns the batch's mean loss (detached), or None on
    pipeline ranks that do not hold the last stage. ``loss_fn(output, target)`` must average.
    """
    from aitrain.strategies.pp import PipelineModule

    ctx = context_of(model)
    n = inputs.shape[0]
    if grad_accum < 1 or n % grad_accum:
        raise ConfigError(f"this rank's batch of {n} sequences does not split into train.grad_accum={grad_accum} "
                          "equal micro-steps", "make the per-rank batch (global batch / data-parallel size) a "
                          "multiple of train.grad_accum")
    xs, ys = inputs.tensor_split(grad_accum), targets.tensor_split(grad_accum)
    if isinstance(model, PipelineModule):
        micro = ctx.options.pp_microbatches if ctx is not None else model.schedule._n_microbatches
        if (n // grad_accum) % micro:
            raise ConfigError(f"this rank's micro-step batch of {n // grad_accum} sequences does not split into "
                              f"pp.microbatches={micro} equal micro-batches",
                              "make global batch / (data-parallel size x train.grad_accum) a multiple of "
                              "pp.microbatches")
        total: torch.Tensor | None = None
        for x, y in zip(xs, ys, strict=True):
            with _autocast(ctx):
                loss = model.step(x, y, loss_fn, scale=1.0 / (grad_accum * micro))
            if loss is not None:
                total = loss if total is None else total + loss
        return total
    acc = torch.zeros((), device=inputs.device)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        with _grad_sync(model, ctx, sync=i == grad_accum - 1):
            with _autocast(ctx):
                out = model(x)
            loss = loss_fn(out, y) / grad_accum
            loss.backward()
        acc += loss.detach().float()
    return acc


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip gradients by their global L2 norm over every rank's parameters (sharded or replicated,
    every pipeline stage); returns that norm. ``max_norm`` <= 0 or inf only measures it."""
    from torch.distributed.tensor import DTensor

    ctx = context_of(model)
    param_grads = [g for g in (p.grad for p in model.parameters()) if g is not None]
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in param_grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else ("local", g.device)
        groups.setdefault(key, []).append(g)
    device = ctx.device if ctx is not None else (param_grads[0].device if param_grads else torch.device("cpu"))
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        sq = sq + norm.float().to(device) ** 2
    if ctx is not None and ctx.plan.pp > 1:
        dist.all_reduce(sq, group=ctx.mesh["pp"].get_group())
    total = sq.sqrt()
    if param_grads and max_norm > 0 and math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grads in groups.values():  # foreach ops can't mix DTensors (of different meshes) and tensors
            torch._foreach_mul_(grads, coef)
    return total


def mean_loss(model: nn.Module, loss: torch.Tensor | None) -> float:
    """The job's loss: ``loss`` (from :func:`forward_backward`) averaged over data-parallel ranks,
    taken from the last pipeline stage. Collective: every rank must call it."""
    ctx = context_of(model)
    if ctx is None or not dist.is_initialized():
        return float(loss) if loss is not None else float("nan")
    t = loss.detach().float().reshape(()) if loss is not None else torch.zeros((), device=ctx.device)
    t = t.to(ctx.device).clone()
    dist.all_reduce(t)  # sum over the world; gloo has no AVG
    # Every (dp, tp) rank of the last stage holds its dp slice's loss; other stages add 0.
    return float(t) / (ctx.plan.world_size // ctx.plan.pp)


def model_parts(model: nn.Module) -> list[nn.Module]:
    """The stage modules this rank runs (one without pipeline parallelism)."""
    from aitrain.strategies.pp import PipelineModule

    return list(model.stage_modules) if isinstance(model, PipelineModule) else [model]
