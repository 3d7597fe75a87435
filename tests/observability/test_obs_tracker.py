"""The tracker on an embedded store: what a launch's run directory becomes in MLflow,
`aitrain runs` over it, and replaying a spool the server never got (`aitrain runs sync`)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from aitrain.launcher import cli
from aitrain.launcher.tracking import Tracker, record_world

HOST = "node-a"
STEPS = 12


def fake_run_dir(run_dir: Path, *, nccl_ifname: str, tokens: float) -> None:
    """What ranks and the node agent leave in a run directory during a job."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, STEPS + 1):
            f.write(json.dumps({"step": step, "time": time.time(), "loss": 5.0 / step, "tokens_per_s": tokens,
                                "step_time_s": 2048 / tokens, "lr": 1e-3, "grad_norm": 0.5}) + "\n")
    with open(run_dir / f"system-{HOST}.jsonl", "w") as f:
        for i in (1, 2):
            f.write(json.dumps({"time": time.time(), "step": i, f"system/{HOST}/cpu_util_pct": 50.0 + i,
                                f"system/{HOST}/gpu/0/util_pct": 90.0}) + "\n")
    progress = run_dir / "progress"
    progress.mkdir()
    t0 = time.time() - 10
    for rank, slow in ((0, 0.0), (1, 0.5)):
        (progress / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "local_rank": rank, "host": HOST, "pid": 1, "spawn_time": t0, "step": STEPS,
            "time": time.time(), "done": True,
            "marks": {"startup": t0 + 2, "pg_init": t0 + 2.5 + slow, "first_step": t0 + 4 + slow},
            "info": {"n_params": 1_000_000, "device": "cuda"} if rank == 0 else {}}))
    (progress / f"agent-{HOST}.json").write_text(json.dumps({"node": HOST, "rendezvous_s": 0.25}))
    (run_dir / "nodes").mkdir()
    (run_dir / "nodes" / f"{HOST}.json").write_text(json.dumps({
        "host": HOST, "node_rank": 0, "versions": {"torch": "2.13.0", "nccl": "2.27.3", "python": "3.11.7"},
        "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3"}, {"index": 1, "name": "NVIDIA H100 80GB HBM3"}]}))
    (run_dir / "logs").mkdir()
    for rank in (0, 1):
        (run_dir / "logs" / f"rank{rank}.log").write_text(f"hello from rank {rank}\n")
    (run_dir / "job.yaml").write_text("train:\n  steps: 12\n")


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.returncode, self.stdout, self.stderr = code, out, err


def aitrain(args: list[str], cwd: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Result:
    """`aitrain ...` in this process (mlflow is imported already: seconds faster than a subprocess)."""
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()
    code = cli.main(args)
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


def make_tracker(root: Path, name: str, *, lr: str, nccl_ifname: str, tokens: float, uri: str,
                 **kw: Any) -> Tracker:
    run_dir = root / "outputs" / name
    fake_run_dir(run_dir, nccl_ifname=nccl_ifname, tokens=tokens)
    t = Tracker(uri=uri, experiment="aitrain", run_name=f"ddp-{name}", run_dir=run_dir,
                params={"train.lr": lr, "train.steps": str(STEPS), "fabric.env.HF_TOKEN": "hf_secret",
                        "strategy.mixed_precision": "bf16"},
                tags={"strategy": "ddp", "backend": "local", "world_size": "2", "nnodes": "1", "nodes": HOST,
                      "aitrain.command": "aitrain launch fabric.env.HF_TOKEN=hf_secret"},
                artifacts=[run_dir / "job.yaml"], poll_s=0.05, **kw)
    t.add_document(f"env/{HOST}", {"NCCL_SOCKET_IFNAME": {"value": nccl_ifname, "source": "tuned: RDMA NIC"},
                                   "HF_TOKEN": {"value": "hf_secret", "source": "user-set (fabric.env)"}})
    t.add_document(f"topology/{HOST}", {"hostname": HOST, "nics": [{"name": nccl_ifname, "speed_mbps": 200000}]})
    return t


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'outputs' / 'mlflow.db'}"
    ids = {}
    for name, lr, ifname, tokens in (("run-a", "0.001", "ib0", 40000.0), ("run-b", "0.003", "ib1", 50000.0)):
        t = make_tracker(root, name, lr=lr, nccl_ifname=ifname, tokens=tokens, uri=uri)
        t.start()
        with t.timed("tune"):
            pass
        t.phase("probe", 1.5)
        assert t.finish("FINISHED") is True
        ids[name] = t.run_id
    from mlflow.tracking import MlflowClient

    return {"root": root, "uri": uri, "ids": ids, "client": MlflowClient(tracking_uri=uri)}


def test_the_run_holds_metrics_phases_provenance_and_documents(store: dict[str, Any], tmp_path: Path) -> None:
    client, run_id = store["client"], store["ids"]["run-a"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == \
        list(range(1, STEPS + 1))
    m = run.data.metrics
    assert m["phase/probe_s"] == 1.5 and "phase/tune_s" in m
    assert m["phase/rendezvous_s"] == 0.25
    assert m["phase/startup_s"] == pytest.approx(2.0, abs=0.01)
    assert m["phase/pg_init_s"] == pytest.approx(1.0, abs=0.01)  # the slower rank
    assert m["phase/first_step_s"] == pytest.approx(1.5, abs=0.01)
    assert m["steady/tokens_per_s"] == 40000.0 and m["phase/steady_step_s"] == pytest.approx(2048 / 40000)
    # MFU on GPUs: 6 x 1e6 params x 40k tokens/s over 2 x H100 bf16 peak
    assert m["steady/mfu"] == pytest.approx(6 * 1e6 * 40000 / (2 * 989e12))
    assert len(client.get_metric_history(run_id, "mfu")) == STEPS
    assert len(client.get_metric_history(run_id, f"system/{HOST}/cpu_util_pct")) == 2
    tags = run.data.tags
    assert tags["versions.nccl"] == "2.27.3" and tags["nodes"] == HOST and tags["gpu"] == "2x NVIDIA H100 80GB HBM3"
    assert tags["aitrain.command"] == "aitrain launch fabric.env.HF_TOKEN=***"
    assert run.data.params["fabric.env.HF_TOKEN"] == "***" and run.data.params["train.lr"] == "0.001"
    env = json.loads(Path(client.download_artifacts(run_id, f"env/{HOST}.json", str(tmp_path))).read_text())
    assert env["HF_TOKEN"]["value"] == "***" and env["NCCL_SOCKET_IFNAME"]["value"] == "ib0"
    paths = {a.path for folder in (None, "logs", "nodes", "topology") for a in client.list_artifacts(run_id, folder)}
    assert {"job.yaml", "metrics.jsonl", "logs/rank0.log", "logs/rank1.log", f"nodes/{HOST}.json",
            f"topology/{HOST}.json"} <= paths
    state = json.loads((store["root"] / "outputs" / "run-a" / "tracking.json").read_text())
    assert state["finished"] and state["run_id"] == run_id and "hf_secret" not in json.dumps(state)


def test_runs_lists_recent_launches(store: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    r = aitrain(["runs", "--last", "5"], store["root"], capsys, monkeypatch)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["RUN", "STARTED", "STATUS", "STRATEGY"]
    assert "PROBE" in lines[0] and "PG INIT" in lines[0] and "TOKENS/S" in lines[0]
    assert lines[1].startswith(store["ids"]["run-b"][:8]) and "50,000" in lines[1] and "FINISHED" in lines[1]
    assert lines[2].startswith(store["ids"]["run-a"][:8]) and "40,000" in lines[2]
    r = aitrain(["runs", "--last", "1", "--json"], store["root"], capsys, monkeypatch)
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["run_id"] == store["ids"]["run-b"]
    assert rows[0]["phases"]["pg_init"] == pytest.approx(1.0, abs=0.01) and rows[0]["nodes"] == HOST


def test_runs_compare_shows_what_differed(store: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    a = store["ids"]["run-a"][:10]
    b = str(store["root"] / "outputs" / "run-b")  # a run directory works too
    r = aitrain(["runs", "compare", a, b], store["root"], capsys, monkeypatch)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "config: 1 difference(s)" in out and "train.lr" in out
    assert f"{HOST}.NCCL_SOCKET_IFNAME" in out and "ib0" in out and "ib1" in out
    assert "topology: 4 difference(s)" in out and "nics[ib1].speed_mbps" in out and "hf_secret" not in out
    assert "steady/tokens_per_s" in out and "1.25x" in out
    r = aitrain(["runs", "compare", a, b, "--json"], store["root"], capsys, monkeypatch)
    diff = json.loads(r.stdout)["differences"]
    assert [d["key"] for d in diff["config"]] == ["train.lr"]
    assert diff["tags"] == [] and diff["nodes"] == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_leaves_a_spool_that_sync_replays(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    t = make_tracker(tmp_path, "offline", lr="0.002", nccl_ifname="ib0", tokens=30000.0,
                     uri=f"http://127.0.0.1:{_closed_port()}", drain_timeout_s=1.0)
    t.start()
    t0 = time.monotonic()
    assert t.finish("FINISHED") is False and t.pending
    assert time.monotonic() - t0 < 30
    assert "aitrain runs sync" in capsys.readouterr().out
    run_dir = tmp_path / "outputs" / "offline"
    uri = f"sqlite:///{tmp_path / 'replayed.db'}"
    r = aitrain(["runs", "sync", str(run_dir), "--tracking-uri", uri], tmp_path, capsys, monkeypatch)
    assert r.returncode == 0, r.stderr + r.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("aitrain").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["fabric.env.HF_TOKEN"] == "***"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == STEPS
    assert run.data.metrics["phase/pg_init_s"] == pytest.approx(1.0, abs=0.01)
    r = aitrain(["runs", "sync", str(run_dir)], tmp_path, capsys, monkeypatch)
    assert r.returncode == 0 and "already in MLflow" in r.stdout


def test_a_requeued_attempt_in_the_same_run_dir_gets_only_its_own_lines(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = make_tracker(tmp_path, "requeued", lr="0.1", nccl_ifname="ib0", tokens=1000.0, uri=uri)
    first.start()
    assert first.finish("KILLED")
    run_dir = tmp_path / "outputs" / "requeued"
    old = time.time() - 3600  # the first attempt's lines are from an hour ago
    system = run_dir / f"system-{HOST}.jsonl"
    system.write_text("".join(json.dumps({"time": old, "step": i, f"system/{HOST}/cpu_util_pct": 1.0}) + "\n"
                              for i in (1, 2)))
    (run_dir / "metrics.jsonl").unlink()  # what the launch does: metrics-<time>.jsonl
    with open(system, "a") as f:
        f.write(json.dumps({"time": time.time(), "step": 1, f"system/{HOST}/cpu_util_pct": 99.0}) + "\n")
    record_world(run_dir, nnodes=1, nproc_per_node=1, excluded=["node-b"])  # the first attempt left one out
    os.utime(run_dir / "world.json", (old, old))
    second = Tracker(uri=uri, experiment="aitrain", run_name="attempt-2", run_dir=run_dir, params={},
                     tags={"world_size": "2"}, poll_s=0.05)
    second.start()
    assert second.finish("FINISHED")
    assert (run_dir / f"tracking-{first.run_id}.json").exists() and second.run_id != first.run_id
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(second.run_id, f"system/{HOST}/cpu_util_pct")
    assert [m.value for m in history] == [99.0]
    tags = MlflowClient(tracking_uri=uri).get_run(second.run_id).data.tags
    assert tags["world_size"] == "2" and "fabric.excluded_nodes" not in tags  # not the first attempt's size


def test_leaving_bad_nodes_out_corrects_the_size_tags_and_mfu(tmp_path: Path) -> None:
    """The tags are set from the size the launch started with; when the smoke test leaves
    a node out, the backend records the new size and the run (and MFU) follow it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = make_tracker(tmp_path, "shrunk", lr="0.1", nccl_ifname="ib0", tokens=40000.0, uri=uri)
    t.set_tags(world_size="4", nnodes="2")  # launched on 2 nodes x 2 ranks
    record_world(t.run_dir, nnodes=1, nproc_per_node=2, excluded=["node-b"])
    t.start()
    assert t.finish("FINISHED")
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(t.run_id)
    tags = run.data.tags
    assert (tags["world_size"], tags["nnodes"], tags["fabric.excluded_nodes"]) == ("2", "1", "node-b")
    assert run.data.metrics["steady/mfu"] == pytest.approx(6 * 1e6 * 40000 / (2 * 989e12))


def test_a_new_sqlite_store_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    """A launcher killed while MLflow builds a new store must not leave a half-migrated file
    that every later run refuses: the store is built aside and linked into place."""
    import os
    import signal
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from aitrain.launcher.tracking import ensure_sqlite_store

    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    code = f"from aitrain.launcher.tracking import ensure_sqlite_store; ensure_sqlite_store({uri!r})"
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    time.sleep(1.5)  # importing MLflow and (often) in the middle of the migrations
    p.send_signal(signal.SIGKILL)
    p.wait()
    if db.exists():  # it got there first: then it is complete
        assert [e.name for e in MlflowClient(uri).search_experiments()] == ["Default"]
    # killed inside a transaction, sqlite's rollback journal stays beside the temporary store
    db.parent.mkdir(parents=True, exist_ok=True)
    (db.parent / f".mlflow.db.{p.pid}.creating-journal").write_bytes(b"")
    ensure_sqlite_store(uri)
    assert [e.name for e in MlflowClient(uri).search_experiments()] == ["Default"]
    before = db.stat().st_ino
    ensure_sqlite_store(uri)  # an existing store is never replaced
    assert db.stat().st_ino == before
    assert os.listdir(db.parent) == ["mlflow.db"]  # the killed launcher's leftovers are gone too


def test_runs_read_without_mlflow_match_mlflows_client(store: dict[str, Any]) -> None:
    """`aitrain runs` reads the sqlite store directly (importing MLflow costs seconds); what it
    reads is what MLflow's client reads."""
    from aitrain.launcher.cli.runs import summarize
    from aitrain.launcher.runstore import ClientRuns, SqliteRuns, open_runs

    direct = open_runs(store["uri"], lambda: None)
    assert isinstance(direct, SqliteRuns)
    client = ClientRuns(store["client"])
    exp = client.experiment_id("aitrain")
    assert direct.experiment_id("aitrain") == exp and direct.experiment_id("nope") is None
    ours, theirs = direct.search([exp], limit=5), client.search([exp], limit=5)
    assert [summarize(r) for r in ours] == [summarize(r) for r in theirs]
    assert direct.search([exp], limit=5, status="RUNNING") == []
