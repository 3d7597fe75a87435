"""Strategies as registered functions ``(model, *, plan, mesh, options) -> model``.

Each strategy also registers a ``check(plan, options)`` that rejects degrees it
cannot run (``ddp`` with ``tp=2``) before any process starts. Registering a
name twice is an error; an unknown name lists the known ones. The built-in
strategies register when first looked up (importing them imports torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aitrain.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from aitrain.strategies.options import StrategyOptions
    from aitrain.strategies.plan import ParallelPlan


class StrategyFn(Protocol):
    def __call__(self, model: nn.Module, *, plan: ParallelPlan, mesh: Any,
                 options: StrategyOptions) -> nn.Module: ...


CheckFn = Callable[["ParallelPlan", "StrategyOptions"], None]


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: StrategyFn
    check: CheckFn | None
    summary: str


_REGISTRY: dict[str, Strategy] = {}


def register(name: str, *, check: CheckFn | None = None,
             summary: str = "") -> Callable[[StrategyFn], StrategyFn]:
    """Decorator: register ``fn`` as strategy ``name`` (an error if the name is taken)."""

    def deco(fn: StrategyFn) -> StrategyFn:
        if name in _REGISTRY:
            raise ConfigError(
                f"strategy '{name}' is already registered (by {_REGISTRY[name].fn.__module__})",
                "pick another name for the new strategy",
            )
        _REGISTRY[name] = Strategy(name, fn, check, summary or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def lookup(name: str) -> Strategy:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown strategy '{name}'. Known strategies: {', '.join(sorted(_REGISTRY))}.",
            "choose one with strategy=<name> (or +strategy=<name>)",
        ) from None


def get(name: str) -> StrategyFn:
    """The registered function for ``name``; an unknown name lists the known ones."""
    return lookup(name).fn


def check(name: str, plan: ParallelPlan, options: StrategyOptions) -> None:
    """Raise ConfigError if strategy ``name`` cannot run with these degrees/options."""
    s = lookup(name)
    if s.check is not None:
        s.check(plan, options)


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


_BUILTIN = ("ddp", "fsdp", "tp", "pp", "composed")
_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for mod in _BUILTIN:  # importing a module registers its strategies
        importlib.import_module(f"aitrain.strategies.{mod}")
