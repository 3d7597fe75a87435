"""Tensor parallelism: Megatron-style column/row sharding with DTensor's ``parallelize_module``.

For the built-in GPT (torchtitan layout) each block's attention shards
``wq/wk/wv`` column-wise (each rank owns ``n_head / tp`` heads) and ``wo``
row-wise; the MLP shards ``w1`` column-wise and ``w2`` row-wise, so each block
needs one all-reduce forward and one backward. The token embedding is sharded
over the vocabulary, the output projection column-wise with its logits
gathered. With ``sequence_parallel`` the norms and the residual stream are
sharded along the sequence instead of replicated (all-reduce becomes
reduce-scatter + all-gather).

Models with another layout pass their own plan (``StrategyOptions.tp_plan``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from aitrain.strategies.options import StrategyOptions
from aitrain.strategies.plan import ParallelPlan
from aitrain.strategies.registry import register
from aitrain.strategies.rules import check_degrees, check_sequence_split, check_split, tp_error


def _linear(parent: nn.Module, parent_name: str, child: str) -> nn.Linear:
    m = getattr(parent, child, None)
    fqn = f"{parent_name}.{child}"
    if m is None:
        raise tp_error(parent_name, f"it has no '{child}' submodule")
    if not isinstance(m, nn.Linear):
        raise tp_error(fqn, f"it is a {type(m).__name__}, not an nn.Linear")
    return m


def _layers(model: nn.Module) -> nn.ModuleDict | nn.ModuleList:
    """``model.layers``, the blocks TP shards; ConfigError when there is no such container."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, (nn.ModuleDict, nn.ModuleList)):
        raise tp_error("<root>", f"{type(model).__name__} has no 'layers' ModuleDict/ModuleList of blocks")
    return layers


def check_tp_model(model: nn.Module, tp: int, *, sequence_parallel: bool = False,
                   seq_len: int | None = None) -> None:
    """Raise ConfigError naming the first module the built-in TP plan cannot shard, and why."""
    for name, block in _layers(model).named_children():
        block = _unwrap(block)
        base = f"layers.{name}"
        attn = getattr(block, "attention", None)
        if attn is None:
            raise tp_error(base, "it has no 'attention' submodule")
        for w in ("wq", "wk", "wv", "wo"):
            _linear(attn, f"{base}.attention", w)
        n_head = getattr(attn, "n_head", None)
        if not isinstance(n_head, int):
            raise tp_error(f"{base}.attention", "it has no integer 'n_head' attribute (heads are what TP splits)")
        check_split(f"{base}.attention", "heads", n_head, tp)
        ffn = getattr(block, "feed_forward", None)
        if ffn is None:
            raise tp_error(base, "it has no 'feed_forward' submodule")
        w1 = _linear(ffn, f"{base}.feed_forward", "w1")
        _linear(ffn, f"{base}.feed_forward", "w2")
        check_split(f"{base}.feed_forward.w1", "output features", w1.out_features, tp)
        if getattr(ffn, "w3", None) is not None:
            _linear(ffn, f"{base}.feed_forward", "w3")
    emb = getattr(model, "tok_embeddings", None)
    if emb is not None:
        if not isinstance(emb, nn.Embedding):
            raise tp_error("tok_embeddings", f"it is a {type(emb).__name__}, not an nn.Embedding")
        check_split("tok_embeddings", "vocabulary rows", emb.num_embeddings, tp)
    out = getattr(model, "output", None)
    if out is not None:
        out = _linear(model, "<root>", "output")
        check_split("output", "output features (vocabulary)", out.out_features, tp)
    if sequence_parallel and seq_len is not None:
        check_sequence_split(seq_len, tp)


def _unwrap(m: nn.Module) -> nn.Module:
    return getattr(m, "_checkpoint_wrapped_module", m)


def gpt_tp_plan(model: nn.Module, *, sequence_parallel: bool) -> dict[str, Any]:
    """{module FQN: ParallelStyle} for the built-in GPT (or any stage cut from it)."""
    sp = sequence_parallel
    plan: dict[str, Any] = {}
    if getattr(model, "tok_embeddings", None) is not None:
        # Replicated output: the position embedding is added before the residual stream is sharded.
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if getattr(model, "norm", None) is not None:
        if sp:
            plan["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        plan["output"] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(),
                                         output_layouts=Replicate(), use_local_output=True)
    first = True
    for name, block in _layers(model).named_children():
        b = f"layers.{name}"
        if sp and getattr(model, "tok_embeddings", None) is not None and first:
            # The stage that embeds tokens shards the (replicated) sum of embeddings along the sequence.
            plan[b] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                         use_local_output=True)
        first = False
        if sp:
            plan[f"{b}.attention_norm"] = SequenceParallel()
            plan[f"{b}.ffn_norm"] = SequenceParallel()
            plan[f"{b}.attention"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            plan[f"{b}.feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                           desired_input_layouts=(Replicate(),))
        for w in ("wq", "wk", "wv"):
            plan[f"{b}.attention.{w}"] = ColwiseParallel()
        plan[f"{b}.attention.wo"] = RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())
        plan[f"{b}.feed_forward.w1"] = ColwiseParallel()
        if getattr(_unwrap(block).feed_forward, "w3", None) is not None:
            plan[f"{b}.feed_forward.w3"] = ColwiseParallel()
        plan[f"{b}.feed_forward.w2"] = RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, options: StrategyOptions,
             seq_len: int | None = None) -> nn.Module:
    """Shard ``model`` (a whole model or one pipeline stage) over the 1D ``tp_mesh``."""
    if options.tp_plan is not None:
        return parallelize_module(model, tp_mesh, dict(options.tp_plan))
    check_tp_model(model, tp_mesh.size(), sequence_parallel=options.sequence_parallel, seq_len=seq_len)
    return parallelize_module(model, tp_mesh, gpt_tp_plan(model, sequence_parallel=options.sequence_parallel))


def _check_tp(plan: ParallelPlan, options: StrategyOptions) -> None:
    check_degrees("tp", plan)


@register("tp", check=_check_tp, summary="Megatron-style tensor parallelism (DTensor), optional sequence parallel")
def apply_tp_strategy(model: nn.Module, *, plan: ParallelPlan, mesh: Any, options: StrategyOptions) -> nn.Module:
    from aitrain.strategies.compose import parallelize

    _check_tp(plan, options)
    return parallelize(model, plan=plan, mesh=mesh, options=options, strategy="tp", data_parallel="none")
