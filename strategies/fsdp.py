"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the data-parallel ranks.

``fsdp`` shards over all of them (a 1D mesh); ``hsdp`` shards within groups of
``dp_shard`` ranks and replicates across ``dp_replicate`` groups (a 2D mesh:
reduce-scatter inside a group, all-reduce across groups).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from aitrain.strategies.options import StrategyOptions
from aitrain.strategies.plan import ParallelPlan
from aitrain.strategies.registry import register
from aitrain.strategies.rules import check_degrees


def _check_fsdp(plan: ParallelPlan, options: StrategyOptions) -> None:
    check_degrees("fsdp", plan)


def _check_hsdp(plan: ParallelPlan, options: StrategyOptions) -> None:
    check_degrees("hsdp", plan)


@register("fsdp", check=_check_fsdp, summary="FSDP2: shard parameters, gradients and optimizer state")
def apply_fsdp(model: nn.Module, *, plan: ParallelPlan, mesh: Any, options: StrategyOptions) -> nn.Module:
    from aitrain.strategies.compose import parallelize

    _check_fsdp(plan, options)
    return parallelize(model, plan=plan, mesh=mesh, options=options, strategy="fsdp", data_parallel="fsdp")


@register("hsdp", check=_check_hsdp, summary="HSDP: FSDP2 within dp_shard groups, replicated across dp_replicate")
def apply_hsdp(model: nn.Module, *, plan: ParallelPlan, mesh: Any, options: StrategyOptions) -> nn.Module:
    from aitrain.strategies.compose import parallelize

    _check_hsdp(plan, options)
    return parallelize(model, plan=plan, mesh=mesh, options=options, strategy="hsdp", data_parallel="fsdp")
