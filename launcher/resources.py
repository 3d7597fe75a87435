"""Rank placement and resource control on one node: CPU binding and the job's cgroup.

Three places use this module, in this order:

- the backend's dry run: :func:`plan_node` turns the job's ``binding``,
  ``resources.*`` and ``profile`` keys into a :class:`NodePlan` (the CPU set and
  ``OMP_NUM_THREADS`` of every local rank, the cgroup it will create, the
  profiler). It only reads the host.
- the node agent: :meth:`NodeResources.start` creates the job's cgroup before
  any rank starts and hands the ranks their plan in ``AITRAIN_RANK_PLAN``;
  :meth:`NodeResources.stop` kills whatever is left in the cgroup, removes it
  and collects the profiles.
- each rank's trampoline (``supervise.py``): :func:`apply_rank_plan` joins the
  cgroup, sets the CPU affinity and ``OMP_NUM_THREADS``, then the program is
  exec'd (or run under the profiler, ``profiling.py``).

Where the cgroup goes. v2 (one unified hierarchy with the ``memory``
controller): ``<cgroup2 mount>/aitrain/<job>``; a cgroup with controllers for
its children may not hold processes itself, so the group sits at the top of the
hierarchy this process sees (in a container with a cgroup namespace that is the
container's cgroup). v1 (``memory`` and ``cpuset`` hierarchies, like Debian
hosts booted with the hybrid layout): ``<hierarchy>/<the agent's cgroup>/aitrain/<job>``,
nested under the agent's own cgroup so limits set there keep applying.

The rank side of this module imports only the standard library: it runs in every
rank's trampoline before the real program starts.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aitrain.errors import ConfigError

RANK_PLAN_ENV = "AITRAIN_RANK_PLAN"
CGROUP_ROOT_ENV = "AITRAIN_CGROUP_ROOT"  # use this directory as the cgroup filesystem (tests, odd mounts)
BINDINGS = ("numa", "core", "none")
PROFILES = ("none", "perf", "pyspy")


def warn(message: str) -> None:
    print(f"aitrain: warning: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    print(f"aitrain: {message}", flush=True)


# -- what the user asked for ---------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)\s*$", re.IGNORECASE)


def parse_memory_size(text: str) -> int:
    """``"300M"`` -> 314572800. K/M/G/T/P are powers of 1024 (``300Mi``, ``300MB`` too)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"resources.memory_max={text!r} is not a memory size",
                          "write it like 512M, 8G or 1.5G (powers of 1024), or a number of bytes")
    value = float(m.group(1)) * 1024 ** " KMGTP".index(m.group(2).upper() or " ")
    if value < 1 << 20:
        raise ConfigError(f"resources.memory_max={text} is below 1M: no rank can start in that",
                          "give the job's ranks together at least a few hundred megabytes, e.g. 512M")
    return int(value)


def format_memory_size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


@dataclass(frozen=True)
class ResourceRequest:
    """The resource keys of a JobConfig, checked: what every node should do."""

    binding: str = "none"
    cgroup: bool = False
    memory_max: int | None = None
    profile: str = "none"
    use_gpus: bool = True  # align binding to the GPUs' NUMA nodes when there are GPUs

    @property
    def active(self) -> bool:
        return self.binding != "none" or self.cgroup or self.profile != "none"

    @classmethod
    def from_config(cls, job: Any) -> ResourceRequest:
        binding, profile = str(job.binding), str(job.profile)
        if binding not in BINDINGS:
            raise ConfigError(f"binding={binding} is not a CPU binding mode",
                              "use binding=numa (CPUs of the GPU's NUMA node), core (even split) or none")
        if profile not in PROFILES:
            raise ConfigError(f"profile={profile} is not a profiler",
                              "use profile=perf (perf stat per rank), pyspy (flame graph per rank) or none")
        res = job.resources
        memory_max = None
        if res.memory_max not in (None, ""):
            if not res.cgroup:
                raise ConfigError(f"resources.memory_max={res.memory_max} needs the job's own cgroup",
                                  "add resources.cgroup=true")
            memory_max = parse_memory_size(res.memory_max)
        return cls(binding=binding, cgroup=bool(res.cgroup), memory_max=memory_max, profile=profile,
                   use_gpus=str(getattr(job, "device", "auto")) != "cpu")


# -- the plan for one node -------------------------------------------------------------


@dataclass
class NodePlan:
    """What one node's agent sets up for its ranks (JSON in ``AgentRequest.resources``)."""

    binding: str = "none"
    cpu_sets: list[list[int]] = field(default_factory=list)  # per local rank; empty: no binding
    omp_threads: list[int] = field(default_factory=list)  # per local rank (set by the trampoline)
    set_omp: bool = True  # False: the user set OMP_NUM_THREADS, which wins
    binding_note: str = ""  # how the sets were chosen
    cgroup: bool = False
    cgroup_name: str = ""  # aitrain/<job>
    memory_max: int | None = None
    profile: str = "none"
    profile_dir: str = ""
    metrics_file: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodePlan:
        return cls(**dict(d))

    def describe(self) -> list[str]:
        """Dry-run lines (the per-rank CPU sets are printed with each rank)."""
        lines = []
        if self.binding != "none":
            lines.append(f"binding: {self.binding}: {self.binding_note}")
        if self.cgroup:
            limit = format_memory_size(self.memory_max) if self.memory_max else "no memory limit"
            cpus = sorted({c for s in self.cpu_sets for c in s})
            where = describe_cgroup_location(self.cgroup_name)
            lines.append(f"cgroup:  {where}; memory max {limit}"
                         + (f"; cpus {format_cpus(cpus)}" if cpus else "")
                         + "; every process in it is killed at teardown")
        if self.profile == "perf":
            from aitrain.launcher.profiling import PERF_EVENTS

            lines.append(f"profile: perf stat -e {','.join(PERF_EVENTS)} per rank -> "
                         f"{self.profile_dir}/perf-rank<N>.csv; counters to metrics.jsonl as perf/rank<N>/*")
        elif self.profile == "pyspy":
            lines.append(f"profile: py-spy record per rank -> {self.profile_dir}/flame-rank<N>.svg")
        return lines


def format_cpus(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the kernel's cpulist format)."""
    from aitrain.fabric.host import format_cpulist

    return format_cpulist(cpus)


def _parse_cpus(text: str) -> list[int]:
    from aitrain.fabric.host import parse_cpulist

    return parse_cpulist(text)


def gpu_numa_nodes(sysfs_root: str | os.PathLike[str] = "/sys",
                   visible: str | None = None) -> list[int | None]:
    """NUMA node of each GPU a rank would use, in CUDA index order (PCI bus order).

    ``visible`` is ``CUDA_VISIBLE_DEVICES``; only a list of indices is understood
    (UUIDs and MIG names give ``[]``: no GPU alignment).
    """
    from aitrain.fabric.probe.fs import Root
    from aitrain.fabric.probe.gpu import read_sysfs_gpus

    gpus = sorted(read_sysfs_gpus(Root(sysfs_root, [])), key=lambda g: g.pci_address or "")
    numa: list[int | None] = [g.numa_node if g.numa_node is None or g.numa_node >= 0 else None for g in gpus]
    if visible is None:
        return numa
    try:
        indices = [int(x) for x in visible.split(",") if x.strip()]
    except ValueError:
        return []
    return [numa[i] for i in indices if 0 <= i < len(numa)]


def plan_cpu_sets(binding: str, nranks: int, *, sysfs_root: str | os.PathLike[str] = "/sys",
                  allowed: Sequence[int] | None = None, gpu_numa: Sequence[int | None] | None = None,
                  ) -> tuple[list[list[int]], str]:
    """Disjoint CPU sets for ``nranks`` local ranks and a note on how they were chosen.

    ``allowed`` defaults to this process's affinity (a Slurm step or ``taskset``
    may give the launcher fewer CPUs than the host has).
    """
    from aitrain.fabric.host import cpu_sets_for_ranks, read_cpu_topology

    topo = read_cpu_topology(Path(sysfs_root))
    allowed_set = set(allowed if allowed is not None else os.sched_getaffinity(0))
    cpus = [c for c in topo.online if c in allowed_set] or sorted(allowed_set)
    gpus = list(gpu_numa or [])
    aligned = binding == "numa" and len(gpus) >= nranks and all(n is not None for n in gpus[:nranks])
    sets = cpu_sets_for_ranks(nranks, cpus, topo.numa_nodes, gpus if aligned else None, binding,  # type: ignore[arg-type]
                              thread_siblings=topo.thread_siblings)
    nodes = len(topo.numa_nodes)
    if binding == "numa" and aligned:
        how = "each rank on the NUMA node of its GPU"
    elif binding == "numa" and nodes > 1:
        how = f"ranks spread over {nodes} NUMA nodes in blocks (no GPUs to align to)"
    elif binding == "numa":
        how = "one NUMA node, split evenly"
    else:
        how = "split evenly, whole cores together"
    return sets, f"CPUs {format_cpus(cpus)}, {how}"


def cgroup_job_name(run_dir: Path) -> str:
    token = os.urandom(3).hex()
    return "aitrain/" + re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run_dir.name}-{token}")


def plan_node(req: ResourceRequest, *, nproc: int, run_dir: Path, metrics_file: Path,
              user_omp: str | None = None, sysfs_root: str = "/sys") -> NodePlan:
    """The node's plan, from what this host looks like (reads only)."""
    plan = NodePlan(binding=req.binding, cgroup=req.cgroup, memory_max=req.memory_max,
                    profile=req.profile, metrics_file=str(metrics_file))
    if req.binding != "none":
        gpus = gpu_numa_nodes(sysfs_root, os.environ.get("CUDA_VISIBLE_DEVICES")) if req.use_gpus else []
        plan.cpu_sets, plan.binding_note = plan_cpu_sets(req.binding, nproc, sysfs_root=sysfs_root,
                                                         gpu_numa=gpus)
        plan.set_omp = user_omp is None
        if plan.set_omp:
            plan.omp_threads = [len(s) for s in plan.cpu_sets]
        else:
            plan.binding_note += f"; OMP_NUM_THREADS={user_omp} is user-set and kept"
    if req.cgroup:
        plan.cgroup_name = cgroup_job_name(run_dir)
    if req.profile != "none":
        plan.profile_dir = str(run_dir / "profile")
    return plan


# -- cgroups ---------------------------------------------------------------------------


class CgroupUnavailable(Exception):
    """This process cannot create cgroups here; the message says why."""


@dataclass
class CgroupLayout:
    """Where this process can put a job's cgroup."""

    version: int  # 2 or 1
    parents: dict[str, Path]  # v2: {"unified": dir}; v1: {"memory": dir, "cpuset": dir}

    def job_dirs(self, name: str) -> dict[str, Path]:
        return {k: p / name for k, p in self.parents.items()}


def _parse_mountinfo(text: str) -> list[tuple[str, str, str, set[str]]]:
    """(mount point, root inside the hierarchy, fstype, super options) of cgroup mounts."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].replace("\\040", " ")
        out.append((point, fields[3], rfields[0], set(rfields[2].split(","))))
    return out


def _parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` -> {controller: path}; the v2 entry is under "unified"."""
    own: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            own["unified"] = parts[2]
        for ctrl in parts[1].split(","):
            if ctrl:
                own[ctrl] = parts[2]
    return own


def _below(mount: str, root: str, own: str | None) -> Path:
    """The directory of cgroup ``own`` in a hierarchy mounted at ``mount`` (showing ``root``)."""
    if own is None:
        return Path(mount)
    root = root.rstrip("/")
    if root and not (own == root or own.startswith(root + "/")):
        return Path(mount)  # not visible from this mount: use its top
    rel = own[len(root):].lstrip("/")
    return Path(mount) / rel if rel else Path(mount)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def find_cgroups(proc_root: str | os.PathLike[str] = "/proc", root: str | None = None) -> CgroupLayout:
    """Where to create the job's cgroup: v2 where it has the memory controller, else v1."""
    root = root if root is not None else os.environ.get(CGROUP_ROOT_ENV) or None
    if root:
        base = Path(root)
        if (base / "cgroup.controllers").exists():
            return CgroupLayout(2, {"unified": base})
        given = {c: base / c for c in ("memory", "cpuset") if (base / c / "cgroup.procs").exists()}
        if "memory" in given:
            return CgroupLayout(1, given)
        raise CgroupUnavailable(f"{base} ({CGROUP_ROOT_ENV}) is not a cgroup filesystem "
                                f"(no cgroup.controllers, no memory/cgroup.procs)")
    proc = Path(proc_root)
    mounts = _parse_mountinfo(_read(proc / "self/mountinfo"))
    own = _parse_proc_cgroup(_read(proc / "self/cgroup"))
    v2 = next(((p, r) for p, r, fs, _ in mounts if fs == "cgroup2"), None)
    v1: dict[str, tuple[str, str]] = {}
    for point, mroot, fs, opts in mounts:
        for ctrl in ("memory", "cpuset"):
            if fs == "cgroup" and ctrl in opts and ctrl not in v1:
                v1[ctrl] = (point, mroot)
    v2_controllers = _read(Path(v2[0]) / "cgroup.controllers").split() if v2 else []
    if v2 and ("memory" in v2_controllers or "memory" not in v1):
        return CgroupLayout(2, {"unified": Path(v2[0])})
    if "memory" in v1:
        return CgroupLayout(1, {c: _below(p, r, own.get(c)) for c, (p, r) in v1.items()})
    raise CgroupUnavailable("no cgroup filesystem is mounted (nothing of type cgroup2, "
                            "nor a cgroup v1 memory hierarchy, in /proc/self/mountinfo)")


def describe_cgroup_location(name: str) -> str:
    try:
        layout = find_cgroups()
    except CgroupUnavailable as e:
        return f"{name} (cgroups unavailable here: {e})"
    dirs = layout.job_dirs(name)
    return f"cgroup v{layout.version} {', '.join(str(d) for d in dirs.values())}"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _errtext(e: OSError) -> str:
    return f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)


class JobCgroup:
    """The job's cgroup on one node: created before the ranks, killed and removed after."""

    def __init__(self, layout: CgroupLayout, name: str, dirs: dict[str, Path], notes: list[str]) -> None:
        self.layout = layout
        self.name = name
        self.dirs = dirs  # v2: {"unified": dir}; v1: {"memory": dir, "cpuset": dir}
        self.notes = notes  # what could not be set (a controller missing, ...)
        self.memory_max: int | None = None

    @property
    def version(self) -> int:
        return self.layout.version

    @property
    def procs_files(self) -> list[str]:
        """The files a rank writes its pid to, to join the group."""
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    @classmethod
    def create(cls, name: str, *, memory_max: int | None = None, cpus: Sequence[int] = (),
               layout: CgroupLayout | None = None) -> JobCgroup:
        """Create the group (raises CgroupUnavailable with the reason when it cannot)."""
        layout = layout or find_cgroups()
        for attempt in range(3):  # another job may remove the shared aitrain/ dir in between
            try:
                if layout.version == 2:
                    group = cls._create_v2(layout, name, memory_max, cpus)
                else:
                    group = cls._create_v1(layout, name, memory_max, cpus)
                group.memory_max = memory_max
                return group
            except FileNotFoundError as e:
                if attempt == 2:
                    raise CgroupUnavailable(f"cannot create {name}: {_errtext(e)}") from e
        raise AssertionError("unreachable")

    @classmethod
    def _create_v2(cls, layout: CgroupLayout, name: str, memory_max: int | None,
                   cpus: Sequence[int]) -> JobCgroup:
        parent = layout.parents["unified"]
        job = parent / name
        notes: list[str] = []
        wanted = (["memory"] if memory_max else []) + (["cpuset"] if cpus else [])
        try:
            job.parent.mkdir(exist_ok=True)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {job.parent}: {e.strerror or e}") from e
        # Controllers must be enabled in every ancestor's subtree_control down to the group.
        available = set(_read(parent / "cgroup.controllers").split())
        enabled = set(wanted) & available
        for ctrl in [c for c in wanted if c not in available]:
            notes.append(f"the {ctrl} controller is not available in the cgroup v2 hierarchy at {parent} "
                         f"(it has: {' '.join(sorted(available)) or 'none'})")
        for d in (parent, job.parent):
            have = set(_read(d / "cgroup.subtree_control").split())
            for ctrl in [c for c in wanted if c not in have and c in enabled]:
                try:
                    _write(d / "cgroup.subtree_control", f"+{ctrl}")
                except OSError as e:
                    enabled.discard(ctrl)
                    hint = (": it has processes of its own (v2 allows controllers only for cgroups "
                            "without them; give the launcher a delegated cgroup)"
                            if e.errno == errno.EBUSY else "")
                    notes.append(f"cannot enable the {ctrl} controller below {d} ({e.strerror or e}{hint})")
        try:
            job.mkdir()
        except FileExistsError:
            raise CgroupUnavailable(f"{job} already exists") from None
        except FileNotFoundError:
            raise
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {job}: {e.strerror or e}") from e
        group = cls(layout, name, {"unified": job}, notes)
        if memory_max and "memory" in enabled:
            group._set(job / "memory.max", str(memory_max), "memory limit")
            if (job / "memory.swap.max").exists():
                group._set(job / "memory.swap.max", "0", "swap limit")
        if cpus and "cpuset" in enabled:
            group._set(job / "cpuset.cpus", format_cpus(cpus), "CPU set")
        return group

    @classmethod
    def _create_v1(cls, layout: CgroupLayout, name: str, memory_max: int | None,
                   cpus: Sequence[int]) -> JobCgroup:
        notes: list[str] = []
        dirs: dict[str, Path] = {}
        for ctrl, parent in layout.parents.items():
            job = parent / name
            try:
                created = not job.parent.exists()
                job.parent.mkdir(exist_ok=True)
                if ctrl == "cpuset" and (created or not _read(job.parent / "cpuset.cpus").strip()):
                    # A new v1 cpuset starts with no CPUs and no memory nodes: inherit them.
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        _write(job.parent / f, _read(parent / f).strip())
                job.mkdir()
                if ctrl == "cpuset":
                    wanted = set(cpus) or set(_parse_cpus(_read(job.parent / "cpuset.cpus")))
                    usable = wanted & set(_parse_cpus(_read(job.parent / "cpuset.cpus")))
                    _write(job / "cpuset.cpus", format_cpus(sorted(usable or wanted)))
                    _write(job / "cpuset.mems", _read(job.parent / "cpuset.mems").strip())
                dirs[ctrl] = job
            except FileExistsError:
                for d in dirs.values():
                    _rmdir_quiet(d)
                raise CgroupUnavailable(f"{job} already exists") from None
            except FileNotFoundError:
                for d in dirs.values():
                    _rmdir_quiet(d)
                raise
            except OSError as e:
                _rmdir_quiet(job)
                if ctrl == "memory":
                    for d in dirs.values():
                        _rmdir_quiet(d)
                    raise CgroupUnavailable(f"cannot create {job}: {e.strerror or e}") from e
                notes.append(f"cannot create the {ctrl} group {job} ({e.strerror or e})")
        group = cls(layout, name, dirs, notes)
        mem = dirs["memory"]
        if memory_max:
            group._set(mem / "memory.limit_in_bytes", str(memory_max), "memory limit")
            if (mem / "memory.memsw.limit_in_bytes").exists():  # memory+swap: no swapping past the limit
                try:
                    _write(mem / "memory.memsw.limit_in_bytes", str(memory_max))
                except OSError:
                    pass
        return group

    def _set(self, path: Path, value: str, what: str) -> None:
        try:
            _write(path, value)
        except OSError as e:
            self.notes.append(f"cannot set the {what} ({path.name}={value}: {e.strerror or e})")

    @property
    def memory_limited(self) -> bool:
        return bool(self.memory_max) and not any("memory" in n for n in self.notes)

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.dirs.values():
            for line in _read(d / "cgroup.procs").split():
                if line.isdigit():
                    out.add(int(line))
        return out

    def oom_kills(self) -> int:
        """Processes of the group the kernel's OOM killer has killed so far."""
        if self.version == 2:
            text = _read(self.dirs["unified"] / "memory.events")
        else:
            text = _read(self.dirs["memory"] / "memory.oom_control")
        m = re.search(r"^oom_kill (\d+)", text, re.MULTILINE)
        if m:
            return int(m.group(1))
        if self.version == 1 and _read(self.dirs["memory"] / "memory.failcnt").strip() not in ("", "0"):
            return 1  # an old kernel without the count: the limit was hit
        return 0

    def kill_all(self, timeout: float = 10.0) -> set[int]:
        """SIGKILL every process in the group until it is empty; the pids that were there."""
        killed: set[int] = set()
        kill_file = self.dirs.get("unified", Path("/nonexistent")) / "cgroup.kill"
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids or time.monotonic() > deadline:
                return killed
            killed |= pids
            if kill_file.exists():
                try:
                    _write(kill_file, "1")
                except OSError:
                    pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)

    def remove(self, timeout: float = 5.0) -> list[str]:
        """Remove the group (and ``aitrain/`` when no other job uses it); what is left behind."""
        left: list[str] = []
        for d in self.dirs.values():
            deadline = time.monotonic() + timeout
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        left.append(f"{d} ({e.strerror or e})")
                        break
                    time.sleep(0.05)
            _rmdir_quiet(d.parent)  # aitrain/: fails while other jobs have groups there
        return left


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# -- the agent side --------------------------------------------------------------------


class NodeResources:
    """The resources of one node's ranks, from before the first rank to after the last."""

    def __init__(self, plan: NodePlan, *, nproc: int, node_rank: int = 0) -> None:
        self.plan = plan
        self.nproc = nproc
        self.node_rank = node_rank
        self.cgroup: JobCgroup | None = None
        self.perf_events: list[str] = []
        self.perf_note = ""
        self.profiler = ""  # the profiler binary ranks run under; "" when profiling is off

    @classmethod
    def start(cls, plan: Mapping[str, Any] | NodePlan | None, *, nproc: int, node_rank: int = 0) -> NodeResources:
        """Create the cgroup and check the profiler before any rank starts."""
        plan = plan if isinstance(plan, NodePlan) else NodePlan.from_dict(plan or {})
        self = cls(plan, nproc=nproc, node_rank=node_rank)
        if plan.binding != "none" and len(plan.cpu_sets) != nproc:  # a node that planned nothing yet
            plan.cpu_sets, plan.binding_note = plan_cpu_sets(plan.binding, nproc)
            if plan.set_omp:
                plan.omp_threads = [len(s) for s in plan.cpu_sets]
        if plan.cgroup:
            self._start_cgroup()
        if plan.profile != "none":
            self._start_profiler()
        return self

    def _start_cgroup(self) -> None:
        plan = self.plan
        cpus = sorted({c for s in plan.cpu_sets for c in s})
        try:
            self.cgroup = JobCgroup.create(plan.cgroup_name, memory_max=plan.memory_max, cpus=cpus)
        except CgroupUnavailable as e:
            limit = (f"resources.memory_max={format_memory_size(plan.memory_max)} is not enforced, "
                     if plan.memory_max else "")
            warn(f"resources.cgroup=true, but cgroups are not writable here ({e}); running without "
                 f"a cgroup: {limit}teardown relies on the ranks' process groups")
            return
        notes = list(self.cgroup.notes)
        if plan.memory_max and not self.cgroup.memory_limited:
            notes.append(f"resources.memory_max={format_memory_size(plan.memory_max)} is not enforced")
        if notes:
            warn(f"job cgroup {plan.cgroup_name}: {'; '.join(notes)}")

    def _start_profiler(self) -> None:
        from aitrain.launcher import profiling

        plan = self.plan
        Path(plan.profile_dir).mkdir(parents=True, exist_ok=True)
        if plan.profile == "perf":
            tool = profiling.find_perf()
            if tool is None:
                warn("profile=perf, but perf is not installed (Debian: apt-get install linux-perf); "
                     "running without it")
                return
            supported, unsupported, error = profiling.probe_perf_events(tool)
            if error or not supported:
                warn(f"profile=perf, but perf stat cannot count here ({error or 'no event is supported'}); "
                     "running without it")
                return
            self.perf_events = supported
            if unsupported:
                self.perf_note = profiling.unsupported_note(unsupported, supported)
                note(f"perf: {self.perf_note}")
            self.profiler = tool
        else:
            tool = profiling.find_pyspy()
            if tool is None:
                warn("profile=pyspy, but py-spy is not installed (pip install py-spy); running without it")
                return
            self.profiler = tool

    def rank_env(self) -> dict[str, str]:
        """The environment every rank's trampoline reads its part of the plan from."""
        plan = self.plan
        rank_plan: dict[str, Any] = {}
        if plan.cpu_sets:
            rank_plan["cpu_sets"] = plan.cpu_sets
        if plan.omp_threads:
            rank_plan["omp_threads"] = plan.omp_threads
        if self.cgroup is not None:
            rank_plan["cgroup_procs"] = self.cgroup.procs_files
        if self.profiler:
            rank_plan["profile"] = {"kind": plan.profile, "tool": self.profiler, "dir": plan.profile_dir,
                                    "events": self.perf_events}
        return {RANK_PLAN_ENV: json.dumps(rank_plan)} if rank_plan else {}

    def oom_ranks(self, failures: Mapping[int, Any]) -> tuple[set[int], str]:
        """The failed ranks the kernel's OOM killer stopped, and the reason to print with them.

        A rank counts when it died of SIGKILL while the job's cgroup recorded OOM kills.
        Kills that hit no rank (a data-loader worker) give no ranks and a reason for the job.
        """
        kills = self.cgroup.oom_kills() if self.cgroup is not None else 0
        if not kills:
            return set(), ""
        assert self.cgroup is not None
        limit = format_memory_size(self.cgroup.memory_max) if self.cgroup.memory_max else "none"
        sigkilled = {r for r, f in failures.items() if getattr(f, "exitcode", None) == -signal.SIGKILL}
        if not sigkilled:
            return set(), (f"the kernel OOM killer killed {kills} process(es) in the job's cgroup "
                           f"(memory limit {limit})")
        reason = f"cgroup memory limit {limit} reached"
        if len(sigkilled) > kills:
            reason += f" ({kills} OOM kill(s) in the job's cgroup for {len(sigkilled)} SIGKILLed ranks)"
        return sigkilled, reason

    def stop(self) -> None:
        """After the ranks: kill what is left in the cgroup, remove it, collect the profiles."""
        if self.cgroup is not None:
            killed = self.cgroup.kill_all()
            left = self.cgroup.remove()
            if killed:
                note(f"killed {len(killed)} process(es) left in the job's cgroup at teardown "
                     f"(pids {', '.join(map(str, sorted(killed)))})")
            if left:
                warn(f"could not remove the job's cgroup: {'; '.join(left)}")
            self.cgroup = None
        if self.profiler:
            from aitrain.launcher import profiling

            ranks = [self.node_rank * self.nproc + i for i in range(self.nproc)]
            profiling.collect(self.plan.profile, Path(self.plan.profile_dir), ranks,
                              Path(self.plan.metrics_file) if self.plan.metrics_file else None,
                              note=self.perf_note, events=self.perf_events)
            self.profiler = ""


# -- the rank side (runs in the trampoline, before exec) ------------------------------


@dataclass
class RankProfile:
    kind: str
    tool: str
    dir: str
    events: list[str]


def apply_rank_plan(env: MutableMapping[str, str] | None = None) -> RankProfile | None:
    """Join the job's cgroup, set this rank's CPU affinity and OMP_NUM_THREADS.

    Reads (and removes) ``AITRAIN_RANK_PLAN`` from ``env``; returns the profiler
    to run the program under, if any. Raises OSError when the cgroup cannot be
    joined: a rank outside its memory limit must not run unnoticed.
    """
    env = os.environ if env is None else env
    raw = env.pop(RANK_PLAN_ENV, "")
    if not raw:
        return None
    plan = json.loads(raw)
    local = int(env.get("LOCAL_RANK", "0"))
    for procs in plan.get("cgroup_procs", []):
        _write(Path(procs), str(os.getpid()))  # a v1 cpuset join resets the affinity: join first
    cpu_sets = plan.get("cpu_sets") or []
    if local < len(cpu_sets) and cpu_sets[local]:
        os.sched_setaffinity(0, cpu_sets[local])
    omp = plan.get("omp_threads") or []
    if local < len(omp):
        env["OMP_NUM_THREADS"] = str(omp[local])
    prof = plan.get("profile")
    return RankProfile(**prof) if prof else None
