"""The preflight every launch runs, whatever the backend: probe -> check -> gate -> tune -> smoke.

A backend provides the job's nodes as a :class:`NodeSet`: how to run one command on each node
(the probe: ``python -m aitrain.fabric.probe --host-check`` through ``srun``, a Ray actor,
or in this process), and how to start one process group per node (the smoke all_reduce,
through node agents or Ray actors). :func:`run_preflight` does the rest, the same for all:

probe   every node's topology and host findings, named after its job node;
check   :func:`aitrain.fabric.check` over the nodes together, plus the host findings;
        ``preflight.json`` in the run dir;
gate    errors stop the launch unless ``fabric.on_error=warn`` (one line says what was found);
tune    each node's NCCL/Gloo/OMP env with its reasons, and its address on the tuned interface
        (the rendezvous is the first node's: never a hostname, which may resolve to 127.0.0.1);
smoke   on several nodes: a short all_reduce with each node's tuned env; on failure the nodes
        are bisected and the bad ones named (``smoke.json``); the launch stops, or goes on
        without them with ``fabric.exclude_bad_nodes=true``.

Phase timings (``phase/probe_s`` ...) are recorded here, once. With ``run_dir=None`` (a dry
run) nothing is written anywhere.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aitrain.errors import BackendError, FabricError
from aitrain.launcher.nodes import Node, NodesRun, SmokeOutcome, decide_after_smoke, smoke_over
from aitrain.launcher.util import write_atomic

if TYPE_CHECKING:
    from aitrain.fabric.findings import Finding
    from aitrain.fabric.topology import Cluster, HostTopology
    from aitrain.launcher.config import JobConfig

PREFLIGHT_FILE = "preflight.json"
SMOKE_FILE = "smoke.json"


class NodeSet(ABC):
    """The nodes of one job, as one backend reaches them."""

    names: Sequence[str]  # job node names, node 0 first (unique even where hostnames are not)
    where: str = "on this host"  # for messages: "on 3 node(s)", "on 2 Ray node(s)"
    ranks_per_node: int = 1  # ranks on each node (threads and buffers are tuned for that many)
    probe_rendezvous: str | None = None  # the address the probe and check route to, when known
    say: str = "aitrain: "  # how the launch's own lines start on this backend ("aitrain: ray: ")

    @abstractmethod
    def probe(self, *, cache: bool = False, write_cache: bool = True) -> dict[str, dict[str, Any]]:
        """Every node's probe document (``aitrain.fabric.node.node_document``), by node name.
        ``cache``: reuse a cached probe of an unchanged host; ``write_cache=False``: store none."""

    def fallback_address(self, name: str) -> str | None:
        """Where the node is reached when no tuned interface has an address (None: unknown)."""
        return None

    def label(self, name: str) -> str:
        """How messages name the node (Ray: ``node0@10.0.0.1``, which machine it is)."""
        return name

    def smoke_facts(self) -> dict[str, Any]:
        """Extra facts about the nodes for ``smoke.json``."""
        return {}

    def precheck(self, names: list[str], env: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """{node: problem} for nodes whose own socket interface is missing or down."""
        raise NotImplementedError

    def run_groups(self, groups: list[list[str]], env: Mapping[str, Mapping[str, str]],
                   addresses: Mapping[str, str], timeout: float, run_dir: Path) -> list[NodesRun]:
        """The smoke all_reduce over each group of nodes at once (one process per node)."""
        raise NotImplementedError


class AgentNodes(NodeSet):
    """Nodes reached by running a command with a prefix (``srun -w node``, ``nsenter --net``, or
    nothing for this host): the smoke test starts one node agent per node."""

    def prefix(self, name: str) -> list[str]:
        return []

    def _node(self, name: str, env: Mapping[str, Mapping[str, str]],
              addresses: Mapping[str, str] | None = None) -> Node:
        return Node(name=name, address=(addresses or {}).get(name) or None, prefix=self.prefix(name),
                    env=dict(env.get(name, {})))

    def precheck(self, names: list[str], env: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        from aitrain.launcher.nodes import precheck_nodes

        return precheck_nodes([self._node(n, env) for n in names])

    def run_groups(self, groups: list[list[str]], env: Mapping[str, Mapping[str, str]],
                   addresses: Mapping[str, str], timeout: float, run_dir: Path) -> list[NodesRun]:
        from aitrain.launcher.nodes import SMOKE_STARTUP_S, run_groups, smoke_argv

        self._rounds = getattr(self, "_rounds", 0) + 1
        # One smoke rank per node, started without a node agent (one torch import per node, not two).
        return run_groups([[self._node(n, env, addresses) for n in g] for g in groups], smoke_argv(timeout),
                          nproc_per_node=1, timeout=timeout + SMOKE_STARTUP_S, rdzv_timeout=timeout,
                          run_dir=run_dir / f"round{self._rounds}", direct=True)


@dataclass
class Preflight:
    """What the pipeline found and decided for a job's nodes."""

    nodes: list[str]  # the nodes to launch on (without any the smoke test left out)
    hosts: list[HostTopology] = field(default_factory=list)  # probed, named after their job node
    findings: list[Finding] = field(default_factory=list)
    env: dict[str, dict[str, str]] = field(default_factory=dict)  # tuned env per node ({} without tuning)
    reasons: dict[str, str] = field(default_factory=dict)  # why each tuned variable has its value
    addresses: dict[str, str] = field(default_factory=dict)  # each node's address on its tuned interface
    interfaces: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)  # nodes the smoke test proved bad and left out
    smoke: SmokeOutcome | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rendezvous(self) -> str:
        return self.addresses.get(self.nodes[0], "") if self.nodes else ""

    def node_env(self, name: str) -> dict[str, str]:
        return dict(self.env.get(name, {}))

    def document(self) -> dict[str, Any]:
        return {"hosts": [h.to_dict() for h in self.hosts], "findings": [f.to_dict() for f in self.findings]}


def run_preflight(nodes: NodeSet, job: JobConfig, *, job_env: Mapping[str, str] | None = None,
                  run_dir: Path | None = None, trace_dir: str | None = None, use_cache: bool = False,
                  smoke: bool = True) -> Preflight:
    """Probe, check, gate, tune and smoke-test ``nodes`` for ``job``.

    ``run_dir``: where ``preflight.json``, ``smoke.json`` and the phase timings go (None: a dry
    run, nothing is written and no smoke test runs). ``use_cache``: probe and check through the
    per-host cache (this host only). ``smoke=False``: the caller runs the smoke test itself (Slurm's
    node agents run it before their ranks, and :func:`smoke_step` only when it fails)."""
    fabric = job.fabric
    names = list(nodes.names)
    pf = Preflight(nodes=names)
    multi = len(names) > 1
    if fabric.check or fabric.tune or (multi and not all(nodes.fallback_address(n) for n in names)):
        t0 = time.perf_counter()
        docs = nodes.probe(cache=use_cache, write_cache=run_dir is not None)
        cluster = cluster_of(docs, names)
        pf.hosts = list(cluster.hosts)
        pf.timings["probe"] = time.perf_counter() - t0
        if fabric.check:
            t1 = time.perf_counter()
            pf.findings = check_nodes(cluster, docs, job, nodes.probe_rendezvous,
                                      use_cache=use_cache, write_cache=run_dir is not None)
            pf.timings["check"] = time.perf_counter() - t1
            if run_dir is not None:
                write_atomic(run_dir / PREFLIGHT_FILE, json.dumps(pf.document(), indent=1))
            gate(pf.findings, fabric.on_error, nodes.where)
        t2 = time.perf_counter()
        tune_nodes(pf, cluster, nodes, job, trace_dir=trace_dir or (str(run_dir) if run_dir else None))
        pf.timings["tune"] = time.perf_counter() - t2
    else:
        pf.addresses = {n: nodes.fallback_address(n) or "" for n in names}
    if run_dir is not None:
        record_timings(pf, run_dir)
    if multi and fabric.smoke and smoke and run_dir is not None:
        smoke_step(pf, nodes, job, job_env or {}, run_dir)
    return pf


def record_timings(pf: Preflight, run_dir: Path, *, only: Sequence[str] | None = None) -> None:
    from aitrain.launcher.tracking import record_phase

    for name, seconds in pf.timings.items():
        if only is None or name in only:
            record_phase(run_dir, name, seconds)


def record(pf: Preflight, run_dir: Path) -> None:
    """Write what a dry-run-time preflight found, now that the job runs (local jobs)."""
    if pf.hosts or pf.findings:
        write_atomic(run_dir / PREFLIGHT_FILE, json.dumps(pf.document(), indent=1))
    record_timings(pf, run_dir)


def cluster_of(docs: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> Cluster:
    """Probe documents -> a Cluster whose hosts are named by job node (hostnames may all be
    the same, or resolve to 127.0.0.1; node names are unique)."""
    from aitrain.fabric.topology import Cluster, HostTopology

    hosts = []
    for name in names:
        h = HostTopology.from_dict(dict(docs[name]))
        h.hostname = name
        hosts.append(h)
    return Cluster(hosts=hosts)


def host_findings(docs: Mapping[str, Mapping[str, Any]]) -> list[Finding]:
    """The ``host_findings`` of each node's probe, each named after its node."""
    from aitrain.fabric.findings import Finding

    return [Finding.from_dict({**d, "host": node}) for node, doc in docs.items()
            for d in doc.get("host_findings") or []]


def check_nodes(cluster: Cluster, docs: Mapping[str, Mapping[str, Any]], job: JobConfig,
                rendezvous: str | None, *, use_cache: bool = False, write_cache: bool = True) -> list[Finding]:
    """Fabric findings across the nodes and each node's host findings, most severe first."""
    from aitrain.fabric.cache import FabricCache, preflight
    from aitrain.fabric.findings import sort_findings

    result = preflight(cluster.hosts, on_error="warn", expected_rate_gbps=job.fabric.expected_rate_gbps,
                       rendezvous=rendezvous, use_cache=use_cache,
                       cache=FabricCache(read_only=not write_cache) if use_cache else None)
    return sort_findings(list(result.findings) + host_findings(docs))


def gate(findings: Sequence[Finding], on_error: str, where: str) -> None:
    """Stop the launch on errors unless ``fabric.on_error=warn``; otherwise one line saying what
    was found (``where``: "on this host", "on 3 node(s)")."""
    from aitrain.fabric.cache import summarize_errors
    from aitrain.fabric.findings import Severity

    errors = [f for f in findings if f.severity is Severity.ERROR]
    warnings = [f for f in findings if f.severity is Severity.WARNING]
    if errors and on_error != "warn":
        raise FabricError(summarize_errors(errors, len({f.host for f in errors})),
                          "fix them (each has its own hint), or launch anyway with fabric.on_error=warn")
    if errors or warnings:
        print(f"aitrain: preflight: {len(errors)} error(s), {len(warnings)} warning(s) {where} "
              f"({', '.join(sorted({f.id for f in [*errors, *warnings]}))}); details: aitrain fabric check, "
              "aitrain host check", flush=True)


def tune_nodes(pf: Preflight, cluster: Cluster, nodes: NodeSet, job: JobConfig, *, trace_dir: str | None) -> None:
    """Each node's tuned env (applied only with ``fabric.tune``), reasons and address."""
    from aitrain.fabric.tune import tune_from_config

    names = list(nodes.names)
    multi = len(names) > 1
    tuned = tune_from_config(cluster, job.fabric, nproc_per_node=nodes.ranks_per_node, multi_host=multi,
                             dist_backend=job.dist_backend, trace_dir=trace_dir)
    for n in names:
        t = tuned[n]
        pf.addresses[n] = t.address or nodes.fallback_address(n) or ""
        pf.interfaces[n] = t.interface or ""
        if not job.fabric.tune:
            continue
        pf.env[n] = dict(t.env)
        for k, why in t.reasons.items():
            if multi:
                pf.reasons.setdefault(k, f"{n}: {why}")
            else:
                pf.reasons.setdefault(k, why if k in t.user_set else f"tuned: {why}")
    first = names[0]
    if multi and not pf.addresses[first]:
        raise BackendError(f"no usable interface with an address on {nodes.label(first)} for the rendezvous",
                           "check `aitrain fabric probe` on that node, or set fabric.interface=<name>")
    if multi and not tuned[first].address:
        print(f"{nodes.say}no tuned interface address on {nodes.label(first)}; rendezvous on "
              f"{pf.addresses[first]}", flush=True)


def smoke_env(pf: Preflight, job_env: Mapping[str, str], job: JobConfig) -> dict[str, dict[str, str]]:
    """The env each node's smoke process gets: the job env, the node's tuned env, fabric.env."""
    user = {str(k): str(v) for k, v in (job.fabric.env or {}).items()}
    # Not the job's own bookkeeping (run dir, metrics file): the smoke test is not the job.
    base = {k: v for k, v in job_env.items() if not k.startswith("AITRAIN_")}
    return {n: {**base, **pf.node_env(n), **user} for n in pf.nodes}


def smoke_step(pf: Preflight, nodes: NodeSet, job: JobConfig, job_env: Mapping[str, str], run_dir: Path) -> None:
    """The pre-launch smoke all_reduce over the nodes; bisection names bad nodes on failure.
    Raises FabricError naming them, unless ``fabric.exclude_bad_nodes=true`` leaves them out
    (``pf.nodes``/``pf.excluded`` say which)."""
    from aitrain.launcher.tracking import record_phase

    fabric = job.fabric
    t0 = time.perf_counter()
    by_label = {nodes.label(n): n for n in pf.nodes}
    env = {label: e for label, e in zip(by_label, smoke_env(pf, job_env, job).values(), strict=True)}
    addresses = {label: pf.addresses.get(n, "") for label, n in by_label.items()}
    timeout = float(fabric.smoke_timeout_s)
    out = run_dir / "smoke"
    labels = list(by_label)

    def run_groups(groups: list[list[str]]) -> list[NodesRun]:
        return nodes.run_groups([[by_label[x] for x in g] for g in groups],
                                {by_label[x]: env[x] for x in labels}, {by_label[x]: addresses[x] for x in labels},
                                timeout, out)

    def relabel(runs: list[NodesRun]) -> list[NodesRun]:
        for r in runs:
            r.nodes = [nodes.label(n) for n in r.nodes]
            r.results = {nodes.label(n): v for n, v in r.results.items()}
            r.exit_codes = {nodes.label(n): v for n, v in r.exit_codes.items()}
        return runs

    report = smoke_over(
        labels,
        precheck=lambda ls: {nodes.label(n): why for n, why in
                             nodes.precheck([by_label[x] for x in ls], {by_label[x]: env[x] for x in ls}).items()},
        run_full=lambda ls: relabel(run_groups([ls]))[0],
        run_groups=lambda gs: relabel(run_groups(gs)))
    pf.timings["smoke_test"] = time.perf_counter() - t0
    record_phase(run_dir, "smoke_test", pf.timings["smoke_test"])
    write_atomic(run_dir / SMOKE_FILE, json.dumps(
        {"ok": report.ok, "summary": report.describe(), "precheck": report.precheck, "bad": report.bad,
         "suspects": report.suspects, **nodes.smoke_facts(),
         "bisect": report.bisect.to_dict() if report.bisect is not None else None},  # type: ignore[attr-defined]
        indent=1))
    outcome = decide_after_smoke([Node(name=x) for x in labels], report,
                                 exclude_bad_nodes=bool(fabric.exclude_bad_nodes), min_nodes=1)
    pf.smoke = outcome
    if outcome.excluded:
        pf.excluded = [by_label[x] for x in outcome.excluded]
        pf.nodes = [n for n in pf.nodes if n not in pf.excluded]
    print(f"{nodes.say}{outcome.message}", flush=True)
