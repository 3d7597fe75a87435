"""Where are we running? One place that maps each scheduler's variables.

Detection order is explicit (:func:`detect`): inside a torchrun/elastic worker,
inside a Slurm allocation, inside a Ray worker, else a plain host. Nothing else
in aitrain reads ``SLURM_*`` variables.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from aitrain.errors import ConfigError

# Slurm's host lists, as its src/common/hostlist.c reads them (`scontrol show hostnames`).
# Separators: hostlist_create() splits on "\t, " and, since Slurm 23.02, also on "\n".
NODELIST_SEPARATORS = " \t,\n"
# slurm.h MAX_SLURM_NODES: no allocation has more nodes. hostlist.c refuses a range of more
# hosts (MAX_RANGE) and a bracket group before the last one of more (MAX_PREFIX_CNT), both 64K.
MAX_SLURM_NODES = 64 * 1024
_ULONG_MAX = 2**64 - 1
_C_SPACE = " \t\n\v\f\r"  # isspace() in the C locale: what strtoul() skips
_NODELIST_HINT = ("SLURM_JOB_NODELIST comes from Slurm itself; if it was set by hand, `scontrol show "
                  "hostnames '<list>'` expands a list the way Slurm does (e.g. gpu[01-04,07],login1)")


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> names, in order, as ``scontrol show hostnames`` gives them.

    ``gpu[01-04,07]`` -> gpu01..gpu04, gpu07; ``a[1-2],b3`` or ``a[1-2] b3`` -> a1, a2, b3;
    ``rack[1-2]-n[01-02]`` -> rack1-n01, rack1-n02, rack2-n01, rack2-n02 (Slurm's order: with
    three or more groups, the last group varies fastest, then the first, second, ...).
    Zero padding follows the width of each range's first number. Lists Slurm refuses are
    refused, and so are lists of more than 65536 names (Slurm's limit), counted before
    anything is expanded. Stricter than Slurm: names with a stray ``[`` or ``]`` (which Slurm
    keeps as typed, or mangles) are refused.
    """
    shown = nodelist if len(nodelist) <= 80 else nodelist[:77] + "..."
    tokens = [_parse_token(tok, shown) for tok in _tokens(nodelist)]
    total = 0
    for _, groups in tokens:
        count = 1
        for ranges in groups:
            count *= sum(r.hi - r.lo + 1 for r in ranges)
        total += count
        if total > MAX_SLURM_NODES:
            raise ConfigError(f"Slurm node list {shown!r} names more than {MAX_SLURM_NODES} hosts; no Slurm "
                              f"allocation has more (MAX_SLURM_NODES)", _NODELIST_HINT)
    names: list[str] = []
    for literals, groups in tokens:
        if not groups:
            names.append(literals[0])
            continue
        # hostlist.c's _push_range_list peels the groups before the last one right to left,
        # each outside the ones peeled after it; the last group is the innermost loop.
        order = [*range(len(groups) - 2, -1, -1), len(groups) - 1]
        values = [[str(v).zfill(r.width) for r in groups[i] for v in range(r.lo, r.hi + 1)] for i in order]
        for combo in itertools.product(*values):
            by_group = dict(zip(order, combo, strict=True))
            names.append(literals[0] + "".join(by_group[i] + literals[i + 1] for i in range(len(groups))))
    return names


@dataclass(frozen=True)
class _Range:
    lo: int
    hi: int
    width: int  # digits of the first number as typed: the zero padding of every name


def _tokens(s: str) -> Iterator[str]:
    """hostlist.c's _next_tok: split on the separators, except inside a bracket pair
    (``n[1, 2]`` is one token)."""
    n, i = len(s), 0
    close_at = -1  # the first ']' at or after some earlier position (cached: linear time)
    while True:
        while i < n and s[i] in NODELIST_SEPARATORS:
            i += 1
        if i >= n:
            return
        start = parse = i
        while True:
            while i < n and s[i] not in NODELIST_SEPARATORS:
                i += 1
            extended = False
            while True:
                opening = s.find("[", parse, i)
                if opening < 0:
                    break
                if close_at < parse:
                    close_at = s.find("]", parse)
                    if close_at < 0:
                        close_at = n  # none left
                if close_at >= n or close_at < opening:
                    break
                if close_at < i:
                    parse = close_at + 1
                    continue
                i, extended = close_at, True  # the separator is inside brackets: go on from ']'
                break
            if not extended:
                break
        yield s[start:i]


def _parse_token(tok: str, shown: str) -> tuple[list[str], list[list[_Range]]]:
    """One token -> (literals, bracket groups): names are lit0 + g0 + lit1 + g1 + ... + suffix."""
    p = tok.rfind("[")
    if p < 0:
        literals: list[str] = [tok]
        groups: list[list[_Range]] = []
    else:
        q = tok.find("]", p)
        if q < 0:
            raise ConfigError(f"malformed Slurm node list {shown!r}: {tok!r} opens '[' without closing it",
                              _NODELIST_HINT)
        groups = [_parse_range_list(tok[p + 1:q], shown)]
        literals = [tok[q + 1:]]  # a suffix after the last group (Slurm >= 23.11 reads it)
        prefix = tok[:p]
        while (pp := prefix.rfind("[")) >= 0 and (qq := prefix.rfind("]")) > pp:
            groups.insert(0, _parse_range_list(prefix[pp + 1:qq], shown))
            literals.insert(0, prefix[qq + 1:])
            prefix = prefix[:pp]
        literals.insert(0, prefix)
    for lit in literals:
        if "[" in lit or "]" in lit:
            raise ConfigError(f"malformed Slurm node list {shown!r}: unbalanced '[' or ']' in {tok!r}",
                              _NODELIST_HINT)
    return literals, groups


def _strtoul(s: str) -> tuple[int | None, str]:
    """C's strtoul(s, &end, 10): (value or None without digits, the rest)."""
    i = 0
    while i < len(s) and s[i] in _C_SPACE:
        i += 1
    negative = i < len(s) and s[i] == "-"
    if i < len(s) and s[i] in "+-":
        i += 1
    j = i
    while j < len(s) and "0" <= s[j] <= "9":
        j += 1
    if j == i:
        return None, s
    value = min(int(s[i:j]), _ULONG_MAX)
    return ((_ULONG_MAX + 1 - value) % (_ULONG_MAX + 1) if negative else value), s[j:]


def _parse_range_list(text: str, shown: str) -> list[_Range]:
    """The inside of one bracket group (``01-04,07``), as hostlist.c's _parse_single_range."""
    ranges: list[_Range] = []
    total = 0
    for part in text.split(","):
        lo_text, dash, hi_text = part.partition("-")
        bad = ConfigError(f"malformed Slurm node list {shown!r}: {part!r} in [{text}] is not a number or "
                          "a range lo-hi", _NODELIST_HINT)
        if hi_text.startswith("-") or "x" in part:  # no negative numbers, no boxes (AxB)
            raise bad
        lo, rest = _strtoul(lo_text)
        if lo is None:
            raise bad
        if dash and hi_text:
            hi, rest = _strtoul(hi_text)
            if hi is None:
                raise bad
        else:
            hi = lo
        if rest or lo > hi:
            raise ConfigError(f"malformed Slurm node list {shown!r}: {part!r} in [{text}] is not a number or "
                              f"a range lo-hi with lo <= hi", _NODELIST_HINT)
        if hi - lo + 1 > MAX_SLURM_NODES:
            raise ConfigError(f"Slurm node list {shown!r}: the range {part!r} has {hi - lo + 1} hosts; Slurm "
                              f"refuses a range of more than {MAX_SLURM_NODES} (MAX_RANGE in hostlist.c)",
                              _NODELIST_HINT)
        total += hi - lo + 1
        if total > MAX_SLURM_NODES:
            raise ConfigError(f"Slurm node list {shown!r} names more than {MAX_SLURM_NODES} hosts in [{text[:40]}"
                              f"{'...' if len(text) > 40 else ''}]; no Slurm allocation has more "
                              "(MAX_SLURM_NODES)", _NODELIST_HINT)
        ranges.append(_Range(lo, hi, len(lo_text)))
    return ranges


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
    # Read whenever set. The batch script (and salloc's interactive step) is task 0 of its own
    # one-task step: SLURM_PROCID=0 and SLURM_LOCALID=0 there too, but no SLURM_STEP_ID.
    proc_id: int | None = None  # SLURM_PROCID: global task rank
    local_id: int | None = None  # SLURM_LOCALID: task rank on this node
    step_id: str | None = None  # SLURM_STEP_ID (SLURM_STEPID before Slurm 2.x): set in srun's tasks only
    ntasks: int | None = None  # SLURM_STEP_NUM_TASKS, else SLURM_NTASKS
    tasks_per_node: tuple[int, ...] = ()
    gpus_on_node: int | None = None
    cpus_on_node: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def nnodes(self) -> int:
        return len(self.nodes)

    @property
    def in_step(self) -> bool:
        """A task of an srun job step (not the batch script or the salloc shell)."""
        return self.step_id is not None

    def torch_env(self) -> dict[str, str]:
        """RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE when srun starts one task per rank."""
        if self.proc_id is None or self.local_id is None or self.ntasks is None:
            raise ConfigError("not inside a Slurm job step (SLURM_PROCID, SLURM_LOCALID or SLURM_NTASKS is not set)",
                              "start ranks with srun, or let `aitrain launch backend=slurm` do it")
        if not self.in_step:
            raise ConfigError(f"this is the batch script or salloc shell of job {self.job_id}, not a task of a "
                              f"job step (SLURM_PROCID={self.proc_id} but no SLURM_STEP_ID): one process, not "
                              f"rank {self.proc_id} of {self.ntasks}",
                              "start ranks with srun, or let `aitrain launch backend=slurm` do it")
        if self.proc_id >= self.ntasks:
            raise ConfigError(f"SLURM_PROCID={self.proc_id} but the step has {self.ntasks} tasks",
                              "SLURM_PROCID counts from 0 to SLURM_STEP_NUM_TASKS-1; are these variables "
                              "from two different steps?")
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

        def opt_int(name: str) -> int | None:
            v = env.get(name)
            return int(v) if v not in (None, "") and v.isdigit() else None

        node_id = opt_int("SLURM_NODEID")
        if node_id is not None:
            node_rank = node_id
        elif node_name in nodes:
            node_rank = nodes.index(node_name)
        else:
            node_rank = 0
        if nodes and node_rank >= len(nodes):
            raise ConfigError(f"SLURM_NODEID={node_rank} but the node list {nodelist!r} has {len(nodes)} nodes",
                              "SLURM_NODEID counts the job's nodes from 0; are SLURM_NODEID and "
                              "SLURM_JOB_NODELIST from the same job?")

        tpn = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        return cls(
            job_id=job_id,
            nodes=nodes,
            node_name=node_name,
            node_rank=node_rank,
            cluster=env.get("SLURM_CLUSTER_NAME", ""),
            restart_count=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
            submit_dir=env.get("SLURM_SUBMIT_DIR", ""),
            proc_id=opt_int("SLURM_PROCID"),
            local_id=opt_int("SLURM_LOCALID"),
            step_id=env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or None,
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
