"""Running a rank program on a set of nodes: one node agent per node.

A :class:`Node` is a name, the address its peers reach it at, the argv prefix that
runs a command on it (``nsenter --net=/var/run/netns/X`` for a test-rig namespace;
``srun -w host`` or ``ssh host`` elsewhere; nothing for this host) and the env its
ranks get (the tuned env). :func:`run_on_nodes` starts
``python -m aitrain.launcher.agent REQ.json`` on every node with a static rendezvous
at the first node, waits, and stops every node of the group as soon as one fails or
the deadline passes. :class:`SmokeRunner` runs disjoint groups concurrently for the
bisection in :mod:`aitrain.fabric.smoke`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aitrain.errors import FabricError
from aitrain.fabric.topology import HostTopology
from aitrain.launcher.agent import AgentRequest, AgentResult
from aitrain.launcher.supervise import set_parent_death_signal
from aitrain.launcher.util import random_port

if TYPE_CHECKING:
    from aitrain.fabric.tune import TunedEnv

NETNS_DIR = "/var/run/netns"


@dataclass
class Node:
    name: str
    address: str | None = None
    """Where the other nodes reach this one (used when it is the group's first node)."""
    prefix: list[str] = field(default_factory=list)
    """argv prefix that runs a command on the node (empty: this host)."""
    env: dict[str, str] = field(default_factory=dict)


def netns_node(namespace: str, address: str | None = None, env: dict[str, str] | None = None) -> Node:
    """A test-rig host: a network namespace entered with ``nsenter --net``."""
    path = f"{NETNS_DIR}/{namespace}"
    if not os.path.exists(path):
        raise FabricError(f"network namespace {namespace} does not exist ({path})",
                          "create it first, e.g. `python scripts/netns_rig.py up --hosts 2`")
    return Node(name=namespace, address=address, prefix=["nsenter", f"--net={path}"], env=dict(env or {}))


def probe_argv(*, hostname: str | None = None, rendezvous: str | None = None, host_check: bool = False,
               cache: bool = False, python: str | None = None) -> list[str]:
    """The command that prints a node's probe document (``aitrain.fabric``'s entry point)."""
    argv = [python or sys.executable, "-m", "aitrain.fabric.probe"]
    if hostname:
        argv += ["--hostname", hostname]
    if rendezvous:
        argv += ["--rendezvous", rendezvous]
    return argv + (["--host-check"] if host_check else []) + (["--cache"] if cache else [])


def probe_node(node: Node, rendezvous: str | None = None, timeout: float = 120.0,
               hostname: str | None = None) -> HostTopology:
    """Probe a node by running the probe there; the host is named after the node
    unless ``hostname`` says otherwise (rig namespaces share one hostname)."""
    argv = [*node.prefix, *probe_argv(hostname=hostname or node.name, rendezvous=rendezvous)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FabricError(f"probing {node.name} failed: {e}", "check that the node is reachable") from e
    if out.returncode != 0:
        raise FabricError(f"probing {node.name} failed (exit {out.returncode}): {out.stderr.strip()[-500:]}",
                          "run `aitrain fabric probe` on the node to see the error")
    return HostTopology.from_dict(json.loads(out.stdout))


@dataclass
class NodesRun:
    """The outcome of one rank program over one group of nodes."""

    nodes: list[str]
    ok: bool = False
    timed_out: bool = False
    elapsed_s: float = 0.0
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    results: dict[str, AgentResult | None] = field(default_factory=dict)
    run_dir: str = ""

    def failure(self) -> str:
        if self.ok:
            return ""
        if self.timed_out:
            return f"timed out after {self.elapsed_s:.0f}s on {', '.join(self.nodes)}"
        # Root causes first: nodes that failed on their own, not the ones stopped after them.
        stopped = ("interrupted by", "exited with code -15", "exit 143")
        msgs = []
        for name, r in self.results.items():
            if r is not None and r.ok:
                continue
            text = r.message if r is not None and r.message else f"exit {self.exit_codes.get(name)}"
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            msgs.append((any(s in text for s in stopped), f"{name}: {lines[-1] if lines else text}"))
        own = [m for was_stopped, m in msgs if not was_stopped]
        return "; ".join(own or [m for _, m in msgs]) or "failed"


class _Started:
    def __init__(self, nodes: list[Node], procs: list[subprocess.Popen[bytes]], reqs: list[AgentRequest],
                 deadline: float, run_dir: Path) -> None:
        self.nodes, self.procs, self.reqs, self.deadline, self.run_dir = nodes, procs, reqs, deadline, run_dir
        self.t0 = time.monotonic()


def _direct_env(req: AgentRequest) -> dict[str, str]:
    """What torchrun's agent gives the one rank of a node, for a rank started without it."""
    return {**os.environ, **req.env, "RANK": str(req.node_rank), "GROUP_RANK": str(req.node_rank),
            "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": str(req.nnodes),
            "MASTER_ADDR": req.master_addr, "MASTER_PORT": str(req.master_port)}


def _start(nodes: Sequence[Node], argv: list[str], *, nproc_per_node: int, timeout: float,
           run_dir: Path, master_port: int | None, env: dict[str, str] | None,
           rdzv_timeout: float | None = None, direct: bool = False) -> _Started:
    """One node agent per node running ``argv`` as its ranks; with ``direct`` (one rank per
    node) ``argv`` itself per node, with the agent's rank variables: one interpreter that
    imports torch per node instead of two (the smoke test: seconds per node on busy hosts)."""
    if not nodes:
        raise FabricError("no nodes to run on", "pass at least one node")
    direct = direct and nproc_per_node == 1
    master = nodes[0].address or "127.0.0.1"
    port = master_port or random_port()
    run_id = f"aitrain-{uuid.uuid4().hex[:8]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    procs, reqs = [], []
    for i, node in enumerate(nodes):
        node_dir = run_dir / node.name
        node_dir.mkdir(parents=True, exist_ok=True)
        node_env = {**(env or {}), **node.env, "AITRAIN_NODE_NAME": node.name}
        req = AgentRequest(
            run_id=run_id, argv=argv, nproc_per_node=nproc_per_node, master_addr=master,
            master_port=port, log_dir=str(node_dir / "logs"), result_file=str(node_dir / "result.json"),
            env=node_env, nnodes=len(nodes), node_rank=i,
            rdzv_timeout=max(5, int(rdzv_timeout if rdzv_timeout is not None else timeout)),
            shutdown_timeout=2,
            # Its own node dir for everything the agent's services write (never a job's run dir,
            # which AITRAIN_RUN_DIR in the env may name).
            services={"run_dir": str(node_dir), "node": node.name},
        )
        req_file = node_dir / "request.json"
        req_file.write_text(req.to_json())
        command = [*node.prefix, *argv] if direct else \
            [*node.prefix, sys.executable, "-m", "aitrain.launcher.agent", str(req_file)]
        with open(node_dir / "agent.log", "wb") as log:
            procs.append(subprocess.Popen(
                command, env=_direct_env(req) if direct else None,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=set_parent_death_signal,
            ))
        reqs.append(req)
    return _Started(list(nodes), procs, reqs, time.monotonic() + timeout, run_dir)


def _stop(started: _Started, grace: float = 4.0) -> None:
    for p in started.procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    end = time.monotonic() + grace
    for p in started.procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _finish(started: _Started, timed_out: bool) -> NodesRun:
    run = NodesRun(nodes=[n.name for n in started.nodes], timed_out=timed_out,
                   elapsed_s=time.monotonic() - started.t0, run_dir=str(started.run_dir))
    for node, proc, req in zip(started.nodes, started.procs, started.reqs, strict=True):
        run.exit_codes[node.name] = proc.returncode
        run.results[node.name] = AgentResult.read(Path(req.result_file)) or _direct_result(proc.returncode, req)
    run.ok = not timed_out and all(c == 0 for c in run.exit_codes.values())
    return run


def _direct_result(code: int | None, req: AgentRequest) -> AgentResult | None:
    """A rank started without an agent (``direct``) leaves no result file: its exit code and
    the last line it printed stand in for one."""
    if code is None or code == 0:
        return None
    try:
        lines = [ln.strip() for ln in (Path(req.result_file).parent / "agent.log").read_text(
            errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    what = f"exited with code {code}"
    if code < 0:
        try:
            what = f"interrupted by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return AgentResult(False, code if code > 0 else 128 - code, f"{what}: {lines[-1]}" if lines else what)


def wait_all(groups: list[_Started], poll: float = 0.05) -> list[NodesRun]:
    """Wait for every group; a group is stopped at its first failure or its deadline."""
    done: dict[int, NodesRun] = {}
    while len(done) < len(groups):
        for i, g in enumerate(groups):
            if i in done:
                continue
            codes = [p.poll() for p in g.procs]
            failed = any(c not in (None, 0) for c in codes)
            expired = time.monotonic() > g.deadline
            if all(c is not None for c in codes) or failed or expired:
                timed_out = expired and not failed and any(c is None for c in codes)
                _stop(g)
                done[i] = _finish(g, timed_out)
        if len(done) < len(groups):
            time.sleep(poll)
    return [done[i] for i in range(len(groups))]


def run_on_nodes(nodes: Sequence[Node], argv: list[str], *, nproc_per_node: int = 1, timeout: float = 120.0,
                 run_dir: str | os.PathLike[str], master_port: int | None = None,
                 env: dict[str, str] | None = None, rdzv_timeout: float | None = None) -> NodesRun:
    """Run ``argv`` as a torchrun-style job over ``nodes`` (rendezvous at the first).
    ``timeout``: the whole run; ``rdzv_timeout``: how long agents wait for each other."""
    started = _start(nodes, argv, nproc_per_node=nproc_per_node, timeout=timeout, run_dir=Path(run_dir),
                     master_port=master_port, env=env, rdzv_timeout=rdzv_timeout)
    try:
        return wait_all([started])[0]
    except BaseException:
        _stop(started)
        raise


def run_groups(groups: Sequence[Sequence[Node]], argv: list[str], *, nproc_per_node: int = 1,
               timeout: float = 120.0, run_dir: str | os.PathLike[str],
               env: dict[str, str] | None = None, rdzv_timeout: float | None = None,
               direct: bool = False) -> list[NodesRun]:
    """Run ``argv`` over several disjoint groups at once, one job per group (``direct``: see :func:`_start`)."""
    started: list[_Started] = []
    try:
        for i, group in enumerate(groups):
            started.append(_start(group, argv, nproc_per_node=nproc_per_node, timeout=timeout,
                                  run_dir=Path(run_dir) / f"group{i}", master_port=None, env=env,
                                  rdzv_timeout=rdzv_timeout, direct=direct))
        return wait_all(started)
    except BaseException:
        for s in started:
            _stop(s)
        raise


SMOKE_STARTUP_S = 30.0  # on top of the smoke timeout: agents and ranks start (torch import) on busy nodes


def smoke_argv(timeout: float) -> list[str]:
    return [sys.executable, "-u", "-m", "aitrain.fabric.bench_rank", "--mode", "smoke",
            "--timeout", f"{timeout:g}"]


def precheck_nodes(nodes: Sequence[Node], timeout: float = 30.0) -> dict[str, str]:
    """{node: problem} for nodes whose own socket interface is missing or down (a light
    process per node, no torch): they cannot take part, whatever the others do."""
    procs = []
    for node in nodes:
        env = {**os.environ, **node.env, "AITRAIN_NODE_NAME": node.name}
        procs.append(subprocess.Popen(
            [*node.prefix, sys.executable, "-m", "aitrain.fabric.bench_rank", "--mode", "precheck"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    problems = {}
    for node, proc in zip(nodes, procs, strict=True):
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            problems[node.name] = f"the interface check did not answer within {timeout:g}s"
            continue
        if proc.returncode != 0:
            problems[node.name] = (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return problems


GroupsRunner = Callable[[list[list[str]]], list[NodesRun]]
"""Runs the smoke program over several disjoint groups of node names at once."""


def agent_groups_runner(nodes: dict[str, Node], run_dir: Path, timeout: float,
                        nproc_per_node: int = 1) -> GroupsRunner:
    """Smoke groups run by one node agent per node (nsenter, srun, or this host)."""
    rounds = iter(range(1, 1 << 30))

    def run(groups: list[list[str]]) -> list[NodesRun]:
        return run_groups([[nodes[n] for n in g] for g in groups], smoke_argv(timeout),
                          nproc_per_node=nproc_per_node, timeout=timeout + SMOKE_STARTUP_S,
                          rdzv_timeout=timeout, run_dir=run_dir / f"round{next(rounds)}", direct=True)

    return run


@dataclass
class SmokeRunner:
    """``run_groups`` for :func:`aitrain.fabric.smoke.find_bad_nodes` over real nodes.
    Groups holding a node whose precheck failed fail at once, without starting anything."""

    run: GroupsRunner
    failed_precheck: dict[str, str] = field(default_factory=dict)
    runs: list[NodesRun] = field(default_factory=list)
    rounds: int = 0

    def __call__(self, groups: list[list[str]]) -> list[bool]:
        self.rounds += 1
        live = [g for g in groups if not set(g) & set(self.failed_precheck)]
        runs = self.run(live) if live else []
        self.runs.extend(runs)
        by_group = {tuple(g): r.ok for g, r in zip(live, runs, strict=False)}
        return [by_group.get(tuple(g), False) for g in groups]


@dataclass
class SmokeReport:
    """The smoke test over a job's nodes, and (on failure) what was found."""

    nodes: list[str]
    precheck: dict[str, str] = field(default_factory=dict)
    """Nodes whose own socket interface is missing or down, and why."""
    full: NodesRun | None = None
    """The smoke all_reduce over every node (that passed the precheck)."""
    bisect: object = None  # aitrain.fabric.smoke.BisectResult | None

    @property
    def ok(self) -> bool:
        return not self.precheck and self.full is not None and self.full.ok

    @property
    def bad(self) -> list[str]:
        found = set(self.precheck) | set(getattr(self.bisect, "bad", []) or [])
        return [n for n in self.nodes if n in found]

    @property
    def suspects(self) -> list[str]:
        return [n for n in getattr(self.bisect, "suspects", []) or [] if n not in self.precheck]

    @property
    def unresolved(self) -> bool:
        """Failed, and not (only) because of proven-bad nodes."""
        if self.ok:
            return False
        if self.bisect is not None:
            return bool(self.suspects) or bool(getattr(self.bisect, "flaky", False))
        return not self.bad or (self.full is not None and not self.full.ok)

    def describe(self) -> str:
        if self.ok:
            return f"smoke all_reduce ok on {len(self.nodes)} node(s)"
        parts = [f"{n}: {why}" for n, why in self.precheck.items()]
        if self.bisect is not None:
            parts.append(self.bisect.describe())  # type: ignore[attr-defined]
        elif self.full is not None and not self.full.ok:
            parts.append(f"smoke all_reduce failed: {self.full.failure()}")
        elif self.full is not None:
            parts.append(f"smoke all_reduce ok on the other {len(self.full.nodes)} node(s)")
        return "; ".join(parts)


def smoke_test(nodes: Sequence[Node], run_dir: str | os.PathLike[str], *, timeout: float = 30.0,
               nproc_per_node: int = 1, bisect: bool = True) -> SmokeReport:
    """The pre-launch smoke test: each node checks its own socket interface; a short
    all_reduce then runs over every node that passed; when it fails or times out the
    nodes are bisected to the bad one(s) (:func:`aitrain.fabric.smoke.find_bad_nodes`)."""
    run_dir = Path(run_dir)
    by_name = {n.name: n for n in nodes}
    full = agent_groups_runner(by_name, run_dir / "smoke-all", timeout, nproc_per_node)
    return smoke_over([n.name for n in nodes], precheck=lambda names: precheck_nodes([by_name[n] for n in names]),
                      run_full=lambda names: full([names])[0],
                      run_groups=agent_groups_runner(by_name, run_dir / "bisect", timeout, nproc_per_node),
                      bisect=bisect)


def smoke_over(names: Sequence[str], *, precheck: Callable[[list[str]], dict[str, str]],
               run_full: Callable[[list[str]], NodesRun], run_groups: GroupsRunner,
               bisect: bool = True) -> SmokeReport:
    """:func:`smoke_test` for any way of running things on nodes (agents, Ray actors):
    ``precheck(names) -> {name: problem}``, ``run_full(names)`` the smoke over them all,
    ``run_groups(groups)`` disjoint groups at once for the bisection."""
    from aitrain.fabric.smoke import find_bad_nodes

    report = SmokeReport(nodes=list(names), precheck=precheck(list(names)))
    rest = [n for n in names if n not in report.precheck]
    if len(rest) < 2:
        if len(names) == 1 and not report.precheck:  # one node: the all_reduce stays on it
            report.full = run_full(list(names))
        return report
    report.full = run_full(rest)
    if not report.full.ok and bisect:
        report.bisect = find_bad_nodes(rest, SmokeRunner(run_groups), initial_passed=False)
    return report


# --------------------------------------------------------------------------- launch gate


@dataclass
class SmokeOutcome:
    """What a multi-node launch does after the smoke test."""

    nodes: list[Node]
    """The nodes to launch on (all of them, or without the excluded ones)."""
    excluded: list[str] = field(default_factory=list)
    message: str = ""
    bisect: object = None  # aitrain.fabric.smoke.BisectResult | None


def decide_after_smoke(nodes: Sequence[Node], report: SmokeReport, *, exclude_bad_nodes: bool = False,
                       min_nodes: int = 1) -> SmokeOutcome:
    """Go on with every node, go on without the proven-bad ones, or raise
    :class:`FabricError` naming them. Pure: the runs are done by :func:`smoke_test`."""
    if report.ok:
        return SmokeOutcome(nodes=list(nodes), message=report.describe())
    described = report.describe()
    bad = report.bad
    if bad and not report.unresolved and exclude_bad_nodes:
        keep = [n for n in nodes if n.name not in bad]
        if len(keep) >= max(1, min_nodes):
            return SmokeOutcome(nodes=keep, excluded=bad, bisect=report.bisect,
                                message=f"{described}; launching on the other {len(keep)} node(s) "
                                        f"(fabric.exclude_bad_nodes=true)")
        raise FabricError(f"{described}; only {len(keep)} node(s) left, the job needs {min_nodes}",
                          f"fix or drain {', '.join(bad)} and launch again")
    names = ", ".join(bad or report.suspects) or "the nodes named above"
    raise FabricError(f"the smoke test failed: {described}",
                      f"fix or drain {names} (`aitrain fabric check` on it), or launch with "
                      f"fabric.exclude_bad_nodes=true to leave proven-bad nodes out")


def smoke_gate(nodes: Sequence[Node], run_dir: str | os.PathLike[str], *, timeout: float = 30.0,
               exclude_bad_nodes: bool = False, nproc_per_node: int = 1, min_nodes: int = 1) -> SmokeOutcome:
    """The pre-launch smoke test for a multi-node job: smoke, bisect on failure, decide."""
    report = smoke_test(nodes, run_dir, timeout=timeout, nproc_per_node=nproc_per_node)
    return decide_after_smoke(nodes, report, exclude_bad_nodes=exclude_bad_nodes, min_nodes=min_nodes)


def apply_tuned(nodes: Sequence[Node], tuned: dict[str, TunedEnv], hosts: Sequence[HostTopology]) -> None:
    """Give each node its tuned env, and its address on the chosen interface."""
    for node, host in zip(nodes, hosts, strict=False):
        t = tuned.get(host.hostname)
        if t is None:
            continue
        node.env = dict(t.env)
        if node.prefix and t.address:
            node.address = t.address
