"""The one composition every strategy is a preset of.

Order (torchtitan's): cut pipeline stages -> tensor parallel -> activation
checkpointing -> torch.compile -> data parallel (FSDP2/HSDP per block then the
root, or DDP around the whole model). Each strategy file says which pieces it
wants and checks its degrees; this file knows how to put them together.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from aitrain.strategies.context import ParallelContext, attach
from aitrain.strategies.mesh import build_mesh, dp_mesh
from aitrain.strategies.options import StrategyOptions
from aitrain.strategies.plan import ParallelPlan


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# Ops whose outputs selective activation checkpointing keeps (compute-heavy); the rest is recomputed.
def _sac_save_list() -> set[Any]:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention"):
        op = getattr(aten, name, None)
        if op is not None:
            ops.add(op.default)
    c10d = getattr(torch.ops, "_c10d_functional", None)
    if c10d is not None:  # don't repeat TP's collectives in the recomputation
        for name in ("reduce_scatter_tensor", "all_reduce", "all_gather_into_tensor"):
            op = getattr(c10d, name, None)
            if op is not None:
                ops.add(op.default)
    return ops


def _sac_policy(save: set[Any], ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE


def wrap_activation_checkpointing(block: nn.Module, mode: str) -> nn.Module:
    """``full``: recompute the whole block in backward; ``selective``: keep matmul/attention outputs."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "full":
        return checkpoint_wrapper(block, preserve_rng_state=False)
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        policy = functools.partial(_sac_policy, _sac_save_list())
        return checkpoint_wrapper(block, preserve_rng_state=False,
                                  context_fn=functools.partial(create_selective_checkpoint_contexts, policy))
    return block


def _blocks(model: nn.Module) -> nn.Module | None:
    layers = getattr(model, "layers", None)
    return layers if isinstance(layers, (nn.ModuleDict, nn.ModuleList)) else None


def parallelize(model: nn.Module, *, plan: ParallelPlan, mesh: DeviceMesh | None, options: StrategyOptions,
                strategy: str, data_parallel: str) -> nn.Module:
    """Apply the pieces in order; ``data_parallel`` is "ddp", "fsdp" (always), "auto" (FSDP when dp > 1)
    or "none". Returns the module to train (a :class:`PipelineModule` when ``plan.pp > 1``)."""
    from aitrain.strategies.tp import apply_tp

    device = _model_device(model)
    if mesh is None:
        mesh = build_mesh(plan, device.type)
    use_fsdp = data_parallel == "fsdp" or (data_parallel == "auto" and plan.dp > 1)
    bf16 = options.mixed_precision == "bf16"
    if bf16 and not bf16_supported(device):
        warnings.warn(f"strategy.mixed_precision=bf16: {device.type} has no bf16 support here; training in fp32",
                      stacklevel=2)
        bf16 = False
    seq_len = getattr(getattr(model, "args", None), "seq_len", None)

    def prepare(m: nn.Module) -> nn.Module:
        if plan.tp > 1:
            m = apply_tp(m, mesh["tp"], options, seq_len=seq_len)
        blocks = _blocks(m)
        if blocks is not None:
            for key, block in list(blocks.named_children()):
                block = wrap_activation_checkpointing(block, options.activation_checkpointing)
                if options.compile:
                    block.compile()
                blocks.register_module(key, block)
        elif options.compile:
            m.compile()
        if use_fsdp:
            m = _apply_fsdp(m, dp_mesh(mesh, plan), bf16=bf16, pipelined=plan.pp > 1)
        return m

    if plan.pp > 1:
        from aitrain.strategies.pp import build_pipeline

        out: nn.Module = build_pipeline(model, plan=plan, pp_mesh=mesh["pp"], options=options, device=device,
                                        prepare=prepare)
    else:
        out = prepare(model)
        if data_parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [device.index] if device.type == "cuda" else None
            out = DistributedDataParallel(out, device_ids=device_ids, process_group=mesh["dp_replicate"].get_group())
    autocast = torch.bfloat16 if bf16 and not use_fsdp else None
    attach(out, ParallelContext(strategy=strategy, plan=plan, mesh=mesh, options=options,
                                data_parallel="ddp" if data_parallel == "ddp" else ("fsdp" if use_fsdp else "none"),
                                autocast_dtype=autocast, device=device))
    return out


def _apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, bf16: bool, pipelined: bool) -> nn.Module:
    """FSDP2 per transformer block, then the rest at the root (HSDP when ``mesh`` is 2D)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    # Under a pipeline schedule each micro-batch would re-gather parameters; keep them gathered.
    reshard = not pipelined
    blocks = _blocks(model)
    if blocks is not None:
        for block in blocks.children():
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    return model


def check_model(model: nn.Module, plan: ParallelPlan, options: StrategyOptions, *,
                seq_len: int | None = None) -> None:
    """Can ``model`` (real or on the meta device) be cut into ``plan.pp`` stages and sharded
    ``plan.tp`` ways? A ConfigError names the module and why."""
    from aitrain.strategies.pp import _layer_keys
    from aitrain.strategies.rules import check_stages
    from aitrain.strategies.tp import check_tp_model

    if plan.pp > 1:
        check_stages(len(_layer_keys(model)), plan.pp, options)
    if plan.tp > 1 and options.tp_plan is None:
        check_tp_model(model, plan.tp, sequence_parallel=options.sequence_parallel, seq_len=seq_len)
