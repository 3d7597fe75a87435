"""A real 2-node Ray cluster in network namespaces: ``ray start --head`` in one, a worker in the other.

Ray itself talks over the throttled management network (eth0); the hostname resolves to
127.0.0.1 on both nodes, so the ranks' gloo traffic only flows if aitrain probes each node,
tunes it (GLOO_SOCKET_IFNAME) and puts the rendezvous on node 0's fabric address (fab0).
The tests check that the bytes went over fab0.
"""

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


@pytest.fixture(scope="module")
def cluster():
    yield from netns_ray_cluster(hosts=2, name="aitr", base=218)


def check_two_node_job(r: subprocess.CompletedProcess[str], cluster: NetnsRay, before: dict[str, int],
                       steps: int) -> None:
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"[rank0 node0]:step {steps}/{steps}" in r.stdout
    assert "aitrain: ray: smoke all_reduce ok on 2 node(s)" in r.stdout  # proven before the ranks started
    line = next(x for x in r.stdout.splitlines() if x.startswith("aitrain: ray: 2 rank(s) on 2 node(s)"))
    assert "10.218.1.11" in line and "10.218.1.12" in line  # one rank per Ray node
    run_dir = Path(next(x for x in r.stdout.splitlines() if "; run dir " in x).split("run dir ")[1].split(";")[0])
    ranks = json.loads((run_dir / "ray-ranks.json").read_text())
    # The rendezvous is node 0's fabric address, never the hostname (127.0.0.1 here) or eth0.
    assert ranks["rendezvous"].startswith("10.218.2.")
    assert {t["env"]["GLOO_SOCKET_IFNAME"] for t in ranks["tuned"].values()} == {"fab0"}
    moved = {k: v - before[k] for k, v in cluster.fabric_bytes().items()}
    assert all(v > 200_000 for v in moved.values()), moved  # the gradients went over fab0
    assert (run_dir / "logs" / "node1" / "rank1.log").exists()
    preflight = json.loads((run_dir / "preflight.json").read_text())  # host checks of every Ray node
    assert {f["host"] for f in preflight["findings"] if f["id"].startswith("host-")} == {"node0", "node1"}


def test_two_node_ddp_driven_from_the_head_node(cluster: NetnsRay, tmp_path: Path) -> None:
    before = cluster.fabric_bytes()
    r = aitrain(["launch", "backend=ray", f"backend.address={cluster.gcs}", "nnodes=2", "nproc_per_node=1",
                 "+strategy=ddp", "train.steps=10", *TINY], tmp_path, base_env(tmp_path), timeout=300,
                prefix=cluster.head.nsenter())
    check_two_node_job(r, cluster, before, 10)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("aitrain").experiment_id])
    assert runs[0].data.tags["world_size"] == "2" and runs[0].data.tags["nnodes"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == 10


def test_two_node_fsdp_through_the_ray_client(cluster: NetnsRay, tmp_path: Path) -> None:
    before = cluster.fabric_bytes()
    r = aitrain(["launch", "backend=ray", f"backend.address={cluster.client}", "nnodes=2", "nproc_per_node=1",
                 "+strategy=fsdp", "train.steps=10", "tracking=none", *TINY], tmp_path, base_env(tmp_path),
                timeout=300)
    check_two_node_job(r, cluster, before, 10)
    assert "training fsdp on 2 rank(s)" in r.stdout
