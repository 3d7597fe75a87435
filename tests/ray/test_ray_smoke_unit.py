"""The Ray backend's pre-launch smoke test without a cluster: the rank actor's one-off programs
(real child processes), and the driver's runner, bisection and exclusion over fake Ray nodes."""

from __future__ import annotations

import concurrent.futures as cf
import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray")

from aitrain.errors import FabricError  # noqa: E402
from aitrain.launcher.backends.ray.group import NodesExcluded, RankGroup  # noqa: E402
from aitrain.launcher.backends.ray.worker import RankActor  # noqa: E402

pytestmark = pytest.mark.timeout(120)


# -- the actor side: real processes ------------------------------------------------------------


def test_run_once_returns_the_exit_code_and_last_lines() -> None:
    actor = RankActor(0, 0, "node0", 0, {"JOB_VAR": "j"}, prespawn=False)
    r = actor.run_once("k", ["-c", "import os, sys; print(os.environ['JOB_VAR'], os.environ['X']); sys.exit(3)"],
                       {"X": "x"}, timeout=30)
    assert r == {"exit": 3, "lines": ["j x"], "node": "node0"}


def test_run_once_is_stopped_by_stop_once_and_by_its_timeout() -> None:
    actor = RankActor(0, 0, "node0", 0, prespawn=False)
    sleeper = ["-c", "import time; print('up', flush=True); time.sleep(600)"]
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(actor.run_once("g1", sleeper, {}, timeout=120)))
    t.start()
    deadline = time.monotonic() + 20
    while "g1" not in actor._once and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    actor.stop_once("g1")
    t.join(20)
    assert box["exit"] is None and time.monotonic() - t0 < 5
    t0 = time.monotonic()
    assert actor.run_once("g2", sleeper, {}, timeout=1)["exit"] is None and time.monotonic() - t0 < 10
    # a group stopped before this node got to start its part: nothing is started
    actor.stop_once("g3")
    assert actor.run_once("g3", sleeper, {}, timeout=120) == {"exit": None, "lines": [], "node": "node0"}


# -- the driver side: fake Ray, fake nodes --------------------------------------------------------


class FakeRay:
    """Just what the smoke runner uses: ``.remote`` calls run on threads, ``get`` and ``wait``."""

    def __init__(self) -> None:
        self.pool = cf.ThreadPoolExecutor(max_workers=32)

    def get(self, ref: cf.Future, timeout: float | None = None) -> Any:
        return ref.result(timeout)

    def wait(self, refs: list[cf.Future], num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
        done, rest = cf.wait(refs, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return list(done), list(rest)


class Method:
    def __init__(self, ray: FakeRay, fn: Any) -> None:
        self.ray, self.fn = ray, fn

    def remote(self, *args: Any) -> cf.Future:
        return self.ray.pool.submit(self.fn, *args)


class FakeNode:
    """One Ray node's first actor. ``silent``: its fabric looks fine but carries nothing (any
    all_reduce with it hangs until stopped); ``down``: its interface check fails."""

    registry: dict[str, set[str]] = {}

    def __init__(self, ray: FakeRay, label: str, silent: bool = False, down: bool = False) -> None:
        self.label, self.silent, self.down = label, silent, down
        self.stopped: set[str] = set()
        self.calls: list[tuple[str, dict[str, str]]] = []
        for name in ("run_once", "stop_once", "free_port"):
            setattr(self, name, Method(ray, getattr(self, f"_{name}")))

    def _free_port(self, address: str) -> int:
        return 29500

    def _stop_once(self, key: str) -> None:
        self.stopped.add(key)

    def _run_once(self, key: str, args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
        self.calls.append((key, env))
        if "precheck" in args:
            if self.down:
                return {"exit": 3, "lines": [f"aitrain smoke: interface fab0 is down on {self.label}"]}
            return {"exit": 0, "lines": []}
        FakeNode.registry.setdefault(key, set()).add(self.label)
        time.sleep(0.2)  # the whole group has started
        members = FakeNode.registry[key]
        if not any(n in members for n in SILENT):
            return {"exit": 0, "lines": ["aitrain smoke: all_reduce ok"]}
        if self.silent:  # gloo's timeout (smoke_timeout_s) hits the node that reaches no one first
            time.sleep(1.0)
            return {"exit": 1, "lines": ["RuntimeError: [gloo] Connection timed out"]}
        deadline = time.monotonic() + timeout
        while key not in self.stopped and time.monotonic() < deadline:  # the others wait to be stopped
            time.sleep(0.02)
        return {"exit": None, "lines": []}


SILENT: set[str] = set()


def make_group(tmp_path: Path, n: int, *, silent: int | None = None, down: int | None = None,
               exclude: bool = False) -> tuple[RankGroup, list[FakeNode]]:
    ray = FakeRay()
    fabric = SimpleNamespace(smoke=True, smoke_timeout_s=1.0, exclude_bad_nodes=exclude, env={"USER_SET": "1"},
                             check=True, tune=True)
    spec = SimpleNamespace(config=SimpleNamespace(fabric=fabric), env={"JOB": "1"}, run_dir=tmp_path,
                           nnodes=n, nproc_per_node=1, world_size=n, name="job")
    opts = SimpleNamespace(max_failures=0)
    group = RankGroup(ray, spec, opts, attempt=0, argv=[sys.executable, "x.py"], files={}, cwd=None,
                      out=lambda s: None)
    group.infos = [{"node_id": f"id{i}", "node_ip": f"10.0.1.{i + 1}"} for i in range(n)]
    nodes = [FakeNode(ray, f"node{i}@10.0.1.{i + 1}", silent=i == silent, down=i == down) for i in range(n)]
    SILENT.clear()
    SILENT.update(x.label for x in nodes if x.silent)
    group.actors = nodes
    group.tuned = {f"node{i}": {"interface": "fab0", "address": f"10.0.2.{i + 1}",
                                "env": {"GLOO_SOCKET_IFNAME": "fab0"}}
                   for i in range(n)}
    group.node_env = {i: {"GLOO_SOCKET_IFNAME": "fab0"} for i in range(n)}
    return group, nodes


def test_a_healthy_group_passes_with_each_nodes_env_and_the_first_nodes_tuned_address(tmp_path: Path) -> None:
    group, nodes = make_group(tmp_path, 3)
    outcome = group.smoke()
    assert outcome is not None and not outcome.excluded
    smoke = json.loads((tmp_path / "smoke.json").read_text())
    assert smoke["ok"] and smoke["bisect"] is None
    key, env = next(c for c in nodes[2].calls if c[0].startswith("smoke"))
    assert env["MASTER_ADDR"] == "10.0.2.1" and env["MASTER_PORT"] == "29500"  # node0's fabric address
    assert env["RANK"] == "2" and env["WORLD_SIZE"] == "3" and env["GLOO_SOCKET_IFNAME"] == "fab0"
    assert env["USER_SET"] == "1" and env["JOB"] == "1" and env["AITRAIN_NODE_NAME"] == "node2"


def test_a_silently_broken_node_is_found_by_bisection_and_stops_the_launch(tmp_path: Path) -> None:
    group, _ = make_group(tmp_path, 4, silent=2)
    with pytest.raises(FabricError) as e:
        group.smoke()
    assert "bad node(s): node2@10.0.1.3" in str(e.value)
    assert "fabric.exclude_bad_nodes=true" in e.value.hint
    smoke = json.loads((tmp_path / "smoke.json").read_text())
    assert smoke["bad"] == ["node2@10.0.1.3"] and len(smoke["bisect"]["rounds"]) <= 3  # log-depth


def test_exclude_bad_nodes_hands_the_ray_node_to_the_backend(tmp_path: Path) -> None:
    group, _ = make_group(tmp_path, 3, silent=0, exclude=True)
    with pytest.raises(NodesExcluded) as e:
        group.smoke()
    assert e.value.ray_node_ids == ["id0"] and e.value.job_nodes == 1
    assert "launching on the other 2 node(s)" in e.value.message


def test_a_node_whose_interface_is_down_is_named_without_an_all_reduce(tmp_path: Path) -> None:
    group, nodes = make_group(tmp_path, 3, down=1, exclude=True)
    with pytest.raises(NodesExcluded) as e:
        group.smoke()
    assert e.value.ray_node_ids == ["id1"]
    assert "interface fab0 is down on node1@10.0.1.2" in e.value.message
    assert not any(k.startswith("smoke") for k, _ in nodes[1].calls)  # the down node ran no smoke


def test_smoke_is_skipped_on_one_node_or_when_turned_off(tmp_path: Path) -> None:
    group, nodes = make_group(tmp_path, 1)
    assert group.smoke() is None and not nodes[0].calls
    group, nodes = make_group(tmp_path, 2)
    group.spec.config.fabric.smoke = False
    assert group.smoke() is None and not nodes[0].calls
