"""Compositions: ``fsdp_tp`` (2D: FSDP2/HSDP x TP) and ``fsdp_tp_pp`` (3D: pipeline stages, each FSDP x TP)."""

from __future__ import annotations

from typing import Any

from torch import nn

from aitrain.strategies.options import StrategyOptions
from aitrain.strategies.plan import ParallelPlan
from aitrain.strategies.registry import register
from aitrain.strategies.rules import check_degrees


def _check_fsdp_tp(plan: ParallelPlan, options: StrategyOptions) -> None:
    check_degrees("fsdp_tp", plan)


@register("fsdp_tp", check=_check_fsdp_tp, summary="2D: FSDP2 (or HSDP) over data parallel x tensor parallel")
def apply_fsdp_tp(model: nn.Module, *, plan: ParallelPlan, mesh: Any, options: StrategyOptions) -> nn.Module:
    from aitrain.strategies.compose import parallelize

    _check_fsdp_tp(plan, options)
    return parallelize(model, plan=plan, mesh=mesh, options=options, strategy="fsdp_tp", data_parallel="fsdp")


@register("fsdp_tp_pp", summary="3D: pipeline stages, each FSDP2 (or HSDP) x tensor parallel")
def apply_fsdp_tp_pp(model: nn.Module, *, plan: ParallelPlan, mesh: Any, options: StrategyOptions) -> nn.Module:
    from aitrain.strategies.compose import parallelize

    return parallelize(model, plan=plan, mesh=mesh, options=options, strategy="fsdp_tp_pp", data_parallel="fsdp")
