"""The rules a job must satisfy, as plain arithmetic (no torch): the launcher runs them before any
process starts, and the strategies run them again on the real model.

* which degrees each built-in strategy accepts,
* whether the built-in GPT's heads / MLP / vocabulary / sequence split over ``tp``,
* whether there are at least as many transformer blocks as pipeline stages,
* whether the global batch splits over dp ranks x accumulation steps x pipeline micro-batches.
"""

from __future__ import annotations

from typing import Any

from aitrain.errors import ConfigError
from aitrain.strategies.options import StrategyOptions
from aitrain.strategies.plan import ParallelPlan, require_degrees

# strategy -> (degrees it needs fixed, hint)
DEGREE_RULES: dict[str, tuple[dict[str, int], str]] = {
    "ddp": (dict(dp_shard=1, tp=1, pp=1),
            "ddp replicates the whole model (set parallel.dp_replicate=-1); use fsdp or hsdp to shard it, "
            "tp / fsdp_tp / pp / fsdp_tp_pp for model parallelism"),
    "fsdp": (dict(dp_replicate=1, tp=1, pp=1),
             "fsdp shards over every rank (parallel.dp_shard=-1); use hsdp for replicate x shard, "
             "fsdp_tp / fsdp_tp_pp to add tensor / pipeline parallelism"),
    "hsdp": (dict(tp=1, pp=1),
             "hsdp is data parallelism (parallel.dp_replicate x parallel.dp_shard = world size); "
             "use fsdp_tp / fsdp_tp_pp to add tensor / pipeline parallelism"),
    "tp": (dict(dp_replicate=1, dp_shard=1, pp=1),
           "tp is tensor parallelism alone; use fsdp_tp to add data parallelism, fsdp_tp_pp to add pipeline stages"),
    "pp": (dict(tp=1),
           "pp is pipeline parallelism (optionally with data parallelism over the stages); "
           "use fsdp_tp_pp to add tensor parallelism"),
    "fsdp_tp": (dict(pp=1), "fsdp_tp is 2D (data x tensor parallel); use fsdp_tp_pp to add pipeline stages"),
    "fsdp_tp_pp": ({}, ""),
}
BUILTIN_STRATEGIES = tuple(sorted(DEGREE_RULES))

TP_LAYOUT_HINT = ("the built-in TP plan shards torchtitan-style transformers (tok_embeddings, layers.<i>.attention."
                  "wq/wk/wv/wo, layers.<i>.feed_forward.w1/w2, norm, output); for another layout pass "
                  "StrategyOptions(tp_plan={fqn: ParallelStyle}) to aitrain.strategies.apply")
TP_SIZES_HINT = "choose parallel.tp to divide model.n_head, model.mlp_ratio x model.d_model and model.vocab_size"


def check_degrees(strategy: str, plan: ParallelPlan) -> None:
    rule = DEGREE_RULES.get(strategy)
    if rule is not None:
        fixed, hint = rule
        require_degrees(strategy, plan, hint, **fixed)


def tp_error(module: str, why: str, hint: str = TP_LAYOUT_HINT) -> ConfigError:
    return ConfigError(f"tensor parallelism cannot shard module '{module}': {why}", hint)


def check_split(module: str, what: str, n: int, tp: int, hint: str = TP_SIZES_HINT) -> None:
    if n % tp:
        raise tp_error(module, f"its {n} {what} do not split evenly over tp={tp} ranks", hint)


def check_sequence_split(seq_len: int, tp: int) -> None:
    if seq_len % tp:
        raise tp_error("layers", f"sequence parallelism splits the sequence ({seq_len} tokens) over tp={tp} ranks "
                       "unevenly", "choose parallel.tp to divide model.seq_len, or strategy.sequence_parallel=false")


def check_gpt_tp(model: Any, tp: int, *, sequence_parallel: bool) -> None:
    """The built-in GPT (a ModelConfig-like object) against the TP plan."""
    if tp <= 1:
        return
    check_split("layers.0.attention", "heads", model.n_head, tp)
    check_split("layers.0.feed_forward.w1", "output features", model.mlp_ratio * model.d_model, tp)
    check_split("tok_embeddings", "vocabulary rows", model.vocab_size, tp)
    if sequence_parallel:
        check_sequence_split(model.seq_len, tp)


def check_stages(n_layer: int, pp: int, options: StrategyOptions) -> int:
    """Number of pipeline stages; a ConfigError when there are more stages than blocks."""
    stages = pp * options.stages_per_rank
    if stages > n_layer:
        how = (f"parallel.pp={pp} x pp.stages_per_rank={options.stages_per_rank}" if options.stages_per_rank > 1
               else f"parallel.pp={pp}")
        raise ConfigError(
            f"pipeline parallelism needs at least one transformer block per stage, but {stages} stages ({how}) "
            f"were asked for and the model has {n_layer} layer(s) (model.n_layer={n_layer})",
            f"use at most {n_layer} stages: lower parallel.pp or pp.stages_per_rank, or raise model.n_layer",
        )
    return stages


def check_batch(plan: ParallelPlan, options: StrategyOptions, *, global_batch_size: int, grad_accum: int) -> None:
    """The global batch must split over data-parallel ranks, accumulation steps and pipeline micro-batches."""
    if grad_accum < 1:
        raise ConfigError(f"train.grad_accum={grad_accum} must be at least 1", "1 disables gradient accumulation")
    if global_batch_size % plan.dp:
        raise ConfigError(f"train.global_batch_size={global_batch_size} does not split over the {plan.dp} "
                          f"data-parallel ranks ({plan.describe()})",
                          f"use a multiple of {plan.dp} (dp_replicate x dp_shard)")
    per_rank = global_batch_size // plan.dp
    if per_rank % grad_accum:
        raise ConfigError(f"the per-rank batch of {per_rank} sequences (train.global_batch_size={global_batch_size} "
                          f"/ {plan.dp} data-parallel ranks) does not split into train.grad_accum={grad_accum} "
                          "micro-steps", f"use a global batch that is a multiple of {plan.dp * grad_accum}")
    if plan.pp > 1 and (per_rank // grad_accum) % options.pp_microbatches:
        raise ConfigError(f"each micro-step's batch of {per_rank // grad_accum} sequences per pipeline does not split "
                          f"into pp.microbatches={options.pp_microbatches}",
                          f"use a global batch that is a multiple of {plan.dp * grad_accum * options.pp_microbatches}"
                          ", or change pp.microbatches")


def preflight(strategy: str, plan: ParallelPlan, options: StrategyOptions, *, model: Any | None = None,
              train: Any | None = None) -> None:
    """Everything checkable before a process starts (no torch import). ``model``: the built-in GPT's
    sizes (n_layer, n_head, d_model, mlp_ratio, vocab_size, seq_len); ``train``: global_batch_size,
    grad_accum. Leave them None for user scripts."""
    if strategy not in DEGREE_RULES:
        from aitrain.strategies.registry import _REGISTRY

        if strategy not in _REGISTRY:
            known = sorted(set(BUILTIN_STRATEGIES) | set(_REGISTRY))
            raise ConfigError(f"unknown strategy '{strategy}'. Known strategies: {', '.join(known)}.",
                              "choose one with strategy=<name> (or +strategy=<name>)")
    check_degrees(strategy, plan)
    if model is not None:
        if model.d_model % model.n_head:
            raise ConfigError(f"model.d_model={model.d_model} is not divisible by model.n_head={model.n_head}",
                              "every attention head gets d_model / n_head dimensions")
        check_gpt_tp(model, plan.tp, sequence_parallel=options.sequence_parallel)
        if plan.pp > 1:
            check_stages(model.n_layer, plan.pp, options)
    if train is not None:
        check_batch(plan, options, global_batch_size=train.global_batch_size, grad_accum=train.grad_accum)
