"""The public entry point user scripts call: ``aitrain.strategies.apply``."""

from __future__ import annotations

from typing import Any

from torch import nn

from aitrain.strategies.plan import ParallelPlan
from aitrain.strategies.registry import get


def apply(model: nn.Module, plan: ParallelPlan, *, strategy: str = "ddp", mesh: Any = None,
          cfg: Any = None) -> nn.Module:
    """Parallelise ``model`` with the named strategy over ``plan``'s mesh."""
    return get(strategy)(model, plan=plan, mesh=mesh, cfg=cfg)
