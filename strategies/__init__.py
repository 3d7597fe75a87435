"""Parallel strategies over one DeviceMesh: DDP, FSDP2, HSDP, TP, PP and their compositions.

Works inside any torchrun-compatible script; imports nothing from
``aitrain.launcher`` or ``aitrain.fabric``. Attributes load lazily so that
``aitrain.strategies.plan`` can be used without importing torch.

    from aitrain import strategies
    model = strategies.apply(model)   # the strategy `aitrain launch` was asked for
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ParallelPlan": "plan",
    "StrategyOptions": "options",
    "apply": "api",
    "launch_settings": "api",
    "LaunchSettings": "api",
    "forward_backward": "api",
    "clip_grad_norm_": "api",
    "mean_loss": "api",
    "data_parallel_rank": "api",
    "model_parts": "api",
    "build_mesh": "mesh",
    "names": "registry",
    "register": "registry",
    "get": "registry",
    "checkpoint": None,  # the submodule: strategies.checkpoint.save / load / latest
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aitrain.strategies' has no attribute {name!r}")
    mod = _EXPORTS[name]
    if mod is None:
        return importlib.import_module(f"aitrain.strategies.{name}")
    return getattr(importlib.import_module(f"aitrain.strategies.{mod}"), name)
