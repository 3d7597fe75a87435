"""backend=ray with no address and no running cluster: aitrain starts a Ray instance for the
job (loopback only) and shuts it down after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("ray")

from raycluster import TINY, aitrain, base_env, gcs_processes, ray_stop  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def no_cluster():
    ray_stop()
    yield
    ray_stop()


def test_no_cluster_starts_a_local_ray_and_stops_it(tmp_path: Path, no_cluster: None) -> None:
    before = set(gcs_processes())
    env = base_env(tmp_path)
    r = aitrain(["launch", "backend=ray", "nproc_per_node=2", "train.steps=3", *TINY], tmp_path, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "starting a local Ray instance for this job" in r.stdout
    assert "[rank0 node0]:step 3/3" in r.stdout
    run_dir = Path(next(line for line in r.stdout.splitlines() if "run dir" in line).split("run dir ")[1]
                   .split(";")[0])
    ranks = json.loads((run_dir / "ray-ranks.json").read_text())
    assert [x["node_ip"] for x in ranks["ranks"]] == ["127.0.0.1", "127.0.0.1"]  # nothing on the network
    assert ranks["rendezvous"].startswith("127.0.0.1:")
    assert (run_dir / "logs" / "node0" / "rank1.log").exists()
    assert "step 3/3" in (run_dir / "logs" / "node0" / "rank0.log").read_text()
    # Tracking stays in the launching process: one MLflow run with every step's loss.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("aitrain").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["backend"] == "ray"
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == 3
    # The instance is gone with the job.
    assert set(gcs_processes()) - before == set()
