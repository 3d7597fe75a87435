"""MLflow tracking from the launcher process, off the training path.

Ranks append metrics to ``<run_dir>/metrics.jsonl`` (see ``metrics.py``); the
:class:`Tracker` here tails that file in a background thread and forwards it to
MLflow with the run's params, tags and artifacts. MLflow is imported only in
that thread, and only after the first step has been logged (or the job has
ended), so tracking never delays the start of training.

Default store: an embedded sqlite database under ``run_root`` (no server);
``tracking.uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from aitrain.launcher.metrics import read_new

log = logging.getLogger("aitrain.tracking")

PARAM_VALUE_MAX = 500  # MLflow's limit on a param value


def default_tracking_uri(run_root: Path) -> str:
    return f"sqlite:///{run_root.resolve() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None, run_root: Path) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_root)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'train.lr': '0.003', ...} with values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:PARAM_VALUE_MAX]
    return out


class Tracker:
    """One MLflow run per launch, fed from the metrics spool in a background thread."""

    def __init__(self, *, uri: str, experiment: str, run_name: str, run_dir: Path,
                 params: dict[str, str], tags: dict[str, str], artifacts: list[Path] | None = None,
                 poll_s: float = 0.5) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_dir = run_dir
        self.metrics_file = run_dir / "metrics.jsonl"
        self.params = params
        self.tags = tags
        self.artifacts = list(artifacts or [])
        self.poll_s = poll_s
        self.run_id: str | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self._status = "FINISHED"
        self._offset = 0
        self._thread = threading.Thread(target=self._main, name="aitrain-tracker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self, status: str = "FINISHED", timeout: float = 120.0) -> None:
        """Drain the spool, upload logs, end the run with ``status`` (FINISHED/FAILED/KILLED)."""
        self._status = status
        self._done.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            print(f"aitrain: MLflow logging did not finish in {timeout:.0f}s; "
                  f"metrics stay in {self.metrics_file}", flush=True)
        elif self.error:
            print(f"aitrain: MLflow logging failed ({self.error}); metrics stay in {self.metrics_file}",
                  flush=True)

    # -- background thread ------------------------------------------------

    def _wait_for_first_metric(self) -> None:
        while not self._done.is_set():
            if self.metrics_file.exists() and self.metrics_file.stat().st_size > 0:
                return
            self._done.wait(self.poll_s)

    def _main(self) -> None:
        try:
            self._wait_for_first_metric()
            self._run()
        except Exception as e:  # tracking must never take the job down
            self.error = f"{type(e).__name__}: {e}"
            log.warning("MLflow tracking failed: %s", self.error)

    def _run(self) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        for name in ("alembic", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
        client = MlflowClient(tracking_uri=self.uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            artifact_location = None
            if self.uri.startswith("sqlite:///"):
                store = Path(self.uri[len("sqlite:///"):]).parent
                artifact_location = (store / "mlartifacts").as_uri()
            try:
                exp_id = client.create_experiment(self.experiment, artifact_location=artifact_location)
            except Exception:  # created concurrently by another launch
                exp_id = client.get_experiment_by_name(self.experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        (self.run_dir / "mlflow_run_id").write_text(self.run_id + "\n")
        items = [Param(k, v) for k, v in sorted(self.params.items())]
        for i in range(0, len(items), 100):
            client.log_batch(self.run_id, params=items[i : i + 100])
        for path in self.artifacts:
            if path.exists():
                client.log_artifact(self.run_id, str(path))

        while True:
            done = self._done.is_set()
            records, self._offset = read_new(self.metrics_file, self._offset)
            metrics = []
            for rec in records:
                step = int(rec.get("step", 0))
                ts = int(float(rec.get("time", time.time())) * 1000)
                for k, v in rec.items():
                    if k in ("step", "time") or not isinstance(v, (int, float)):
                        continue
                    metrics.append(Metric(k, float(v), ts, step))
            for i in range(0, len(metrics), 1000):
                client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
            if done:
                break
            self._done.wait(self.poll_s)

        logs = self.run_dir / "logs"
        if logs.is_dir():
            client.log_artifacts(self.run_id, str(logs), artifact_path="logs")
        if self.metrics_file.exists():
            client.log_artifact(self.run_id, str(self.metrics_file))
        client.set_terminated(self.run_id, status=self._status)
        client.set_tag(self.run_id, "aitrain.tracked", "true")
