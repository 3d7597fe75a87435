"""The pre-launch smoke all_reduce of ``backend=ray`` on a real 3-node Ray cluster in network
namespaces: node 3's fabric cable is out (its interface stays up, so probe, check and tune
see nothing wrong), the smoke test fails, bisection names that node, and with
``fabric.exclude_bad_nodes=true`` the job is placed again on the other two Ray nodes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("ray")

import netns_rig  # noqa: E402
from raycluster import TINY, NetnsRay, aitrain, base_env, netns_ray_cluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(600)]

WHY = netns_rig.available()
if WHY:
    pytest.skip(f"network namespaces unavailable: {WHY}", allow_module_level=True)

UNPLUGGED = "10.219.1.13"  # Ray's address of the third namespace (the management network)
# a batch that splits over 3 ranks and over the 2 that are left
TINY_12 = [o for o in TINY if not o.startswith("train.global_batch_size")] + ["train.global_batch_size=12"]
SMOKE = ["fabric.smoke_timeout_s=10", "backend.placement=strict_spread"]


@pytest.fixture(scope="module")
def cluster():
    for c in netns_ray_cluster(hosts=3, name="aitq", base=219):
        # Unplug node 3's fabric cable: its fab0 stays up, nothing reaches it.
        subprocess.run(["ip", "link", "set", "aitq3f", "nomaster"], check=True)
        yield c


def run_dir_of(stdout: str) -> Path:
    return Path(next(x for x in stdout.splitlines() if "; run dir " in x).split("run dir ")[1].split(";")[0])


def test_a_silently_broken_node_is_named_and_the_job_does_not_start(cluster: NetnsRay, tmp_path: Path) -> None:
    r = aitrain(["launch", "backend=ray", f"backend.address={cluster.gcs}", "nnodes=3", "nproc_per_node=1",
                 "train.steps=3", "tracking=none", *SMOKE, *TINY_12], tmp_path, base_env(tmp_path), timeout=400,
                prefix=cluster.head.nsenter())
    assert r.returncode != 0, r.stdout[-3000:]
    assert "; run dir " in r.stdout, r.stderr[-3000:]
    smoke = json.loads((run_dir_of(r.stdout) / "smoke.json").read_text())
    assert not smoke["ok"] and [smoke["node_ips"][n] for n in smoke["bad"]] == [UNPLUGGED], smoke
    bad = smoke["bad"][0]  # job node names follow placement: any of node0..node2
    assert "the smoke test failed" in r.stderr and f"bad node(s): {bad}" in r.stderr, r.stderr[-3000:]
    assert "fabric.exclude_bad_nodes=true" in r.stderr  # the way out is named
    assert "step 1/" not in r.stdout  # no rank of the job ever ran


def test_exclude_bad_nodes_places_the_job_on_the_other_two(cluster: NetnsRay, tmp_path: Path) -> None:
    r = aitrain(["launch", "backend=ray", f"backend.address={cluster.gcs}", "nnodes=3", "nproc_per_node=1",
                 "train.steps=3", "tracking=none", "fabric.exclude_bad_nodes=true", *SMOKE, *TINY_12],
                tmp_path, base_env(tmp_path), timeout=400, prefix=cluster.head.nsenter())
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert "bad node(s): node" in r.stdout and "launching on the other 2 node(s)" in r.stdout
    assert "smoke all_reduce ok on 2 node(s)" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("aitrain: ray: 2 rank(s) on 2 node(s)"))
    assert UNPLUGGED not in line  # the unplugged node is left out
    assert "[rank0 node0]:step 3/3" in r.stdout
    world = json.loads((run_dir_of(r.stdout) / "world.json").read_text())  # what the MLflow tags follow
    assert (world["nnodes"], world["world_size"]) == (2, 2), world
    assert [x.split("@")[1] for x in world["excluded_nodes"]] == [UNPLUGGED], world
