"""Strategies as registered functions ``(model, *, plan, mesh, cfg) -> model``.

Registering a name twice is an error; an unknown name lists the known ones.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from aitrain.errors import ConfigError

from torch import nn


class StrategyFn(Protocol):
    def __call__(self, model: nn.Module, *, plan: Any, mesh: Any, cfg: Any) -> nn.Module: ...


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"strategy '{name}' is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return deco


def get(name: str) -> Callable[..., nn.Module]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown strategy '{name}'. Known strategies: {', '.join(sorted(_REGISTRY))}.",
            "choose one with strategy=<name> (or +strategy=<name>)",
        ) from None


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    # Importing the modules registers them.
    from aitrain.strategies import ddp  # noqa: F401
