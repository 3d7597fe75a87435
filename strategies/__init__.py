"""Parallel strategies over one DeviceMesh: DDP, FSDP2, HSDP, TP, PP.

Works inside any torchrun-compatible script; imports nothing from
``aitrain.launcher`` or ``aitrain.fabric``. Attributes load lazily so that
``aitrain.strategies.plan`` can be used without importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ParallelPlan", "apply", "names", "register"]


def __getattr__(name: str) -> Any:
    if name == "ParallelPlan":
        from aitrain.strategies.plan import ParallelPlan

        return ParallelPlan
    if name in ("apply",):
        from aitrain.strategies import api

        return getattr(api, name)
    if name in ("names", "register"):
        from aitrain.strategies import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'aitrain.strategies' has no attribute {name!r}")
