"""The embedded store written without MLflow (launcher/mlflow_sqlite.py) against MLflow itself:
the same empty store, the same run written both ways reads back the same through MlflowClient,
the same refusals, MLflow carries on in a store made here, and a launch's tracker never
imports MLflow for it."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aitrain.launcher import mlflow_sqlite
from aitrain.launcher.mlflow_sqlite import Metric, MlflowStore, Param, RunTag, SqliteStore, StoreError

REPO = Path(__file__).resolve().parents[2]


def _schema(db: Path) -> list[list[str]]:
    """The store's statements, each as its sorted lines (MLflow's migrations write a table's
    constraints in an order that changes from one run to the next)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import mlflow_schema
    finally:
        sys.path.pop(0)
    return sorted(sorted(line.strip().rstrip(",") for line in stmt.split("\n")) for stmt in mlflow_schema.dump(db))


@pytest.fixture(scope="module")
def mlflow_made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty store as MLflow makes it (seconds: made once, copied per test)."""
    db = tmp_path_factory.mktemp("mlflow-made") / "mlflow.db"
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)
    return db


@pytest.fixture
def mlflow_store(mlflow_made: Path) -> Callable[[Path], MlflowStore]:
    def make(d: Path) -> MlflowStore:
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(mlflow_made, d / "mlflow.db")
        return MlflowStore(f"sqlite:///{d / 'mlflow.db'}")

    return make


def our_store(d: Path) -> SqliteStore:
    store = mlflow_sqlite.embedded_store(f"sqlite:///{d / 'mlflow.db'}")
    assert isinstance(store, SqliteStore)
    return store


def test_the_snapshot_is_the_installed_mlflows_empty_store(tmp_path: Path, mlflow_made: Path) -> None:
    assert mlflow_sqlite.snapshot_version() == mlflow_sqlite.installed_mlflow(), \
        "launcher/mlflow_schema.sql is from another MLflow: run scripts/mlflow_schema.py"
    ours = our_store(tmp_path / "ours")
    assert _schema(ours.path) == _schema(mlflow_made)
    default = sqlite3.connect(ours.path).execute(
        "SELECT experiment_id, name, lifecycle_stage FROM experiments").fetchall()
    assert default == [(0, "Default", "active")]


def write_a_run(store: Any, artifacts: Path) -> str:
    """Everything the tracker does to a run, on either store."""
    exp_id = store.create_experiment("exp", artifact_location=(artifacts / "mlartifacts").as_uri())
    run = store.create_run(exp_id, run_name="ddp lr=0.1", tags={"strategy": "ddp", "mlflow.user": "ann"},
                           start_time=1_700_000_000_000)
    run_id = run.info.run_id
    store.log_batch(run_id, [], [Param(f"p{i}", str(i)) for i in range(100)])
    # The same value again is fine; a long one is cut to MLflow's limit.
    store.log_batch(run_id, [], [Param("p1", "1"), Param("train.lr", "0.1"), Param("big", "y" * 6001)])
    store.log_batch(run_id, [], [], [RunTag("nodes", "a,b"), RunTag("long", "x" * 9000), RunTag("nodes", "a,b,c")])
    ts = 1_700_000_001_000
    metrics = [Metric("loss", 5.0 / s, ts + s, s) for s in range(1, 30)]
    metrics += [Metric("loss", 0.5, ts + 100, 3),  # an older step logged later: not the latest
                Metric("loss", 5.0, ts + 1, 1),  # a duplicate: kept once
                Metric("nan", float("nan"), ts, 1), Metric("inf", float("inf"), ts, 1),
                Metric("ninf", float("-inf"), ts, 2), Metric("system/node-a/cpu_util_pct", 50, ts, 0),
                Metric("same_step", 1.0, ts, 5), Metric("same_step", 2.0, ts + 5, 5), Metric("same_step", 0.0, ts, 5)]
    store.log_batch(run_id, metrics[:20])
    store.log_batch(run_id, metrics[20:])
    store.log_batch(run_id, [Metric("loss", 5.0 / 3, ts + 3, 3)])  # sent again after a retry
    src = artifacts / "src"
    (src / "logs").mkdir(parents=True)
    (src / "logs" / "rank0.log").write_text("hello\n")
    (src / "job.yaml").write_text("train:\n  lr: 0.1\n")
    store.log_artifact(run_id, str(src / "logs" / "rank0.log"), "logs")
    store.log_artifact(run_id, str(src / "job.yaml"), None)
    store.log_artifact(run_id, str(src / "job.yaml"), "documents/env")
    store.log_batch(run_id, [], [], [RunTag("mlflow.runName", "renamed")])
    store.set_terminated(run_id, status="FAILED", end_time=1_700_000_099_000)
    return run_id


def read_back(client: Any, run_id: str, root: Path) -> dict[str, Any]:
    run = client.get_run(run_id)
    info = run.info

    def history(key: str) -> list[tuple[Any, ...]]:
        return sorted(("nan" if math.isnan(m.value) else m.value, m.step, m.timestamp)
                      for m in client.get_metric_history(run_id, key))

    def files(path: str | None = None) -> list[tuple[str, str]]:
        out = []
        for f in client.list_artifacts(run_id, path):
            if f.is_dir:
                out += files(f.path)
            else:
                out.append((f.path, Path(client.download_artifacts(run_id, f.path, str(root))).read_text()))
        return out

    latest = {k: ("nan" if math.isnan(v) else v) for k, v in run.data.metrics.items()}
    return {"status": info.status, "start": info.start_time, "end": info.end_time, "name": info.run_name,
            "user": info.user_id, "stage": info.lifecycle_stage,
            "artifact_uri": info.artifact_uri.replace(run_id, "RUN"), "params": run.data.params,
            "tags": run.data.tags, "latest": latest,
            "history": {k: history(k) for k in sorted(run.data.metrics)}, "files": sorted(files())}


def test_the_same_run_written_here_and_by_mlflow_reads_back_the_same(tmp_path: Path, mlflow_store: Any) -> None:
    from mlflow.tracking import MlflowClient

    theirs = mlflow_store(tmp_path / "theirs")
    ours = our_store(tmp_path / "ours")
    their_id = write_a_run(theirs, tmp_path / "theirs")
    our_id = write_a_run(ours, tmp_path / "ours")
    a = read_back(MlflowClient(theirs.uri), their_id, tmp_path / "dl-theirs")
    b = read_back(MlflowClient(ours.uri), our_id, tmp_path / "dl-ours")
    a["artifact_uri"] = a["artifact_uri"].replace("/theirs/", "/X/")
    b["artifact_uri"] = b["artifact_uri"].replace("/ours/", "/X/")
    assert b == a
    assert b["name"] == "renamed" and b["tags"]["long"] == "x" * 8000 and b["latest"]["loss"] == 5.0 / 29
    assert b["history"]["nan"] == [("nan", 1, 1_700_000_001_000)]


def test_refusals_are_mlflows(tmp_path: Path, mlflow_store: Any) -> None:
    from mlflow.exceptions import MlflowException

    stores = ((mlflow_store(tmp_path / "theirs"), MlflowException), (our_store(tmp_path / "ours"), StoreError))
    for store, error in stores:
        exp = store.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
        with pytest.raises(error):
            store.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
        run_id = store.create_run(exp, run_name="r").info.run_id
        store.log_batch(run_id, [], [Param("lr", "0.1")])
        for bad in ([Metric("bad\nname", 1.0, 0, 0)], [Metric("../up", 1.0, 0, 0)], [Metric("x" * 251, 1.0, 0, 0)]):
            with pytest.raises(error):
                store.log_batch(run_id, bad)
        with pytest.raises(error):
            store.log_batch(run_id, [], [Param("lr", "0.2")])  # params do not change
        with pytest.raises(error):
            store.log_batch("0" * 32, [Metric("loss", 1.0, 0, 0)])  # no such run


def test_mlflow_and_aitrain_runs_carry_on_in_a_store_made_here(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    ours = our_store(tmp_path)
    run_id = write_a_run(ours, tmp_path)
    client = MlflowClient(ours.uri)
    exp = client.create_experiment("theirs")
    other = client.create_run(exp, run_name="by mlflow")
    client.log_metric(other.info.run_id, "loss", 1.0, step=1)
    client.set_terminated(other.info.run_id)
    names = sorted(r.info.run_name for r in client.search_runs(["1", exp]))
    assert names == ["by mlflow", "renamed"]
    # And the writer carries on in a store MLflow has used since (same revision).
    ours.log_batch(run_id, [], [], [RunTag("after", "yes")])
    assert client.get_run(run_id).data.tags["after"] == "yes"


def test_a_store_whose_tables_changed_or_a_server_goes_through_mlflow(tmp_path: Path) -> None:
    ours = our_store(tmp_path)
    con = sqlite3.connect(ours.path)
    with con:
        con.execute("UPDATE alembic_version SET version_num = 'f00dfeedbeef'")  # a later MLflow's migration...
    assert mlflow_sqlite.embedded_store(ours.uri) is not None  # ...that left these tables alone
    with con:
        con.execute("ALTER TABLE runs ADD COLUMN owner VARCHAR(64) NOT NULL DEFAULT ''")  # one that did not
    con.close()
    assert mlflow_sqlite.embedded_store(ours.uri) is None
    assert mlflow_sqlite.embedded_store("http://127.0.0.1:5000") is None


def test_the_tracker_does_not_import_mlflow_for_the_embedded_store(tmp_path: Path) -> None:
    """The point of it all: a launch's run gets into the embedded store without MLflow's import."""
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "time": 1_700_000_000 + s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    code = f"""
import sys
from pathlib import Path
from aitrain.launcher.tracking import Tracker, default_tracking_uri
t = Tracker(uri=default_tracking_uri(Path({str(tmp_path / 'runs')!r})), experiment="aitrain", run_name="r1",
            run_dir=Path({str(run_dir)!r}), params={{"train.steps": "5"}}, tags={{"strategy": "ddp"}})
t.start()
ok = t.finish("FINISHED")
print(ok, t.run_id, "mlflow" in sys.modules, "sqlalchemy" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ok, run_id, mlflow_imported, sqlalchemy_imported = out.stdout.split()
    assert (ok, mlflow_imported, sqlalchemy_imported) == ("True", "False", "False")
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.metrics["loss"] == 0.2 and run.data.params["train.steps"] == "5"
    assert run.data.tags["aitrain.tracked"] == "true"
