"""Pipeline parallelism with ``torch.distributed.pipelining``.

The model (torchtitan layout: ``tok_embeddings``/``pos_embeddings``, ``layers``,
``norm``, ``output``) is cut by hand into ``pp x stages_per_rank`` stages of
consecutive blocks; the first stage keeps the embeddings, the last the norm and
the output projection. Each stage is a shallow copy of the model that shares
the blocks it owns (nothing is copied). A schedule from torch (GPipe, 1F1B,
Interleaved1F1B, ...) runs micro-batches through the stages.

What the rank owns is returned as a :class:`PipelineModule`: an ``nn.Module``
whose parameter names are the original model's (``layers.3.attention.wq.weight``),
so optimizers and checkpoints see the same names whatever the layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from aitrain.errors import ConfigError
from aitrain.strategies.options import StrategyOptions
from aitrain.strategies.plan import ParallelPlan
from aitrain.strategies.registry import register
from aitrain.strategies.rules import check_degrees, check_stages

_FIRST = ("tok_embeddings", "pos_embeddings")
_LAST = ("norm", "output")


def _layers(model: nn.Module) -> nn.ModuleDict:
    """``model.layers``, the blocks the stages split; ConfigError when it is not an nn.ModuleDict."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        raise ConfigError(
            f"pipeline parallelism cannot split {type(model).__name__}: it has no 'layers' nn.ModuleDict",
            "the model must be laid out torchtitan-style: tok_embeddings, layers (ModuleDict '0'..'n-1'), norm, "
            "output, and its forward must skip parts that are None",
        )
    return layers


def _layer_keys(model: nn.Module) -> list[str]:
    return list(_layers(model).keys())


def split_layers(keys: list[str], num_stages: int) -> list[list[str]]:
    """Consecutive blocks per stage; earlier stages take the remainder."""
    base, extra = divmod(len(keys), num_stages)
    out, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        out.append(keys[start : start + n])
        start += n
    return out


def stage_ids(pp_rank: int, pp: int, options: StrategyOptions) -> list[int]:
    """The stages this pipeline rank runs (in execution order)."""
    spr, style = options.stages_per_rank, options.pp_stage_style
    if style == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(spr)]


def cut_stage(model: nn.Module, keys: list[str], *, first: bool, last: bool) -> nn.Module:
    """A shallow copy of ``model`` owning only the ``keys`` blocks, plus the embeddings on the first
    stage and norm/output on the last; the parts it does not own are None (the forward skips them)."""
    stage = model.__class__.__new__(model.__class__)
    nn.Module.__init__(stage)
    for k, v in model.__dict__.items():  # plain attributes (e.g. the model's args)
        stage.__dict__.setdefault(k, v)
    if model._parameters and not first:
        raise ConfigError(f"pipeline parallelism cannot split {type(model).__name__}: parameters directly on the "
                          f"root ({', '.join(model._parameters)}) belong to no stage",
                          "move them into a submodule (tok_embeddings, norm, output, ...)")
    stage._parameters = dict(model._parameters) if first else {}
    stage._buffers = dict(model._buffers)
    for name, child in model._modules.items():
        if name == "layers":
            layers = _layers(model)
            stage._modules[name] = nn.ModuleDict({k: layers[k] for k in keys})
        elif name in _FIRST:
            stage._modules[name] = child if first else None
        elif name in _LAST:
            stage._modules[name] = child if last else None
        else:
            raise ConfigError(
                f"pipeline parallelism cannot place module '{name}' of {type(model).__name__} on a stage",
                f"the first stage takes {', '.join(_FIRST)}, the last {', '.join(_LAST)}, and 'layers' is split; "
                "rename or restructure the module",
            )
    return stage


class PipelineModule(nn.Module):
    """The pipeline stages one rank runs, under the original model's parameter names.

    Call :func:`aitrain.strategies.forward_backward` on it (a pipeline step has no
    plain forward). ``stages`` are the torch ``PipelineStage`` objects, ``schedule``
    the torch schedule.
    """

    def __init__(self, model: nn.Module, stage_modules: list[nn.Module]) -> None:
        super().__init__()
        # Register every owned submodule under its original name; the stage shells are not
        # registered (their parameters are these), so names match the unsplit model.
        layers = nn.ModuleDict()
        for m in stage_modules:
            for k, block in _layers(m).items():
                layers[k] = block
        for name in model._modules:
            if name == "layers":
                self.layers = layers
                continue
            owner = next((m._modules.get(name) for m in stage_modules if m._modules.get(name) is not None), None)
            self.add_module(name, owner)
        self.stage_modules = list(stage_modules)  # plain list: not registered twice
        self.stages: list[Any] = []
        self.schedule: Any = None
        self.has_first = False
        self.has_last = False
        self._loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._loss_scale = 1.0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "a pipeline-parallel model has no plain forward: its stages run under a schedule. "
            "Use aitrain.strategies.forward_backward(model, inputs, targets, loss_fn) for a training step."
        )

    def _scaled_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        assert self._loss_fn is not None
        return self._loss_fn(output, target) * self._loss_scale

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
             scale: float) -> torch.Tensor | None:
        """One schedule step over a batch; returns the sum of the scaled micro-batch losses
        on the rank holding the last stage, else None. Gradients accumulate."""
        self._loss_fn, self._loss_scale = loss_fn, scale
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        self.schedule.step(*args, target=targets if self.has_last else None, losses=losses,
                           return_outputs=False)
        if self.has_last:
            return torch.stack([loss.detach() for loss in losses]).sum()
        return None


def build_pipeline(model: nn.Module, *, plan: ParallelPlan, pp_mesh: DeviceMesh, options: StrategyOptions,
                   device: torch.device,
                   prepare: Callable[[nn.Module], nn.Module]) -> PipelineModule:
    """Cut ``model`` into this rank's stages, ``prepare`` each (TP/AC/compile/FSDP), build the schedule."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

    keys = _layer_keys(model)
    num_stages = check_stages(len(keys), plan.pp, options)
    per_stage = split_layers(keys, num_stages)
    pp_rank = pp_mesh.get_local_rank()
    ids = stage_ids(pp_rank, plan.pp, options)
    shells = [cut_stage(model, per_stage[s], first=s == 0, last=s == num_stages - 1) for s in ids]
    shells = [prepare(s) for s in shells]
    pm = PipelineModule(model, shells)
    group = pp_mesh.get_group()
    pm.stages = [PipelineStage(shell, s, num_stages, device, group=group) for shell, s in zip(shells, ids, strict=True)]
    pm.has_first = 0 in ids
    pm.has_last = num_stages - 1 in ids
    cls = get_schedule_class(options.pp_schedule)
    single = issubclass(cls, PipelineScheduleSingle)
    # scale_grads=False: the loss is scaled instead (1 / (micro-batches x accumulation steps)),
    # which stays right when several schedule steps accumulate into one optimizer step.
    pm.schedule = cls(pm.stages[0] if single else pm.stages, n_microbatches=options.pp_microbatches,
                      loss_fn=pm._scaled_loss, scale_grads=False)
    return pm


def _check_pp(plan: ParallelPlan, options: StrategyOptions) -> None:
    check_degrees("pp", plan)


@register("pp", check=_check_pp,
          summary="pipeline stages (GPipe / 1F1B / Interleaved1F1B ...), FSDP/HSDP over them when dp > 1")
def apply_pp(model: nn.Module, *, plan: ParallelPlan, mesh: Any, options: StrategyOptions) -> nn.Module:
    from aitrain.strategies.compose import parallelize

    _check_pp(plan, options)
    return parallelize(model, plan=plan, mesh=mesh, options=options, strategy="pp", data_parallel="fsdp")
