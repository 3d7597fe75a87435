"""DDP: the whole model replicated on every rank, gradients all-reduced (``DistributedDataParallel``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from aitrain.strategies.options import StrategyOptions
from aitrain.strategies.plan import ParallelPlan
from aitrain.strategies.registry import register
from aitrain.strategies.rules import check_degrees


def _check_ddp(plan: ParallelPlan, options: StrategyOptions) -> None:
    check_degrees("ddp", plan)


@register("ddp", check=_check_ddp, summary="replicate the model, all-reduce gradients (DistributedDataParallel)")
def apply_ddp(model: nn.Module, *, plan: ParallelPlan, mesh: Any, options: StrategyOptions) -> nn.Module:
    from aitrain.strategies.compose import parallelize

    _check_ddp(plan, options)
    return parallelize(model, plan=plan, mesh=mesh, options=options, strategy="ddp", data_parallel="ddp")
