"""The driver side of ``backend=ray``: one group of rank actors, from placement to teardown.

One attempt of a job (:class:`RankGroup`):

1. a placement group with one bundle per node (``nproc_per_node`` x the per-worker
   resources), placed by ``backend.placement`` (spread | pack | strict_spread | strict_pack);
2. one :class:`~aitrain.launcher.backends.ray.worker.RankActor` per rank, ``nproc_per_node`` in
   each node's bundle;
3. the pipeline (:mod:`aitrain.launcher.pipeline`) over the Ray nodes (:class:`RayNodes`):
   the first actor on every Ray node probes that node's fabric, the nodes are checked and
   tuned together, and on several nodes a smoke all_reduce runs between them; the
   rendezvous is node 0's address on its tuned interface (never a hostname: here it
   resolves to 127.0.0.1 on every node);
4. every actor starts its rank (torch.distributed env + node env + job env), and the
   driver prints each rank's lines as ``[rank<N> <node>]: ...``;
5. the first rank to fail (non-zero exit, or its actor/node died) takes the group
   down: every rank is stopped, every actor killed, the placement group removed.

``backend.max_failures`` restarts (see :mod:`aitrain.launcher.backends.ray`) build a
new group; the built-in job resumes from its latest checkpoint (``resume=auto``). How each
rank ended is a :class:`~aitrain.launcher.failures.RankExit`, root cause first.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aitrain.errors import BackendError
from aitrain.launcher.backends.ray.worker import PROGRESS_MARK
from aitrain.launcher.failures import RankExit, error_line, exit_from_status, root_cause_first
from aitrain.launcher.node.logstream import Console, parse_ranks
from aitrain.launcher.nodes import NodesRun, SmokeOutcome
from aitrain.launcher.pipeline import NodeSet, Preflight, run_preflight, smoke_step
from aitrain.launcher.util import write_atomic

STRATEGIES = {"spread": "SPREAD", "pack": "PACK", "strict_spread": "STRICT_SPREAD", "strict_pack": "STRICT_PACK"}
ACTOR_START_TIMEOUT_S = 180.0  # worker processes start, import aitrain, answer info()
PROBE_TIMEOUT_S = 120.0


def node_name(node_rank: int) -> str:
    return f"node{node_rank}"


@dataclass(frozen=True)
class RankSlot:
    rank: int
    node_rank: int
    local_rank: int

    @property
    def node(self) -> str:
        return node_name(self.node_rank)


def rank_slots(nnodes: int, nproc_per_node: int) -> list[RankSlot]:
    return [RankSlot(n * nproc_per_node + i, n, i) for n in range(nnodes) for i in range(nproc_per_node)]


def worker_resources(opts: Any) -> dict[str, float]:
    """Resources one rank's actor holds (Ray's names: CPU, GPU, custom)."""
    res = {"CPU": float(opts.cpus_per_worker or 0), "GPU": float(opts.gpus_per_worker or 0)}
    for k, v in (opts.resources_per_worker or {}).items():
        res[str(k)] = float(v)
    return {k: v for k, v in res.items() if v}


def actor_options(opts: Any, spec: Any) -> dict[str, Any]:
    """Ray options of every rank actor: its resources, and the image it runs in
    (``container.image``: ``runtime_env={"image_uri": ...}``, merged over the job's runtime_env)."""
    res = worker_resources(opts)
    custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
    out: dict[str, Any] = {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0),
                           "resources": custom or None, "max_concurrency": 4, "max_restarts": 0}
    plan = getattr(spec, "container", None)
    if plan is not None:
        out["runtime_env"] = plan.ray_runtime_env(opts.runtime_env)
    return out


def node_bundles(opts: Any, nnodes: int, nproc_per_node: int) -> list[dict[str, float]]:
    per_worker = worker_resources(opts)
    if not per_worker:
        raise BackendError("backend.cpus_per_worker, gpus_per_worker and resources_per_worker are all 0: "
                           "Ray cannot place a worker that asks for nothing",
                           "give each worker at least a fraction of a CPU, e.g. backend.cpus_per_worker=0.5")
    return [{k: v * nproc_per_node for k, v in per_worker.items()} for _ in range(nnodes)]


class RankConsole(Console):
    """The launcher's console: ``[rank<N> <node>]:`` prefixes, ``log.ranks`` and ``log.dedup``."""

    def __init__(self, nodes: dict[int, str], **kw: Any) -> None:
        super().__init__(**kw)
        self.nodes = nodes

    def _emit(self, is_err: bool, prefix: str, text: str) -> None:
        node = self.nodes.get(int(prefix)) if prefix.isdigit() else None
        tag = f"rank{prefix} {node}" if node else f"rank{prefix}"
        (self.err if is_err else self.out).write(f"[{tag}]:{text}\n")


class NodesExcluded(Exception):
    """The smoke test proved Ray nodes bad and ``fabric.exclude_bad_nodes=true``: the backend
    places the job again without them (``job_nodes`` fewer job nodes; ``labels``: how the
    smoke test named them, ``node<k>@<Ray address>``)."""

    def __init__(self, message: str, ray_node_ids: list[str], job_nodes: int, labels: list[str] | None = None) -> None:
        super().__init__(message)
        self.message, self.ray_node_ids, self.job_nodes = message, ray_node_ids, job_nodes
        self.labels = labels or []


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RankGroup:
    """One attempt: placement group, actors, preflight, ranks, output, teardown."""

    def __init__(self, ray: Any, spec: Any, opts: Any, *, attempt: int, argv: list[str],
                 files: dict[str, str], cwd: str | None, out: Callable[[str], None] | None = None,
                 exclude_nodes: list[str] | None = None, env: Mapping[str, str] | None = None,
                 nnodes: int | None = None) -> None:
        self.ray, self.spec, self.opts, self.attempt = ray, spec, opts, attempt
        self.exclude_nodes = list(exclude_nodes or [])  # Ray node ids a smoke test proved bad
        self.argv, self.files, self.cwd = argv, files, cwd
        self.env = dict(spec.env if env is None else env)  # the job env of every rank
        self.nnodes = spec.nnodes if nnodes is None else nnodes  # fewer after bad nodes were left out
        self.world_size = self.nnodes * spec.nproc_per_node
        self.say = out or (lambda s: print(s, flush=True))
        self.slots = rank_slots(self.nnodes, spec.nproc_per_node)
        self.pg: Any = None
        self.actors: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.rendezvous: tuple[str, int] | None = None
        self.node_env: dict[int, dict[str, str]] = {}
        self.tuned: dict[str, dict[str, Any]] = {}  # Ray node name -> interface, address, env
        self.reasons: dict[str, str] = {}

    # -- 1. placement -------------------------------------------------------------------

    def place(self) -> None:
        from ray.util.placement_group import placement_group

        bundles = node_bundles(self.opts, self.nnodes, self.spec.nproc_per_node)
        strategy = STRATEGIES[self.opts.placement]
        kwargs: dict[str, Any] = {}
        if self.exclude_nodes:
            from ray.util.placement_group import NODE_ID_LABEL_KEY

            avoid = {NODE_ID_LABEL_KEY: f"!in({','.join(self.exclude_nodes)})"}
            kwargs["bundle_label_selector"] = [dict(avoid) for _ in bundles]
        self.pg = placement_group(bundles, strategy=strategy, name=f"{self.spec.name}-a{self.attempt}", **kwargs)
        try:
            self.ray.get(self.pg.ready(), timeout=self.opts.placement_timeout_s)
        except self.ray.exceptions.GetTimeoutError:
            raise BackendError(
                f"Ray could not place {len(bundles)} node bundle(s) of {bundles[0]} ({strategy}) within "
                f"{self.opts.placement_timeout_s:.0f}s; {self._cluster_summary()}",
                "lower nproc_per_node or backend.cpus_per_worker/gpus_per_worker, add nodes, or use "
                "backend.placement=pack (several job nodes may then share a Ray node)") from None

    def _cluster_summary(self) -> str:
        try:
            alive = [n for n in self.ray.nodes() if n.get("Alive")]
            total = self.ray.cluster_resources()
            free = self.ray.available_resources()
        except Exception:  # noqa: BLE001 - only for the message
            return "the cluster's resources are unknown"
        keys = sorted(k for k in total if not k.startswith(("node:", "memory", "object_store")))
        return (f"the cluster has {len(alive)} node(s); resources free/total: "
                + ", ".join(f"{k} {free.get(k, 0):g}/{total[k]:g}" for k in keys))

    # -- 2. actors ------------------------------------------------------------------------

    def start_actors(self) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from aitrain.launcher.backends.ray.worker import RankActor

        remote = self.ray.remote(RankActor)
        for s in self.slots:
            self.actors.append(remote.options(
                **actor_options(self.opts, self.spec),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=s.node_rank),
            ).remote(s.rank, s.node_rank, s.node, s.local_rank, dict(self.env), True, self.warm_imports()))
        try:
            self.infos = self.ray.get([a.info.remote() for a in self.actors], timeout=ACTOR_START_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            raise BackendError(f"the rank actors did not start within {ACTOR_START_TIMEOUT_S:.0f}s",
                               "is the cluster overloaded? `ray status` shows pending work") from None
        except self.ray.exceptions.RayError as e:
            raise BackendError(f"the rank actors could not start on the cluster: {_first_line(e)}",
                               "aitrain must be importable in the cluster's Python environment (install it "
                               "on every node, or ship it with backend.runtime_env)") from e
        try:  # the address Ray registered each node under (what `ray status` shows)
            ips = {n["NodeID"]: n["NodeManagerAddress"] for n in self.ray.nodes()}
        except Exception:  # noqa: BLE001
            ips = {}
        for info in self.infos:
            info["node_ip"] = ips.get(info["node_id"], info["node_ip"])

    def warm_imports(self) -> list[str]:
        """What each rank's interpreter imports before its program runs (see worker.warm_main)."""
        mods = ["torch", "torch.distributed", "torch._dynamo"]
        if self.argv[1:4] == ["-u", "-m", "aitrain.launcher.train"]:
            mods.append("aitrain.launcher.train")  # the built-in job's own imports (strategies, data)
        return mods

    # -- 3. the pipeline over the Ray nodes -------------------------------------------------

    def physical_nodes(self) -> list[tuple[str, list[int]]]:
        """Ray nodes in job order: (name, job node ranks on it). Named after their first job node."""
        order: dict[str, list[int]] = {}
        for s, info in zip(self.slots, self.infos, strict=False):
            ranks = order.setdefault(info["node_id"], [])
            if s.node_rank not in ranks:
                ranks.append(s.node_rank)
        return [(node_name(ranks[0]), ranks) for ranks in order.values()]

    def describe_nodes(self) -> str:
        """``node0@10.0.0.1, node1@10.0.0.2``: each job node and the Ray node it landed on."""
        ips: dict[str, str] = {}
        for s, info in zip(self.slots, self.infos, strict=False):
            ips.setdefault(s.node, info["node_ip"])
        return ", ".join(f"{n}@{ip}" for n, ip in ips.items())

    def preflight(self) -> Preflight:
        """Probe, check, tune and smoke-test the Ray nodes (:func:`run_preflight`); raises
        :class:`NodesExcluded` when the smoke test leaves nodes out."""
        nodes = RayNodes(self)
        pf = run_preflight(nodes, self.spec.config, job_env=self.env, run_dir=self.spec.run_dir)
        self.adopt(pf)
        if pf.hosts:
            self._write_json("probe.json", {"hosts": [h.to_dict() for h in pf.hosts]})
        self._exclude_if_needed(pf, nodes)
        return pf

    def adopt(self, pf: Preflight) -> None:
        """The pipeline's tuned env and addresses for this group's nodes and ranks."""
        phys = self.physical_nodes()
        first = phys[0][0]
        self.rendezvous = (pf.addresses.get(first) or self.infos[0]["node_ip"], 0)
        self.tuned = {name: {"interface": pf.interfaces.get(name, ""), "address": pf.addresses.get(name, ""),
                             "env": pf.node_env(name)} for name, _ in phys}
        self.node_env = {r: pf.node_env(name) for name, ranks in phys for r in ranks}
        self.reasons = dict(pf.reasons)

    def _exclude_if_needed(self, pf: Preflight, nodes: RayNodes) -> None:
        if not pf.excluded:
            return
        phys = self.physical_nodes()
        assert pf.smoke is not None
        raise NodesExcluded(pf.smoke.message, [nodes.ray_node(n) for n in pf.excluded],
                            sum(len(ranks) for name, ranks in phys if name in pf.excluded),
                            labels=[nodes.label(n) for n in pf.excluded])

    def smoke(self) -> SmokeOutcome | None:
        """The pre-launch smoke all_reduce alone, over the nodes as :attr:`tuned` has them: None
        when no smoke runs; raises :class:`~aitrain.errors.FabricError` naming bad nodes, or
        :class:`NodesExcluded` when ``fabric.exclude_bad_nodes=true`` leaves them out."""
        fabric = getattr(self.spec.config, "fabric", None)
        phys = self.physical_nodes()
        if len(phys) < 2 or (fabric is not None and not fabric.smoke):
            return None
        nodes = RayNodes(self)
        names = [name for name, _ in phys]
        pf = Preflight(nodes=names, env={n: dict((self.tuned.get(n) or {}).get("env") or {}) for n in names},
                       addresses={n: str((self.tuned.get(n) or {}).get("address") or nodes.fallback_address(n))
                                  for n in names})
        smoke_step(pf, nodes, self.spec.config, self.env, self.spec.run_dir)
        self._exclude_if_needed(pf, nodes)
        return pf.smoke

    # -- 4. ranks ---------------------------------------------------------------------------

    def node_job_env(self, node_rank: int) -> dict[str, str]:
        """The job env, the node's tuned env, and ``fabric.env`` (which always wins)."""
        env = dict(self.env)
        env.update(self.node_env.get(node_rank, {}))
        for k, v in (getattr(self.spec.config, "fabric", None) and self.spec.config.fabric.env or {}).items():
            env[str(k)] = str(v)
        return env

    def rank_env(self, s: RankSlot, port: int) -> dict[str, str]:
        spec = self.spec
        assert self.rendezvous is not None
        env = self.node_job_env(s.node_rank)
        env.update(
            RANK=str(s.rank), LOCAL_RANK=str(s.local_rank), WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(spec.nproc_per_node), GROUP_RANK=str(s.node_rank), NODE_RANK=str(s.node_rank),
            ROLE_RANK=str(s.rank), ROLE_WORLD_SIZE=str(self.world_size),
            MASTER_ADDR=self.rendezvous[0], MASTER_PORT=str(port),
            TORCHELASTIC_RUN_ID=f"{spec.name}-a{self.attempt}", TORCHELASTIC_RESTART_COUNT=str(self.attempt),
            TORCHELASTIC_MAX_RESTARTS=str(self.opts.max_failures),
            AITRAIN_NODE=s.node, AITRAIN_RESTART_COUNT=str(self.attempt),
        )
        if self.opts.gpus_per_worker:
            # Every rank of a node sees all of that node's GPUs (LOCAL_RANK picks one), as under
            # torchrun; Ray would give each actor only its own, which breaks NCCL's P2P paths.
            gpus = sorted({g for t, i in zip(self.slots, self.infos, strict=False) if t.node_rank == s.node_rank
                           for g in i["gpu_ids"]}, key=lambda g: (len(g), g))
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        return env

    def start_ranks(self) -> None:
        assert self.rendezvous is not None
        addr, _ = self.rendezvous
        port = self.ray.get(self.actors[0].free_port.remote(addr), timeout=60)
        self.rendezvous = (addr, port)
        refs = []
        for s, a in zip(self.slots, self.actors, strict=True):
            log_file = self.spec.log_dir / s.node / f"rank{s.rank}.log"
            refs.append(a.start.remote(self.argv, self.rank_env(s, port), str(log_file), self.cwd, self.files,
                                       sys.executable))
        try:
            pids = self.ray.get(refs, timeout=120)
        except self.ray.exceptions.RayError as e:
            raise BackendError(f"a rank could not start: {_first_line(e)}",
                               "check the rank program (script=...) and the cluster's Python environment") from e
        rows = [{"rank": s.rank, "node": s.node, "node_rank": s.node_rank, "local_rank": s.local_rank,
                 "ray_node_id": i["node_id"], "node_ip": i["node_ip"], "actor_id": i["actor_id"],
                 "worker_pid": i["pid"], "rank_pid": pid, "attempt": self.attempt}
                for s, i, pid in zip(self.slots, self.infos, pids, strict=True)]
        self._write_json("ray-ranks.json", {"rendezvous": f"{addr}:{port}", "attempt": self.attempt,
                                            "ranks": rows, "placement_group": self.pg.id.hex(),
                                            "tuned": self.tuned})

    # -- 5. output and failures -----------------------------------------------------------------

    def monitor(self) -> list[RankExit]:
        """Print every rank's lines until all ranks exit 0 (returns []) or one fails (returns
        the failed ranks, root cause first)."""
        cfg = self.spec.config
        log = getattr(cfg, "log", None)
        console = RankConsole({s.rank: s.node for s in self.slots},
                              ranks=parse_ranks(getattr(log, "ranks", "all")),
                              dedup=bool(getattr(log, "dedup", True)))
        pending = {a.poll.remote(0, 0.5): i for i, a in enumerate(self.actors)}
        failed: list[RankExit] = []
        try:
            while pending and not failed:
                # Wake for what the console holds (a folded line, a progress state) as well.
                wake = min(1.0, max(0.05, console.next_deadline() - time.monotonic()))
                ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=wake)
                console.tick()
                for ref in ready:
                    i = pending.pop(ref)
                    r, failure = self._take(i, ref, console)
                    if failure is not None:
                        failed.append(failure)
                    elif r["exit"] is None:  # still running: ask for the lines after these
                        pending[self.actors[i].poll.remote(r["cursor"], 0.5)] = i
            if failed:
                failed += self._drain(pending, console)
        finally:
            console.close()
        return root_cause_first(f if f.tail else _with_tail(f, self._tail(f.rank)) for f in failed)

    def _drain(self, pending: dict[Any, int], console: Console, wait_s: float = 1.0) -> list[RankExit]:
        """Other ranks that failed at about the same time (so the root cause can be told apart)."""
        ready, _ = self.ray.wait(list(pending), num_returns=len(pending), timeout=wait_s)
        taken = [self._take(pending.pop(ref), ref, console) for ref in ready]
        return [failure for _, failure in taken if failure is not None]

    def _take(self, i: int, ref: Any, console: Console) -> tuple[dict[str, Any], RankExit | None]:
        """One answer of actor ``i``'s ``poll``: its lines printed; a RankExit when the rank
        exited non-zero or lost its Ray worker."""
        s = self.slots[i]
        try:
            r = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            return {}, RankExit(s.rank, node=s.node, lost=f"lost its Ray worker ({_first_line(e)})",
                                ended_at=time.time())
        if r["dropped"]:
            console.line(s.rank, f"[{r['dropped']} line(s) skipped; the full output is in the rank's log file]", True)
        for is_err, text in r["lines"]:
            if text.startswith(PROGRESS_MARK):
                console.progress(s.rank, text[len(PROGRESS_MARK):], is_err)
            else:
                console.line(s.rank, text, is_err)
        if r["exit"] not in (None, 0):
            return r, exit_from_status(s.rank, r["exit"], node=s.node, ended_at=r["exited_at"] or time.time())
        return r, None

    def _tail(self, rank: int) -> list[str]:
        try:
            return list(self.ray.get(self.actors[rank].tail.remote(), timeout=5))
        except Exception:  # noqa: BLE001 - the actor may be gone
            path = self.spec.log_dir / self.slots[rank].node / f"rank{rank}.log"
            try:
                return path.read_text(errors="replace").splitlines()[-15:]
            except OSError:
                return []

    # -- 6. teardown ----------------------------------------------------------------------------

    def teardown(self, grace_s: float = 3.0) -> None:
        """Stop every rank, kill every actor, remove the placement group (idempotent)."""
        ray = self.ray
        if self.actors:
            refs = []
            for a in self.actors:
                try:
                    refs.append(a.stop.remote(grace_s))
                except Exception:  # noqa: BLE001 - a dead actor
                    pass
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=grace_s + 3)
            for a in self.actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
            self.actors = []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
            self.pg = None

    def record_timings(self, marks: list[tuple[str, float]]) -> None:
        """Phase durations of this attempt (``ray-timings.json``), and each node's time from the
        group's start to its ranks running, as the tracker's ``phase/rendezvous_s``."""
        phases = {name: round(t - marks[i - 1][1], 3) for i, (name, t) in enumerate(marks) if i}
        self._write_json("ray-timings.json", {"attempt": self.attempt, "phases_s": phases,
                                              "total_s": round(marks[-1][1] - marks[0][1], 3)})
        progress = self.spec.run_dir / "progress"
        progress.mkdir(exist_ok=True)
        for node in sorted({s.node for s in self.slots}):
            self._write_json(f"progress/agent-{node}.json",
                             {"node": node, "start": marks[0][1], "spawn": marks[-1][1],
                              "rendezvous_s": marks[-1][1] - marks[0][1]})

    def _write_json(self, name: str, doc: Any) -> None:
        try:
            write_atomic(self.spec.run_dir / name, json.dumps(doc, indent=1))
        except OSError:
            pass


def _with_tail(e: RankExit, tail: list[str]) -> RankExit:
    from dataclasses import replace

    return replace(e, tail=tuple(tail), error=e.error or error_line(tail))


class RayNodes(NodeSet):
    """A group's Ray nodes, as the pipeline reaches them: the first actor on each runs the
    probe (in its process) and the smoke test's one process per node."""

    PRECHECK_TIMEOUT_S = 60.0
    say = "aitrain: ray: "

    def __init__(self, group: RankGroup) -> None:
        self.group, self.ray = group, group.ray
        phys = group.physical_nodes()
        first_actor = {s.node_rank: i for i, s in reversed(list(enumerate(group.slots)))}
        self.names = [name for name, _ in phys]
        self.where = f"on {len(phys)} Ray node(s)"
        self.ranks_per_node = max(len(r) for _, r in phys) * group.spec.nproc_per_node
        self.actor_index = {name: first_actor[ranks[0]] for name, ranks in phys}
        self.calls = 0

    def _info(self, name: str) -> dict[str, Any]:
        return dict(self.group.infos[self.actor_index[name]])

    def actor(self, name: str) -> Any:
        return self.group.actors[self.actor_index[name]]

    def ray_node(self, name: str) -> str:
        return str(self._info(name)["node_id"])

    def fallback_address(self, name: str) -> str | None:
        return str(self._info(name)["node_ip"])

    def label(self, name: str) -> str:
        # Named for the user as ``node<k>@<Ray's address of it>``: job node names follow
        # placement, the address says which machine to fix or drain.
        return f"{name}@{self._info(name)['node_ip']}"

    def smoke_facts(self) -> dict[str, Any]:
        return {"ray_nodes": {self.label(n): self.ray_node(n) for n in self.names},
                "node_ips": {self.label(n): self.fallback_address(n) for n in self.names}}

    def probe(self, *, cache: bool = False, write_cache: bool = True) -> dict[str, dict[str, Any]]:
        refs = [self.actor(name).probe.remote(name) for name in self.names]
        try:
            docs = self.ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except self.ray.exceptions.RayError as e:
            raise BackendError(f"the fabric probe failed on a Ray node: {_first_line(e)}",
                               "run `aitrain fabric probe` on that node to see why") from e
        return dict(zip(self.names, docs, strict=True))

    def _env(self, name: str, env: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        return {**env.get(name, {}), "AITRAIN_NODE_NAME": name}

    def precheck(self, names: list[str], env: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """{node: problem} for nodes whose own socket interface is missing or down."""
        args = ["-m", "aitrain.fabric.bench_rank", "--mode", "precheck"]
        refs = [self.actor(n).run_once.remote(f"precheck-{n}", args, self._env(n, env), self.PRECHECK_TIMEOUT_S)
                for n in names]
        problems = {}
        for n, ref in zip(names, refs, strict=True):
            try:
                r = self.ray.get(ref, timeout=self.PRECHECK_TIMEOUT_S + 30)
            except Exception as e:  # noqa: BLE001 - a dead actor or node is a bad node
                problems[n] = f"the interface check could not run: {_first_line(e)}"
                continue
            if r["exit"] != 0:
                last = [x for x in r["lines"] if x.strip()]
                problems[n] = last[-1] if last else ("the interface check did not answer" if r["exit"] is None
                                                     else f"exit {r['exit']}")
        return problems

    def run_groups(self, groups: list[list[str]], env: Mapping[str, Mapping[str, str]],
                   addresses: Mapping[str, str], timeout: float, run_dir: Path) -> list[NodesRun]:
        """The smoke all_reduce over each group at once; a group is stopped at its first failure."""
        from aitrain.launcher.agent import AgentResult
        from aitrain.launcher.nodes import SMOKE_STARTUP_S, smoke_argv

        self.calls += 1
        deadline_s = timeout + SMOKE_STARTUP_S
        args = smoke_argv(timeout)[1:]  # the actor runs its own Python
        t0 = time.monotonic()
        pending: dict[Any, tuple[int, str]] = {}
        keys, runs = [], []
        for gi, group in enumerate(groups):
            key = f"smoke-{self.calls}-{gi}"
            keys.append(key)
            runs.append(NodesRun(nodes=list(group), run_dir=str(self.group.spec.run_dir)))
            master = addresses.get(group[0]) or self.fallback_address(group[0]) or ""
            try:
                port = int(self.ray.get(self.actor(group[0]).free_port.remote(master), timeout=60))
            except Exception as e:  # noqa: BLE001 - the first node cannot even bind its address
                runs[gi].results[group[0]] = AgentResult(False, 1, f"cannot bind {master}: {_first_line(e)}")
                continue
            for i, name in enumerate(group):
                rank_env = {**self._env(name, env), "RANK": str(i), "LOCAL_RANK": "0",
                            "WORLD_SIZE": str(len(group)), "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(i),
                            "MASTER_ADDR": master, "MASTER_PORT": str(port)}
                ref = self.actor(name).run_once.remote(key, args, rank_env, deadline_s)
                pending[ref] = (gi, name)
        failed: set[int] = {gi for gi, r in enumerate(runs) if r.results}
        for gi in failed:
            self._stop(groups[gi], keys[gi])
        deadline = t0 + deadline_s + 15
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=max(0.1, deadline - time.monotonic()))
            if not ready:
                break
            for ref in ready:
                gi, name = pending.pop(ref)
                try:
                    r = self.ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the actor or its node died
                    r = {"exit": 1, "lines": [f"lost its Ray worker ({_first_line(e)})"]}
                code = r["exit"]
                runs[gi].exit_codes[name] = code
                last = [x for x in r["lines"] if x.strip()]
                msg = last[-1] if last else ("timed out" if code is None else f"exit {code}")
                runs[gi].results[name] = AgentResult(code == 0, code if code is not None else 124, msg)
                if code != 0 and gi not in failed:
                    failed.add(gi)
                    self._stop(groups[gi], keys[gi])
        for _ref, (gi, _name) in pending.items():  # past the deadline: stop whoever is left
            runs[gi].timed_out = True
            runs[gi].exit_codes[_name] = None
            self._stop(groups[gi], keys[gi])
        elapsed = time.monotonic() - t0
        for gi, run in enumerate(runs):
            run.elapsed_s = elapsed
            run.ok = (not run.timed_out and len(run.exit_codes) == len(groups[gi])
                      and all(c == 0 for c in run.exit_codes.values()))
            if not run.ok and not run.timed_out and all(c is None or c == 0 for c in run.exit_codes.values()) \
                    and any(c is None for c in run.exit_codes.values()):
                run.timed_out = True  # every member that ended on its own was fine: the rest hung
        return runs

    def _stop(self, group: list[str], key: str) -> None:
        for name in group:
            try:
                self.actor(name).stop_once.remote(key)
            except Exception:  # noqa: BLE001 - a dead actor
                pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if line.strip() and not line.startswith(("Traceback", "  ")):
            return line.strip()[:500]
    return text[:500] or type(e).__name__


def run_group(ray: Any, request: Any, opts: Any, *, attempt: int, argv: list[str], files: dict[str, str],
              cwd: str | None, exclude_nodes: list[str] | None = None, nnodes: int | None = None) -> list[RankExit]:
    """One attempt, torn down whatever happens; returns its failed ranks ([] when every rank
    exited 0), root cause first.

    SIGTERM/SIGHUP (``ray job stop``, ``Job.cancel()``) and Ctrl-C tear the group down and
    raise :class:`Interrupted` (or KeyboardInterrupt).
    """
    spec = request.spec
    group = RankGroup(ray, spec, opts, attempt=attempt, argv=argv, files=files, cwd=cwd,
                      exclude_nodes=exclude_nodes, env=request.env, nnodes=nnodes)
    old: dict[int, Any] = {}

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    main = threading.current_thread() is threading.main_thread()
    if main:
        for stop_sig in (signal.SIGTERM, signal.SIGHUP):
            old[int(stop_sig)] = signal.signal(stop_sig, on_signal)
    try:
        marks = [("start", time.time())]
        group.place()
        marks.append(("placement_group", time.time()))
        group.start_actors()
        marks.append(("actors", time.time()))
        group.preflight()
        request.env_reasons.update({k: v for k, v in group.reasons.items() if k not in request.env_reasons})
        marks.append(("preflight", time.time()))
        group.start_ranks()
        marks.append(("ranks_started", time.time()))
        group.record_timings(marks)
        assert group.rendezvous is not None
        group.say(f"aitrain: ray: {group.world_size} rank(s) on {group.nnodes} node(s) ({group.describe_nodes()}), "
                  f"rendezvous {group.rendezvous[0]}:{group.rendezvous[1]}, attempt {attempt + 1}")
        return group.monitor()
    finally:
        # Teardown must not be interrupted by a second signal (or a second Ctrl-C).
        held = {int(sig): signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *old)} if main else {}
        try:
            from aitrain.launcher.preemption import agent_grace_s

            group.teardown(grace_s=agent_grace_s(spec.config, 3))  # a checkpoint on SIGTERM, if one is configured
        finally:
            for sig, h in held.items():
                signal.signal(sig, old.get(sig, h))


def job_config_for_attempt(config_file: Path, attempt: int, resume: str) -> tuple[Path, str]:
    """The config a restart runs: the job's, with ``resume: auto`` unless a resume path was given."""
    import yaml

    doc = yaml.safe_load(config_file.read_text()) or {}
    if resume in (None, "", "none"):
        doc["resume"] = "auto"
    path = config_file.with_name(f"job-attempt{attempt}.yaml")
    return path, yaml.safe_dump(doc, sort_keys=False)
