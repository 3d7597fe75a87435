"""PyTorch's DDP tutorial program (distributed/ddp-tutorial-series/multinode.py, CPU version in
tests/frameworks/scripts/) on the real 2-node Slurm cluster, submitted from a login node as
the tutorial's reader would, with aitrain in place of torchrun:

    aitrain launch backend=slurm nnodes=2 nproc_per_node=1 -- multinode.py 2 1

The cluster is the Slurm tests' fixture ``cluster`` when a conftest.py provides it (one
cluster for every Slurm test file); otherwise this module starts the same cluster itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aitrain_testing import REPO, aitrain_argv, up_or_skip

sys.path.insert(0, str(REPO / "scripts"))
import slurm_cluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(600)]

WHY = slurm_cluster.available()
if WHY:
    pytest.skip(f"real Slurm cluster unavailable: {WHY}", allow_module_level=True)

MULTINODE = REPO / "tests" / "frameworks" / "scripts" / "multinode.py"


@pytest.fixture(scope="module")
def slurm(request: pytest.FixtureRequest) -> Iterator[Any]:
    try:
        shared = request.getfixturevalue("cluster")  # tests/slurm/conftest.py's, when it is there
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        yield shared
        return
    yield from up_or_skip(slurm_cluster.SlurmCluster(nodes=2, name="aitslm", base=217), "Slurm")


def aitrain(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(aitrain_argv() + args, cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)


def wait_done(handle: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = json.loads(aitrain(["status", handle, "--json"], cwd, env).stdout)
        if st["state"] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", ""):
            return st
        time.sleep(1)
    raise AssertionError(f"{handle} did not finish in {timeout}s: {st}")


def test_ddp_tutorial_multinode_on_two_slurm_nodes(slurm: Any, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(slurm.env())
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"

    r = aitrain(["launch", "backend=slurm", "nnodes=2", "nproc_per_node=1", "--", str(MULTINODE), "2", "1"],
                tmp_path, env)
    assert r.returncode == 0, r.stderr + r.stdout
    handle = next(w for w in r.stdout.split() if w.startswith("slurm://"))
    st = wait_done(handle, tmp_path, env)
    out = "\n".join(p.read_text(errors="replace") for p in Path(st["run_dir"]).glob("slurm-*.out"))
    assert st["state"] == "SUCCEEDED", out[-4000:]

    # One rank per node, each with half of the 2048 samples: 32 steps of 32 per epoch.
    for rank in (0, 1):
        for epoch in (0, 1):
            assert f"[GPU{rank}] Epoch {epoch} | Batchsize: 32 | Steps: 32" in out, out[-4000:]
    assert "Done | world size 2" in out
    # Rank 0 saved the tutorial's snapshot in the directory the job was launched from.
    import torch

    snapshot = torch.load(tmp_path / "snapshot.pt")
    assert snapshot["EPOCHS_RUN"] == 1 and set(snapshot["MODEL_STATE"]) == {"weight", "bias"}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aitrain")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    assert len(runs) == 1, "one MLflow run per launch"
    tags = runs[0].data.tags
    assert (tags["world_size"], tags["nodes"]) == ("2", "node1,node2"), tags
    assert runs[0].info.status == "FINISHED"


def test_lightning_on_two_slurm_nodes_sees_aitrains_ranks(slurm: Any, tmp_path: Path) -> None:
    """Lightning inside a Slurm job sees SLURM_* too; it must still take aitrain's ranks (one per
    node here: devices=1, num_nodes=2) and log into the launch's MLflow run."""
    if importlib.util.find_spec("lightning") is None:
        pytest.skip("lightning is not installed (pip install -c constraints.txt -e '.[test]')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(slurm.env())
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    report = tmp_path / "report"
    report.mkdir()
    script = REPO / "tests" / "frameworks" / "scripts" / "lightning_train.py"
    r = aitrain(["launch", "backend=slurm", "nnodes=2", "nproc_per_node=1", "--", str(script), "--steps", "10",
                 "--report-dir", str(report)], tmp_path, env)
    assert r.returncode == 0, r.stderr + r.stdout
    handle = next(w for w in r.stdout.split() if w.startswith("slurm://"))
    st = wait_done(handle, tmp_path, env)
    out = "\n".join(p.read_text(errors="replace") for p in Path(st["run_dir"]).glob("slurm-*.out"))
    assert st["state"] == "SUCCEEDED", out[-4000:]
    seen = [json.loads((report / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [(s["global_rank"], s["local_rank"], s["world_size"], s["num_nodes"]) for s in seen] == \
        [(0, 0, 2, 2), (1, 0, 2, 2)], seen
    assert {s["environment"] for s in seen} == {"TorchElasticEnvironment"}  # not Slurm's view (SLURM_PROCID...)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aitrain")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    assert len(runs) == 1 and {s["mlflow_run_id"] for s in seen} == {runs[0].info.run_id}
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 2  # steps 5 and 10
