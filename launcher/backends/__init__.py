"""Backends behind one protocol: ``dryrun(spec)`` builds the request, ``run`` starts it.

Registries import lazily: ``import ray`` happens only when the Ray backend is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from aitrain.errors import ConfigError

_BACKENDS = {
    "local": ("aitrain.launcher.backends.local", "LocalBackend"),
    "slurm": ("aitrain.launcher.backends.slurm", "SlurmBackend"),
    "ray": ("aitrain.launcher.backends.ray", "RayBackend"),
}


def names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(cfg: Any) -> Any:
    """Instantiate the backend named by ``cfg.name`` with the rest of ``cfg`` as options."""
    name = getattr(cfg, "name", None)
    if name not in _BACKENDS:
        raise ConfigError(f"unknown backend '{name}'. Known backends: {', '.join(names())}.",
                          "choose one with backend=<name>")
    module, cls = _BACKENDS[name]
    backend_cls = getattr(importlib.import_module(module), cls)
    options = {k: v for k, v in vars(cfg).items() if k != "name"}
    return backend_cls(**options)
