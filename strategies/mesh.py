"""One DeviceMesh for every strategy: dims (pp, dp_replicate, dp_shard, tp), outermost first.

Every dimension exists even when its degree is 1, so strategies slice it by
name without special cases. ``dp`` (dp_replicate x dp_shard flattened) is the
data-parallel group: it splits the batch and averages the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from aitrain.errors import ConfigError
from aitrain.strategies.plan import ParallelPlan


def build_mesh(plan: ParallelPlan, device_type: str = "cpu") -> DeviceMesh:
    """The job's DeviceMesh (needs an initialised default process group)."""
    if not dist.is_initialized():
        raise ConfigError("a DeviceMesh needs torch.distributed to be initialised",
                          "call torch.distributed.init_process_group() first (torchrun / aitrain launch set the env)")
    world = dist.get_world_size()
    if plan.world_size != world:
        raise ConfigError(f"parallel degrees ({plan.describe()}) multiply to {plan.world_size}, "
                          f"but the process group has {world} ranks",
                          "resolve the plan with ParallelPlan.resolve(world_size=dist.get_world_size(), ...)")
    names, sizes = plan.mesh_dims()
    return init_device_mesh(device_type, sizes, mesh_dim_names=names)


@dataclass(frozen=True)
class Coordinates:
    """This rank's place in the mesh."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    plan: ParallelPlan

    @property
    def dp(self) -> int:
        """Index of this rank's slice of the global batch."""
        return self.dp_replicate * self.plan.dp_shard + self.dp_shard


def coordinates(plan: ParallelPlan, rank: int) -> Coordinates:
    """Mesh coordinates of global ``rank`` (row-major over pp, dp_replicate, dp_shard, tp)."""
    rest, t = divmod(rank, plan.tp)
    rest, s = divmod(rest, plan.dp_shard)
    p, r = divmod(rest, plan.dp_replicate)
    return Coordinates(pp=p, dp_replicate=r, dp_shard=s, tp=t, plan=plan)


def dp_mesh(mesh: DeviceMesh, plan: ParallelPlan) -> DeviceMesh:
    """The mesh FSDP shards over: 1D dp_shard, or 2D (dp_replicate, dp_shard) for HSDP."""
    if plan.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def device_of(mesh: DeviceMesh | None) -> torch.device:
    if mesh is None or mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.accelerator.current_device_index())
