"""Strategy options: everything besides the degrees that changes how a model is parallelised.

Plain data, no torch import. :meth:`StrategyOptions.from_config` reads any object
with matching attribute names (the launcher's ``strategy`` and ``pp`` config
nodes, a dict, a ``SimpleNamespace``), so user scripts need not import the
launcher to build one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aitrain.errors import ConfigError

MIXED_PRECISION = ("none", "bf16")
ACTIVATION_CHECKPOINTING = ("none", "selective", "full")
# torch.distributed.pipelining schedules we build stages for; the value is how
# stages map onto ranks ("single": one stage per rank, "loop": stage i on rank
# i % pp, "v": rank r holds stages r and 2*pp-1-r).
PP_SCHEDULES: dict[str, str] = {
    "GPipe": "single",
    "1F1B": "single",
    "Interleaved1F1B": "loop",
    "LoopedBFS": "loop",
    "InterleavedZeroBubble": "loop",
    "ZBVZeroBubble": "v",
}


@dataclass(frozen=True)
class StrategyOptions:
    """How a strategy applies itself, besides the parallel degrees."""

    mixed_precision: str = "none"  # none | bf16 (bf16 compute, fp32 params and gradient reduction)
    activation_checkpointing: str = "none"  # none | selective (save matmul/attention outputs) | full
    compile: bool = False  # torch.compile each transformer block
    sequence_parallel: bool = False  # TP: shard norms and the residual stream along the sequence
    pp_schedule: str = "1F1B"  # a key of PP_SCHEDULES
    pp_microbatches: int = 4  # micro-batches per pipeline step
    pp_stages_per_rank: int = 0  # model chunks per pipeline rank (0: 1 for single-stage schedules, else 2)
    # TP plan for models not laid out like the built-in GPT: {module FQN: ParallelStyle},
    # handed to torch's parallelize_module as it is. Not settable from YAML.
    tp_plan: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"strategy.mixed_precision={self.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}",
                "bf16 computes in bfloat16 with fp32 master weights and fp32 gradient reduction",
            )
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(
                f"strategy.activation_checkpointing={self.activation_checkpointing!r} is not one of "
                f"{', '.join(ACTIVATION_CHECKPOINTING)}",
                "selective recomputes cheap ops only; full recomputes each transformer block",
            )
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(
                f"pp.schedule={self.pp_schedule!r} is not a known pipeline schedule. "
                f"Known schedules: {', '.join(PP_SCHEDULES)}.",
                "GPipe and 1F1B run one stage per rank; Interleaved1F1B runs pp.stages_per_rank stages per rank",
            )
        if self.pp_microbatches < 1:
            raise ConfigError(f"pp.microbatches={self.pp_microbatches} must be at least 1",
                              "use at least as many micro-batches as pipeline stages to keep the pipeline busy")
        if self.pp_stages_per_rank < 0:
            raise ConfigError(f"pp.stages_per_rank={self.pp_stages_per_rank} must be 0 (automatic) or more",
                              "0 picks 1 for GPipe/1F1B and 2 for the interleaved schedules")
        style = PP_SCHEDULES[self.pp_schedule]
        if style == "single" and self.pp_stages_per_rank > 1:
            raise ConfigError(
                f"pp.schedule={self.pp_schedule} runs one stage per rank, but pp.stages_per_rank="
                f"{self.pp_stages_per_rank}",
                "use pp.schedule=Interleaved1F1B for several stages per rank, or pp.stages_per_rank=1",
            )
        if style == "v" and self.pp_stages_per_rank not in (0, 2):
            raise ConfigError(f"pp.schedule={self.pp_schedule} needs exactly 2 stages per rank, "
                              f"not pp.stages_per_rank={self.pp_stages_per_rank}", "set pp.stages_per_rank=2 or 0")

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each pipeline rank holds (resolving 0 = automatic)."""
        if self.pp_stages_per_rank:
            return self.pp_stages_per_rank
        return 1 if PP_SCHEDULES[self.pp_schedule] == "single" else 2

    @property
    def pp_stage_style(self) -> str:
        return PP_SCHEDULES[self.pp_schedule]

    @classmethod
    def from_config(cls, strategy: Any = None, pp: Any = None, **overrides: Any) -> StrategyOptions:
        """Build from config-like objects: ``strategy`` (mixed_precision, activation_checkpointing,
        compile, sequence_parallel) and ``pp`` (schedule, microbatches, stages_per_rank)."""
        values: dict[str, Any] = {}
        for name in ("mixed_precision", "activation_checkpointing", "compile", "sequence_parallel"):
            v = _get(strategy, name)
            if v is not None:
                values[name] = v
        for key, name in (("schedule", "pp_schedule"), ("microbatches", "pp_microbatches"),
                          ("stages_per_rank", "pp_stages_per_rank")):
            v = _get(pp, key)
            if v is not None:
                values[name] = v
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown strategy option(s) {', '.join(unknown)}",
                              f"known options: {', '.join(sorted(known))}")
        return cls(**values)


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)
