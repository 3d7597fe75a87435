"""DDP: replicate the model on every rank, all-reduce gradients."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from aitrain.strategies.registry import register


@register("ddp")
def apply_ddp(model: nn.Module, *, plan: Any, mesh: Any, cfg: Any) -> nn.Module:
    if mesh is not None and "dp_replicate" in (mesh.mesh_dim_names or ()):
        pg = mesh["dp_replicate"].get_group()
    else:
        pg = None
    device_ids = None
    p = next(model.parameters())
    if p.is_cuda:
        device_ids = [p.device.index]
    return DistributedDataParallel(model, device_ids=device_ids, process_group=pg)
