"""The backends, behind one protocol (:mod:`.api`): ``local``, ``slurm``, ``ray``.

Registries import lazily: ``import ray`` happens only when the Ray backend runs a job or
queries a handle; naming a backend here imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

from aitrain.errors import ConfigError
from aitrain.launcher.backends.api import Backend

_BACKENDS = {
    "local": ("aitrain.launcher.backends.local", "LocalBackend"),
    "slurm": ("aitrain.launcher.backends.slurm", "SlurmBackend"),
    "ray": ("aitrain.launcher.backends.ray", "RayBackend"),
}


def names() -> list[str]:
    return sorted(_BACKENDS)


def backend_class(name: str) -> type[Backend]:
    if name not in _BACKENDS:
        raise ConfigError(f"unknown backend '{name}'. Known backends: {', '.join(names())}.",
                          "choose one with backend=<name>")
    module, cls = _BACKENDS[name]
    found: type[Backend] = getattr(importlib.import_module(module), cls)
    return found


def get_backend(cfg: Any) -> Backend:
    """The backend named by ``cfg.name``, with the rest of ``cfg`` (a backend config) as options."""
    name = str(getattr(cfg, "name", None))
    options = {k: v for k, v in vars(cfg).items() if k != "name"}
    return backend_class(name)(**options)


def backend_for_handle(handle: str) -> Backend:
    """The backend a job handle belongs to, by its scheme (``slurm://``, ``ray://``, ``local://``);
    a bare number is a Slurm job id, ``raysubmit_...`` a Ray submission id."""
    h = handle.strip()
    scheme = h.split("://", 1)[0] if "://" in h else ""
    if scheme == "slurm" or h.isdigit():
        return backend_class("slurm")()
    if scheme == "ray" or h.startswith("raysubmit_"):
        return backend_class("ray")()
    if scheme == "local":
        return backend_class("local")()
    raise ConfigError(f"unknown job handle {handle!r}",
                      "handles look like local://<host>/<id>, slurm://<cluster>/<jobid> or "
                      "ray://<head>:8265/<submission id>, as printed by `aitrain launch`; `aitrain list` shows them")
