"""aitrain: distributed PyTorch training launcher and fabric tuner.

The code lives in three subpackages: ``aitrain.launcher`` (CLI, config, backends,
tracking), ``aitrain.fabric`` (probe, check, tune) and ``aitrain.strategies``
(DDP, FSDP2, HSDP, TP, PP over one DeviceMesh). Importing ``aitrain`` is cheap:
nothing heavy (torch, ray, mlflow) is imported until it is used.
"""

from __future__ import annotations

from aitrain.errors import (
    AitrainError,
    BackendError,
    ConfigError,
    FabricError,
    JobFailedError,
)

__version__ = "0.1.0"

__all__ = [
    "AitrainError",
    "BackendError",
    "ConfigError",
    "FabricError",
    "Job",
    "JobFailedError",
    "__version__",
    "attach",
    "submit",
]

# Imported on first use: `import aitrain` stays free of ray, torch and hydra.
_LAZY = {"submit": "aitrain.launcher.submit", "attach": "aitrain.launcher.submit",
         "Job": "aitrain.launcher.submit"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aitrain' has no attribute {name!r}")
