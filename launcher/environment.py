"""Where are we running? One place that maps each scheduler's variables.

Detection order is explicit (:func:`detect`): inside a torchrun/elastic worker,
inside a Slurm allocation, inside a Ray worker, else a plain host. Nothing else
in aitrain reads ``SLURM_*`` variables.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from aitrain.errors import ConfigError


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> names, in order.

    ``gpu[01-04,07]`` -> gpu01..gpu04, gpu07; ``a[1-2],b3`` -> a1, a2, b3;
    ``rack[1-2]-n[1-2]`` -> rack1-n1, rack1-n2, rack2-n1, rack2-n2. Zero padding is kept.
    """
    names: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            names.extend(_expand_one(item))
    return names


def _split_top_level(s: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    cur: list[str] = []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"malformed Slurm node list {s!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ConfigError(f"malformed Slurm node list {s!r}: unbalanced '['")
    parts.append("".join(cur))
    return parts


_BRACKET = re.compile(r"\[([^\]]*)\]")


def _expand_one(item: str) -> list[str]:
    m = _BRACKET.search(item)
    if not m:
        return [item]
    prefix, suffix = item[: m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ConfigError(f"malformed range {rng!r} in Slurm node list {item!r}")
            width = len(lo)
            values = [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
        else:
            if not rng.isdigit():
                raise ConfigError(f"malformed entry {rng!r} in Slurm node list {item!r}")
            values = [rng]
        for v in values:
            out.extend(_expand_one(prefix + v + suffix))
    return out


def expand_tasks_per_node(value: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` ('8(x2),4') -> [8, 8, 4]."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ConfigError(f"malformed SLURM_TASKS_PER_NODE {value!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


@dataclass(frozen=True)
class SlurmEnvironment:
    """The facts of a Slurm allocation / job step, from its variables."""

    job_id: str
    nodes: tuple[str, ...]  # expanded SLURM_JOB_NODELIST, in Slurm's order
    node_name: str  # this node (SLURMD_NODENAME)
    node_rank: int  # SLURM_NODEID: index of this node in `nodes`
    cluster: str = ""
    restart_count: int = 0  # SLURM_RESTART_COUNT: how often the job was requeued
    submit_dir: str = ""
    # Set inside a job step (srun); None in the batch script / salloc shell:
    proc_id: int | None = None  # SLURM_PROCID: global task rank
    local_id: int | None = None  # SLURM_LOCALID: task rank on this node
    ntasks: int | None = None  # SLURM_NTASKS
    tasks_per_node: tuple[int, ...] = ()
    gpus_on_node: int | None = None
    cpus_on_node: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def nnodes(self) -> int:
        return len(self.nodes)

    @property
    def in_step(self) -> bool:
        return self.proc_id is not None

    def torch_env(self) -> dict[str, str]:
        """RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE when srun starts one task per rank."""
        if self.proc_id is None or self.local_id is None or self.ntasks is None:
            raise ConfigError("not inside a Slurm job step (no SLURM_PROCID)",
                              "start ranks with srun, or let `aitrain launch backend=slurm` do it")
        local_world = (self.tasks_per_node[self.node_rank] if self.node_rank < len(self.tasks_per_node)
                       else self.ntasks // max(self.nnodes, 1))
        return {
            "RANK": str(self.proc_id),
            "LOCAL_RANK": str(self.local_id),
            "WORLD_SIZE": str(self.ntasks),
            "LOCAL_WORLD_SIZE": str(local_world),
            "GROUP_RANK": str(self.node_rank),
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SlurmEnvironment:
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job_id:
            raise ConfigError("not inside a Slurm allocation (SLURM_JOB_ID is not set)",
                              "run inside sbatch/salloc, or submit with `aitrain launch backend=slurm`")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        nodes = tuple(expand_nodelist(nodelist)) if nodelist else ()
        node_name = env.get("SLURMD_NODENAME") or (nodes[0] if nodes else "")
        if "SLURM_NODEID" in env:
            node_rank = int(env["SLURM_NODEID"])
        elif node_name in nodes:
            node_rank = nodes.index(node_name)
        else:
            node_rank = 0
        if nodes and node_rank >= len(nodes):
            raise ConfigError(f"SLURM_NODEID={node_rank} but the node list {nodelist!r} has {len(nodes)} nodes")

        def opt_int(name: str) -> int | None:
            v = env.get(name)
            return int(v) if v not in (None, "") and v.isdigit() else None

        tpn = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        return cls(
            job_id=job_id,
            nodes=nodes,
            node_name=node_name,
            node_rank=node_rank,
            cluster=env.get("SLURM_CLUSTER_NAME", ""),
            restart_count=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
            submit_dir=env.get("SLURM_SUBMIT_DIR", ""),
            proc_id=opt_int("SLURM_PROCID") if "SLURM_STEP_ID" in env or "SLURM_STEPID" in env else None,
            local_id=opt_int("SLURM_LOCALID") if "SLURM_STEP_ID" in env or "SLURM_STEPID" in env else None,
            ntasks=opt_int("SLURM_STEP_NUM_TASKS") or opt_int("SLURM_NTASKS"),
            tasks_per_node=tuple(expand_tasks_per_node(tpn)) if tpn else (),
            gpus_on_node=opt_int("SLURM_GPUS_ON_NODE"),
            cpus_on_node=opt_int("SLURM_CPUS_ON_NODE"),
        )


@dataclass(frozen=True)
class Environment:
    """Where this process runs: kind is torchrun | slurm | ray | plain."""

    kind: str
    slurm: SlurmEnvironment | None = None


def detect(env: Mapping[str, str] | None = None) -> Environment:
    """Explicit order: an elastic worker, a Slurm allocation, a Ray worker, else plain."""
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_RUN_ID") and env.get("RANK") is not None:
        return Environment("torchrun")
    if env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"):
        return Environment("slurm", SlurmEnvironment.from_env(env))
    if env.get("RAY_JOB_ID") or env.get("RAY_NODE_ID"):
        return Environment("ray")
    return Environment("plain")
