"""Reading recent runs without importing MLflow (``aitrain runs``: under a second, not three).

Importing ``mlflow`` and opening its SQLAlchemy store costs 2-4 s on a small machine, far more
than listing ten runs. For the two kinds of store aitrain uses, the runs are read directly:

* the embedded ``sqlite:///`` store: MLflow's own tables (``experiments``, ``runs``, ``tags``,
  ``latest_metrics``), read-only;
* a tracking server (``http(s)://``): MLflow's REST API (``experiments/get-by-name``,
  ``runs/search``).

Anything else (``databricks``, ``file:``, a schema this does not know) goes through MLflow's
client, which is always right and only slower. The runs come back shaped like MLflow's
(``run.info.run_id``, ``run.data.tags``, ``run.data.metrics``), so callers do not care which.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aitrain.errors import AitrainError


def _run(run_id: str, name: str | None, status: str, start: int | None, end: int | None,
         tags: dict[str, str], metrics: dict[str, float]) -> Any:
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=name, status=status, start_time=start,
                                                end_time=end),
                           data=SimpleNamespace(tags=tags, metrics=metrics, params={}))


class SqliteRuns:
    """MLflow's sqlite store, read with sqlite3 (read-only)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)

    def experiment_id(self, name: str) -> str | None:
        row = self.db.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active' "
                              "ORDER BY experiment_id LIMIT 1", (name,)).fetchone()
        return str(row[0]) if row else None

    def search(self, experiment_ids: list[str], *, limit: int, status: str | None = None) -> list[Any]:
        marks = ",".join("?" * len(experiment_ids))
        where = f"experiment_id IN ({marks}) AND lifecycle_stage = 'active'" + (" AND status = ?" if status else "")
        args: list[Any] = [int(e) for e in experiment_ids] + ([status] if status else [])
        rows = self.db.execute(f"SELECT run_uuid, name, status, start_time, end_time FROM runs WHERE {where} "
                               "ORDER BY start_time DESC, run_uuid LIMIT ?", (*args, limit)).fetchall()
        if not rows:
            return []
        ids = [r[0] for r in rows]
        marks = ",".join("?" * len(ids))
        tags: dict[str, dict[str, str]] = {i: {} for i in ids}
        for key, value, run in self.db.execute(f'SELECT "key", value, run_uuid FROM tags WHERE run_uuid IN ({marks})',
                                               ids):
            tags[run][key] = value
        metrics: dict[str, dict[str, float]] = {i: {} for i in ids}
        for key, value, is_nan, run in self.db.execute(
                f'SELECT "key", value, is_nan, run_uuid FROM latest_metrics WHERE run_uuid IN ({marks})', ids):
            metrics[run][key] = float("nan") if is_nan else float(value)
        return [_run(i, name, status_, start, end, tags[i], metrics[i]) for i, name, status_, start, end in rows]


class RestRuns:
    """A tracking server, through MLflow's REST API."""

    def __init__(self, uri: str, timeout: float = 10.0) -> None:
        self.base = uri.rstrip("/") + "/api/2.0/mlflow/"
        self.timeout = timeout
        parts = urllib.parse.urlsplit(uri)
        self.headers = {"Content-Type": "application/json"}
        if parts.username:  # http://user:pw@host (MLflow's basic auth)
            import base64

            auth = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
            netloc = parts.hostname or ""
            if parts.port:
                netloc += f":{parts.port}"
            self.base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")) + \
                "/api/2.0/mlflow/"

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if body is None:
            req = urllib.request.Request(self.base + path, headers=self.headers)
        else:
            req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), headers=self.headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return dict(json.loads(r.read() or b"{}"))

    def experiment_id(self, name: str) -> str | None:
        try:
            doc = self._call("experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": name}))
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise
        return str(doc["experiment"]["experiment_id"])

    def search(self, experiment_ids: list[str], *, limit: int, status: str | None = None) -> list[Any]:
        body: dict[str, Any] = {"experiment_ids": experiment_ids, "max_results": limit,
                                "order_by": ["attributes.start_time DESC"]}
        if status:
            body["filter"] = f"attributes.status = '{status}'"
        runs = []
        for r in self._call("runs/search", body).get("runs", []):
            info, data = r.get("info", {}), r.get("data", {})
            tags = {t["key"]: t.get("value", "") for t in data.get("tags", [])}
            metrics = {m["key"]: float(m["value"]) for m in data.get("metrics", [])}
            runs.append(_run(info["run_id"], info.get("run_name"), info.get("status", ""),
                             int(info["start_time"]) if info.get("start_time") else None,
                             int(info["end_time"]) if info.get("end_time") else None, tags, metrics))
        return runs


class ClientRuns:
    """Any other store, through MLflow's client."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def experiment_id(self, name: str) -> str | None:
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp else None

    def search(self, experiment_ids: list[str], *, limit: int, status: str | None = None) -> list[Any]:
        return list(self.client.search_runs(experiment_ids, filter_string=f"attributes.status = '{status}'"
                                            if status else "", order_by=["attributes.start_time DESC"],
                                            max_results=limit))


def open_runs(uri: str, client_factory: Any) -> Any:
    """The fastest reader for ``uri``; ``client_factory()`` makes an MLflow client when needed."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.exists():
            raise AitrainError(f"no MLflow store at {path}", "pass --run-root DIR or --tracking-uri URI")
        try:
            store = SqliteRuns(path)
            store.db.execute("SELECT run_uuid, name, status, start_time, end_time, lifecycle_stage, experiment_id "
                             "FROM runs LIMIT 0").fetchall()
            store.db.execute('SELECT "key", value, is_nan, run_uuid FROM latest_metrics LIMIT 0').fetchall()
            return store
        except sqlite3.Error:
            pass  # a schema this reader does not know: MLflow's client knows
    elif uri.startswith(("http://", "https://")):
        return RestRuns(uri)
    return ClientRuns(client_factory())
