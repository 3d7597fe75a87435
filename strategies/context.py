"""What a strategy leaves on the module it returns, for the helpers that drive a step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aitrain.strategies.options import StrategyOptions
from aitrain.strategies.plan import ParallelPlan

_ATTR = "_aitrain_parallel"


@dataclass
class ParallelContext:
    strategy: str  # registered name
    plan: ParallelPlan
    mesh: Any  # DeviceMesh
    options: StrategyOptions
    data_parallel: str  # "ddp" | "fsdp" | "none": how gradients are synchronised
    autocast_dtype: torch.dtype | None  # bf16 via autocast (strategies without FSDP)
    device: torch.device


def attach(model: nn.Module, ctx: ParallelContext) -> None:
    object.__setattr__(model, _ATTR, ctx)


def context_of(model: nn.Module) -> ParallelContext | None:
    """The context ``aitrain.strategies.apply`` attached, or None for a plain module."""
    return model.__dict__.get(_ATTR)
