"""The backend-neutral job spec: what to run, on how many ranks, with which env."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aitrain.launcher.config import JobConfig
from aitrain.launcher.resources import ResourceRequest


@dataclass
class JobSpec:
    """Everything a backend needs to plan and start a job; no backend specifics."""

    name: str
    run_dir: Path
    argv: list[str]  # the program every rank runs (argv[0] is the executable)
    nnodes: int
    nproc_per_node: int
    # The built-in job arms its own parent-death signal; a user script needs the
    # trampoline (launcher/supervise.py) for that, at the cost of one exec per rank.
    needs_trampoline: bool = True
    env: dict[str, str] = field(default_factory=dict)  # extra env for every rank
    env_reasons: dict[str, str] = field(default_factory=dict)  # why each env value was set
    config: JobConfig | None = None
    resources: ResourceRequest = field(default_factory=ResourceRequest)  # binding, cgroup, profiler
    overrides: list[str] = field(default_factory=list)  # the user's Hydra overrides (for re-launch in a batch job)
    findings: list[Any] = field(default_factory=list)  # preflight findings (fabric and host)
    topology: dict[str, Any] = field(default_factory=dict)  # this host's probed topology (local jobs)
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags from the backend (e.g. slurm.restart_count)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def needs_trampoline(cfg: JobConfig) -> bool:
    # The trampoline also applies per-rank binding, the cgroup and the profiler.
    return bool(cfg.script) or cfg.binding != "none" or cfg.resources.cgroup or cfg.profile != "none"


def rank_program(cfg: JobConfig, config_file: Path) -> list[str]:
    """argv each rank runs: the user's script, or the built-in training job."""
    if cfg.script:
        return [sys.executable, "-u", cfg.script, *cfg.script_args]
    return [sys.executable, "-u", "-m", "aitrain.launcher.train", "--config", str(config_file)]
