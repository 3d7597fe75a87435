"""``aitrain runs``: recent launches as MLflow recorded them, side by side in the terminal.

    aitrain runs [--last N] [--json]        status, strategy, nodes, phase timings, tokens/s
    aitrain runs compare A B [--json]       what differed: config, tags/versions, env, topology, timings
    aitrain runs sync RUN_DIR               send what a launch could not (tracking server was away)

A and B are run ids (or a unique prefix, or a run name) or run directories. The store is
the embedded one of ``aitrain launch`` (``<run-root>/mlflow.db`` under the current
directory), ``--tracking-uri``, or ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aitrain.errors import AitrainError, ConfigError

EPILOG = """examples:
  aitrain runs                                   the last 10 launches
  aitrain runs --last 3 --json
  aitrain runs compare 3468c4b1 9f0e21aa         two runs by id prefix
  aitrain runs compare outputs/2026-11-24/10-01-02-000001 outputs/2026-11-24/10-20-00-000002
  aitrain runs sync outputs/2026-11-24/10-01-02-000001   replay a launch's spool into MLflow
  aitrain runs --tracking-uri http://127.0.0.1:5000
"""

# Timing columns in the order of a launch; a column is shown when some listed run has it.
PHASES = ("queue_wait", "probe", "check", "tune", "smoke_test", "rendezvous", "startup", "pg_init",
          "first_step", "steady_step")
# Tags that differ between any two runs and say nothing.
_NOISE_TAGS = {"mlflow.runName", "aitrain.run_dir", "mlflow.user", "mlflow.log-model.history", "aitrain.tracked",
               "mlflow.source.git.commit", "aitrain.hang.summary"}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                   "else the embedded store <run-root>/mlflow.db)")
    p.add_argument("--run-root", default="outputs", help="where `aitrain launch` put its runs (default: outputs)")
    p.add_argument("--experiment", default="aitrain", help="MLflow experiment (default: aitrain)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("runs", help="recent launches from MLflow; compare two runs; replay a spool",
                       description="List recent launches with status, strategy, nodes, phase timings and "
                                   "tokens/s, as recorded in MLflow.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--last", type=int, default=10, metavar="N", help="how many runs (default 10)")
    _common(p)
    rs = p.add_subparsers(dest="runs_command", metavar="{compare,sync}")
    c = rs.add_parser("compare", help="what differed between two runs (config, env, topology, timings)")
    c.add_argument("a", metavar="A", help="run id (or prefix, or name) or run directory")
    c.add_argument("b", metavar="B", help="run id (or prefix, or name) or run directory")
    _common(c)
    s = rs.add_parser("sync", help="send a launch's spooled metrics and artifacts to MLflow")
    s.add_argument("run_dir", type=Path, help="the run directory of the launch")
    s.add_argument("--tracking-uri", default=None, help="send to this store instead of the launch's")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to keep retrying (default 60)")


def run(args: argparse.Namespace) -> int:
    cmd = getattr(args, "runs_command", None)
    if cmd == "sync":
        return sync(args.run_dir, args.tracking_uri, args.timeout)
    if cmd == "compare":
        client, uri = _client(args)
        return compare(client, uri, args)
    return list_runs(args)


def _uri(args: argparse.Namespace) -> str:
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        db = Path(args.run_root).resolve() / "mlflow.db"
        if not db.exists():
            raise ConfigError(f"no MLflow store at {db}",
                              "run this where you ran `aitrain launch`, or pass --run-root DIR or --tracking-uri URI")
        uri = f"sqlite:///{db}"
    return str(uri)


def _client(args: argparse.Namespace) -> tuple[Any, str]:
    uri = _uri(args)
    import logging

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return MlflowClient(tracking_uri=uri), uri


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise AitrainError(f"no experiment {name!r} in this MLflow store", "pass --experiment NAME")
    return exp.experiment_id


# -- list ---------------------------------------------------------------------------------


def summarize(run: Any) -> dict[str, Any]:
    """The facts of one run that `aitrain runs` shows."""
    tags, metrics = run.data.tags, run.data.metrics
    phases = {k[len("phase/"):-len("_s")]: v for k, v in metrics.items() if k.startswith("phase/") and k.endswith("_s")}
    status = run.info.status
    end = run.info.end_time or (time.time() * 1000 if status == "RUNNING" else None)
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "start_time": run.info.start_time / 1000 if run.info.start_time else None,
        "duration_s": (end - run.info.start_time) / 1000 if end and run.info.start_time else None,
        "status": "HUNG" if tags.get("aitrain.hang") == "true" else status,
        "strategy": tags.get("strategy"),
        "backend": tags.get("backend"),
        "nnodes": int(tags["nnodes"]) if tags.get("nnodes", "").isdigit() else None,
        "world_size": int(tags["world_size"]) if tags.get("world_size", "").isdigit() else None,
        "nodes": tags.get("nodes", ""),
        "phases": phases,
        "tokens_per_s": metrics.get("steady/tokens_per_s", metrics.get("tokens_per_s")),
        "mfu": metrics.get("steady/mfu"),
        "loss": metrics.get("loss"),
        "run_dir": tags.get("aitrain.run_dir"),
        "hang": tags.get("aitrain.hang.behind"),
        "parent_run_id": tags.get("mlflow.parentRunId"),  # a job of a sweep
        "sweep": tags.get("aitrain.sweep") == "parent",
    }


def as_tree(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(depth, row): each sweep's parent run followed by its jobs, oldest first; a job whose
    parent is not among ``rows`` stands on its own."""
    ids = {r["run_id"] for r in rows}
    children: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["parent_run_id"] in ids:
            children.setdefault(r["parent_run_id"], []).append(r)
    out: list[tuple[int, dict[str, Any]]] = []
    for r in rows:
        if r["parent_run_id"] in ids:
            continue
        out.append((0, r))
        out += [(1, c) for c in sorted(children.get(r["run_id"], []), key=lambda c: c["start_time"] or 0)]
    return out


def list_runs(args: argparse.Namespace) -> int:
    """The newest runs, read without importing MLflow where the store allows (runstore.py)."""
    import urllib.error

    from aitrain.launcher.ghosts import recover_from_store
    from aitrain.launcher.redact import redact_uri
    from aitrain.launcher.runstore import open_runs

    uri = _uri(args)
    try:
        store = open_runs(uri, lambda: _client(args)[0])
        exp_id = store.experiment_id(args.experiment)
        if exp_id is None:
            raise AitrainError(f"no experiment {args.experiment!r} in this MLflow store", "pass --experiment NAME")
        if recover_from_store(store, [exp_id], uri=uri):  # runs left RUNNING by a launcher that was killed
            store = open_runs(uri, lambda: _client(args)[0])  # see what the recovery wrote
        runs = store.search([exp_id], limit=max(1, args.last))
    except (urllib.error.URLError, OSError) as e:
        raise AitrainError(f"cannot read runs from {redact_uri(uri)}: {getattr(e, 'reason', e)}",
                           "is the tracking server up? (--tracking-uri, MLFLOW_TRACKING_URI)") from e
    rows = [summarize(r) for r in runs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no runs yet")
        return 0
    phases = [p for p in PHASES if any(p in r["phases"] for r in rows)]
    header = ["RUN", "STARTED", "STATUS", "STRATEGY", "NODES", "RANKS", *[_phase_title(p) for p in phases],
              "TOKENS/S", "WALL"]
    table = [header]
    for depth, r in as_tree(rows):
        table.append([
            ("└ " if depth else "") + r["run_id"][:8],
            time.strftime("%m-%d %H:%M", time.localtime(r["start_time"])) if r["start_time"] else "-",
            r["status"],
            "sweep" if r["sweep"] else r["strategy"] or "-",
            _nodes(r["nodes"], r["nnodes"]),
            str(r["world_size"] or "-"),
            *[_seconds(r["phases"].get(p)) for p in phases],
            f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else "-",
            _seconds(r["duration_s"]),
        ])
    print(_render(table))
    return 0


def _phase_title(p: str) -> str:
    return {"steady_step": "STEP", "first_step": "1ST STEP", "rendezvous": "RDZV", "smoke_test": "SMOKE",
            "queue_wait": "QUEUE"}.get(p, p.upper().replace("_", " "))


def _nodes(nodes: str, n: int | None) -> str:
    names = [x for x in nodes.split(",") if x]
    if not names:
        return str(n or "-")
    return names[0] if len(names) == 1 else f"{len(names)}: {names[0]}..{names[-1]}"


def _seconds(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1:
        return f"{v * 1000:.0f}ms"
    if v < 120:
        return f"{v:.1f}s"
    return f"{v / 60:.1f}m"


def _render(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in table)


# -- compare --------------------------------------------------------------------------


def resolve_run(client: Any, ref: str, experiment: str) -> Any:
    """A run from an id, a unique id prefix, a run name, or a run directory."""
    path = Path(ref)
    if path.is_dir():
        run_id = None
        state = path / "tracking.json"
        if state.exists():
            run_id = json.loads(state.read_text()).get("run_id")
        elif (path / "mlflow_run_id").exists():
            run_id = (path / "mlflow_run_id").read_text().strip()
        if not run_id:
            raise AitrainError(f"{path} has no MLflow run (tracking was off, or never reached MLflow)",
                               f"aitrain runs sync {path} sends a launch's spool to MLflow")
        return client.get_run(run_id)
    try:
        return client.get_run(ref)
    except Exception:
        pass
    runs = client.search_runs([_experiment_id(client, experiment)], max_results=1000,
                              order_by=["attributes.start_time DESC"])
    hits = [r for r in runs if r.info.run_id.startswith(ref)] or [r for r in runs if r.info.run_name == ref]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise AitrainError(f"no run {ref!r} in experiment {experiment!r}", "`aitrain runs` lists the recent ones")
    raise AitrainError(f"{ref!r} matches {len(hits)} runs: {', '.join(h.info.run_id[:12] for h in hits[:5])}",
                       "give more characters of the run id")


def _flat(obj: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(obj, dict):
        if set(obj) >= {"value"} and set(obj) <= {"value", "source"}:  # env entries
            src = obj.get("source")
            return {prefix: f"{obj['value']}" + (f"  ({src})" if src else "")}
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return {prefix: json.dumps(obj)}
        out = {}
        for i, v in enumerate(obj):
            key = v.get("name") or v.get("id") or v.get("index") if isinstance(v, dict) else None
            out.update(_flat(v, f"{prefix}[{key if key is not None else i}]"))
        return out
    return {prefix: json.dumps(obj) if not isinstance(obj, str) else obj}


def _documents(client: Any, run_id: str, folder: str, tmp: Path) -> dict[str, str]:
    """Flattened JSON artifacts under ``folder`` (one per host: keys start with the host)."""
    out: dict[str, str] = {}
    try:
        entries = client.list_artifacts(run_id, folder)
    except Exception:
        return out
    for entry in entries:
        if entry.is_dir or not entry.path.endswith(".json"):
            continue
        try:
            local = client.download_artifacts(run_id, entry.path, str(tmp))
            doc = json.loads(Path(local).read_text())
        except Exception:
            continue
        if isinstance(doc, dict):
            doc = {k: v for k, v in doc.items() if k not in ("time", "probed_at", "timestamp")}
        out.update(_flat(doc, Path(entry.path).stem))
    return out


def _diff(a: dict[str, str], b: dict[str, str]) -> list[tuple[str, str, str]]:
    return [(k, a.get(k, "(unset)"), b.get(k, "(unset)")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _doc_diff(a: dict[str, str], b: dict[str, str]) -> list[tuple[str, str, str]]:
    """Differences of flattened documents; a document only one run has is one line."""
    rows = []
    for doc in sorted({k.split(".", 1)[0].split("[", 1)[0] for k in set(a) | set(b)}):
        da = {k: v for k, v in a.items() if k.split(".", 1)[0].split("[", 1)[0] == doc}
        db = {k: v for k, v in b.items() if k.split(".", 1)[0].split("[", 1)[0] == doc}
        if not da or not db:
            rows.append((doc, f"({len(da)} values)" if da else "(none)", f"({len(db)} values)" if db else "(none)"))
            continue
        rows += [d for d in _diff(da, db) if not d[0].endswith((".time", ".node_rank"))]
    return rows


def compare(client: Any, uri: str, args: argparse.Namespace) -> int:
    ra, rb = resolve_run(client, args.a, args.experiment), resolve_run(client, args.b, args.experiment)
    a_id, b_id = ra.info.run_id, rb.info.run_id
    sections: dict[str, list[tuple[str, str, str]]] = {}
    sections["config"] = _diff(ra.data.params, rb.data.params)
    sections["tags"] = [d for d in _diff(ra.data.tags, rb.data.tags) if d[0] not in _NOISE_TAGS]
    with tempfile.TemporaryDirectory(prefix="aitrain-compare-") as tmp:
        for folder in ("env", "topology", "nodes", "fabric"):
            da = _documents(client, a_id, folder, Path(tmp) / "a")
            db = _documents(client, b_id, folder, Path(tmp) / "b")
            sections[folder] = _doc_diff(da, db)
    timing_keys = sorted(k for k in set(ra.data.metrics) | set(rb.data.metrics)
                         if k.startswith(("phase/", "steady/")) or k in ("loss", "tokens_per_s"))
    timings = [(k, ra.data.metrics.get(k), rb.data.metrics.get(k)) for k in timing_keys]
    if args.json:
        print(json.dumps({"a": summarize(ra), "b": summarize(rb),
                          "differences": {s: [{"key": k, "a": x, "b": y} for k, x, y in rows]
                                          for s, rows in sections.items()},
                          "metrics": [{"key": k, "a": x, "b": y} for k, x, y in timings]}, indent=2))
        return 0
    sa, sb = summarize(ra), summarize(rb)
    print(f"A: {a_id[:8]}  {ra.info.run_name}  {sa['status']}  {sa['strategy']}  {sa['nodes']}")
    print(f"B: {b_id[:8]}  {rb.info.run_name}  {sb['status']}  {sb['strategy']}  {sb['nodes']}")
    for name, rows in sections.items():
        print()
        if not rows:
            print(f"{name}: same")
            continue
        print(f"{name}: {len(rows)} difference(s)")
        shown = rows[:40]
        table = [["", "A", "B"]] + [[f"  {k}", _cut(x), _cut(y)] for k, x, y in shown]
        print(_render(table))
        if len(rows) > len(shown):
            print(f"  ... {len(rows) - len(shown)} more (--json shows all)")
    print()
    print("timings and throughput:")
    table = [["", "A", "B", "B/A"]]
    for k, x, y in timings:
        ratio = f"{y / x:.2f}x" if x and y is not None and x != 0 else ""
        table.append([f"  {k}", _num(x), _num(y), ratio])
    print(_render(table))
    return 0


def _cut(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


# -- sync ---------------------------------------------------------------------------


def sync(run_dir: Path, uri: str | None, timeout: float) -> int:
    from aitrain.launcher.tracking import STATE_FILE, Tracker

    if not (run_dir / STATE_FILE).exists():
        raise AitrainError(f"{run_dir} has no {STATE_FILE}", "give the run directory of a launch with tracking on")
    tracker = Tracker.from_run_dir(run_dir, uri=uri, drain_timeout_s=timeout)
    state = json.loads((run_dir / STATE_FILE).read_text())
    if state.get("finished") and (uri is None or uri == state.get("uri")):
        print(f"aitrain: {run_dir} is already in MLflow (run {state.get('run_id')})")
        return 0
    ok = tracker.finish(tracker.state["status"])
    if ok:
        print(f"aitrain: {run_dir} is in MLflow: run {tracker.run_id} at {_redacted(tracker.uri)}")
        return 0
    print(f"aitrain: could not finish sending {run_dir}", file=sys.stderr)
    return 1


def _redacted(uri: str) -> str:
    from aitrain.launcher.redact import redact_uri

    return redact_uri(uri)
