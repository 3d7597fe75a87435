"""A real `mlflow server` (loopback, sqlite backend, local artifact store): the record goes through
its REST API, and stopping it mid-run and starting it again loses no metric."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aitrain_testing import REPO, MlflowServer, aitrain_argv, run_aitrain, wait_until

JOB = REPO / "tests" / "scripts" / "progress_job.py"
HOST = os.uname().nodename
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def metric_steps(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def test_server_goes_away_mid_run_and_no_metric_is_lost(server: MlflowServer, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    gates = tmp_path / "gates"
    gates.mkdir()
    out = open(tmp_path / "out.txt", "w")
    env = dict(os.environ, STEPS="30", STEP_SLEEP="0.02", GATE_DIR=str(gates), GATE_STEPS="10,20")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(aitrain_argv() + ["launch", f"script={JOB}", "fabric=off", "nproc_per_node=2",
                                              f"tracking.uri={server.uri}", "tracking.system_metrics_interval_s=0.3"],
                            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        client = MlflowClient(tracking_uri=server.uri)

        def run_with_steps(n: int):  # type: ignore[no-untyped-def]
            exp = client.get_experiment_by_name("aitrain")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= n:
                return runs[0]
            return None

        run = wait_until(lambda: run_with_steps(10), 90, "the first 10 steps in MLflow")
        run_dir = Path(run.data.tags["aitrain.run_dir"])
        server.stop()
        (gates / "gate10").touch()  # steps 11-20 while the server is away
        wait_until(lambda: metric_steps(run_dir / "metrics.jsonl") >= 20, 90, "step 20")
        wait_until(lambda: "unreachable" in (tmp_path / "out.txt").read_text(), 60, "the tracker to notice")
        server.start()
        (gates / "gate20").touch()  # steps 21-30 after it is back
        assert proc.wait(180) == 0, (tmp_path / "out.txt").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
    output = (tmp_path / "out.txt").read_text()
    assert "is back" in output and "incomplete" not in output

    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss", "tokens_per_s", "step_time_s", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(1, 31)), (key, steps)
    samples = [json.loads(line) for line in (run_dir / f"system-{HOST}.jsonl").read_text().splitlines()]
    cpu = client.get_metric_history(run.info.run_id, f"system/{HOST}/mem_total_mib")
    assert len(cpu) == len(samples) >= 3
    assert {"phase/startup_s", "phase/pg_init_s", "phase/first_step_s", "phase/rendezvous_s",
            "phase/steady_step_s"} <= set(run.data.metrics)
    assert run.data.params["nproc_per_node"] == "2" and run.data.tags["nodes"] == HOST
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "logs")}
    assert {"logs/rank0.log", "logs/rank1.log"} <= artifacts  # through the server's artifact proxy
    assert (server.root / "artifacts").is_dir()


def test_runs_lists_a_servers_runs_through_its_rest_api(server: MlflowServer, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from aitrain.launcher.cli.runs import summarize
    from aitrain.launcher.runstore import ClientRuns, RestRuns, open_runs

    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name("rest-check") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("rest-check")
    for i in range(3):
        run = client.create_run(exp_id, run_name=f"r{i}", tags={"strategy": "fsdp", "world_size": "4"})
        client.log_metric(run.info.run_id, "steady/tokens_per_s", 1000.0 * (i + 1))
        client.set_terminated(run.info.run_id)
    rest = open_runs(server.uri, lambda: None)
    assert isinstance(rest, RestRuns) and rest.experiment_id("rest-check") == exp_id
    assert rest.experiment_id("no-such-experiment") is None
    assert [summarize(r) for r in rest.search([exp_id], limit=2)] == \
        [summarize(r) for r in ClientRuns(client).search([exp_id], limit=2)]
    r = run_aitrain(["runs", "--tracking-uri", server.uri, "--experiment", "rest-check", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert [row["tokens_per_s"] for row in json.loads(r.stdout)] == [3000.0, 2000.0, 1000.0]
