"""Parallel degrees over one DeviceMesh (after torchtitan's ParallelDims)."""

from __future__ import annotations

from dataclasses import dataclass

from aitrain.errors import ConfigError


@dataclass(frozen=True)
class ParallelPlan:
    """Degrees of each parallel dimension; their product is the world size."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int

    @classmethod
    def resolve(cls, *, world_size: int, dp_replicate: int = 1, dp_shard: int = -1,
                tp: int = 1, pp: int = 1) -> ParallelPlan:
        """Fill one -1 degree with "the rest" and check the product against the world size."""
        degrees = {"dp_replicate": dp_replicate, "dp_shard": dp_shard, "tp": tp, "pp": pp}
        for name, d in degrees.items():
            if d == 0 or d < -1:
                raise ConfigError(
                    f"parallel.{name}={d} is not a valid degree",
                    "degrees are positive integers, or -1 for \"the rest of the world size\"",
                )
        free = [n for n, d in degrees.items() if d == -1]
        if len(free) > 1:
            raise ConfigError(
                f"more than one parallel degree is -1 ({', '.join('parallel.' + n for n in free)})",
                "set all but one of them; -1 means \"whatever is left of the world size\"",
            )
        fixed = 1
        for d in degrees.values():
            if d != -1:
                fixed *= d
        if free:
            if world_size % fixed:
                raise ConfigError(
                    f"world size {world_size} is not divisible by the fixed parallel degrees "
                    f"({_describe(degrees)}, product {fixed})",
                    f"use a world size that is a multiple of {fixed} (nnodes x nproc_per_node), "
                    "or change the degrees",
                )
            degrees[free[0]] = world_size // fixed
        product = 1
        for d in degrees.values():
            product *= d
        if product != world_size:
            raise ConfigError(
                f"parallel degrees {_describe(degrees)} multiply to {product}, "
                f"but the world size is {world_size}",
                "make dp_replicate x dp_shard x tp x pp equal nnodes x nproc_per_node, "
                "or set one degree to -1 to take the rest",
            )
        return cls(**degrees)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp(self) -> int:
        """Data-parallel size: how many ways the global batch is split."""
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        return _describe(vars(self))

    def mesh_dims(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Names and sizes of the mesh dimensions, outermost first (pp, dp_replicate, dp_shard, tp)."""
        names = ("pp", "dp_replicate", "dp_shard", "tp")
        sizes = (self.pp, self.dp_replicate, self.dp_shard, self.tp)
        return names, sizes


def require_degrees(strategy: str, plan: ParallelPlan, hint: str, **expected: int) -> None:
    """Raise ConfigError naming every degree of ``plan`` that differs from ``expected``."""
    wrong = {k: getattr(plan, k) for k, v in expected.items() if getattr(plan, k) != v}
    if wrong:
        got = ", ".join(f"parallel.{k}={v}" for k, v in wrong.items())
        want = ", ".join(f"parallel.{k}={expected[k]}" for k in wrong)
        raise ConfigError(f"strategy {strategy} needs {want}, but the job has {got} "
                          f"(resolved degrees: {plan.describe()})", hint)


def _describe(degrees: dict[str, int]) -> str:
    return ", ".join(f"{k}={'-1' if v == -1 else v}" for k, v in degrees.items())
