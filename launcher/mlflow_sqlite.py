"""MLflow's embedded store (``sqlite:///``) written with the standard library.

Importing MLflow and opening its SQLAlchemy store costs about 2 s of CPU (3 s more to make a
new store: a dozen migrations), and the tracker paid it in every launch after the job's
first step: on a short job, between the last step and the exit. For the embedded store
the tracker writes the rows MLflow's ``SqlAlchemyStore`` writes itself (``runs``, ``tags``,
``params``, ``metrics``, ``latest_metrics``, ``experiments``), with MLflow's validation rules
and its rules for duplicate metrics, NaN/inf and ``latest_metrics``, and copies artifacts
as MLflow's ``LocalArtifactRepository`` does. A new store is made from
``mlflow_schema.sql``, a snapshot of the empty store the installed MLflow makes
(``scripts/mlflow_schema.py``).

Used only where it is known to be right: a store whose tables written here have exactly the
snapshot's columns (the MLflow versions that did not migrate them), and for a new store only
when the installed MLflow is the snapshot's version. Any other store (a server, changed
tables, artifacts that are not local files) goes through ``MlflowClient`` (:func:`embedded_store`
says which). tests/observability/test_obs_mlflow_sqlite.py
writes the same run both ways and compares what ``MlflowClient`` reads back.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import os
import posixpath
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlparse

SCHEMA_FILE = Path(__file__).with_name("mlflow_schema.sql")

# MLflow's limits (mlflow/utils/validation.py).
MAX_ENTITY_KEY_LENGTH = 250
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_VALID_NAME = re.compile(r"^[/\w.\- :]*$")
_FLOAT_MAX = 1.7976931348623157e308
RUN_NAME_TAG = "mlflow.runName"
USER_TAG = "mlflow.user"


class Metric(NamedTuple):
    key: str
    value: float
    timestamp: int
    step: int


class Param(NamedTuple):
    key: str
    value: str


class RunTag(NamedTuple):
    key: str
    value: str


class StoreError(Exception):
    """A request the store refuses (as MLflow answers INVALID_PARAMETER_VALUE)."""


class Experiment(NamedTuple):
    experiment_id: str
    name: str
    artifact_location: str
    lifecycle_stage: str


class RunInfo(NamedTuple):
    run_id: str
    experiment_id: str
    artifact_uri: str


class Run(NamedTuple):
    info: RunInfo


def snapshot_version() -> str:
    """The MLflow version ``mlflow_schema.sql`` was taken from ('' without a snapshot)."""
    try:
        with open(SCHEMA_FILE) as f:
            first = f.readline()
    except OSError:
        return ""
    return first.removeprefix("-- mlflow").strip() if first.startswith("-- mlflow") else ""


def installed_mlflow() -> str:
    try:
        return importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        return ""


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def create_store(path: Path) -> bool:
    """Make a new store at ``path`` from the snapshot, whole or not at all (built under a
    temporary name and hard-linked into place, so a store another launch made meanwhile is
    kept). False when the snapshot is not the installed MLflow's (MLflow must make it)."""
    version = snapshot_version()
    if not version or version != installed_mlflow():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.creating")
    tmp.unlink(missing_ok=True)
    try:
        con = sqlite3.connect(tmp)
        try:
            con.executescript("BEGIN;\n" + SCHEMA_FILE.read_text() + "\nCOMMIT;")
            now = int(time.time() * 1000)
            with con:
                con.execute("INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage, "
                            "creation_time, last_update_time, workspace) VALUES (0, 'Default', ?, 'active', ?, ?, "
                            "'default')", (f"{(path.parent / 'mlartifacts').resolve().as_uri()}/0", now, now))
        finally:
            con.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)
    return True


# The tables this module writes; a store is written here only where each has exactly the
# snapshot's columns (name, type, not-null, default, key): MLflow versions whose migrations
# left them alone share it, and any change to them sends the store through MLflow.
WRITTEN_TABLES = ("experiments", "runs", "tags", "params", "metrics", "latest_metrics")


def _columns(con: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {t: [tuple(row[1:]) for row in con.execute(f'PRAGMA table_info("{t}")')] for t in WRITTEN_TABLES}


@functools.cache
def snapshot_columns() -> dict[str, list[tuple[Any, ...]]]:
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(SCHEMA_FILE.read_text())
        return _columns(con)
    finally:
        con.close()


def store_columns(path: Path) -> dict[str, list[tuple[Any, ...]]] | None:
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            return _columns(con)
        finally:
            con.close()
    except (sqlite3.Error, OSError):
        return None


def embedded_store(uri: str) -> SqliteStore | None:
    """A :class:`SqliteStore` for an embedded store whose tables are the snapshot's (made here
    from the snapshot when missing and the installed MLflow is the snapshot's); None for
    anything else, which goes through MLflow (:class:`MlflowStore`)."""
    path = sqlite_path(uri)
    if path is None:
        return None
    if not path.exists():
        create_store(path)
    try:
        known = snapshot_columns()
    except (OSError, sqlite3.Error):  # no snapshot (a build without it): MLflow does it all
        return None
    if path.exists() and store_columns(path) == known:
        return SqliteStore(path)
    return None


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _VALID_NAME.match(name):
        raise StoreError(f"invalid {what} name {name!r}: names may only contain alphanumerics, underscores (_), "
                         "dashes (-), periods (.), spaces ( ), colons (:) and slashes (/)")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith("..") or norm.startswith("/"):
        raise StoreError(f"invalid {what} name {name!r}: it would resolve to the path {norm!r}")
    if len(name) > MAX_ENTITY_KEY_LENGTH:
        raise StoreError(f"{what} name {name[:40]!r}... is longer than {MAX_ENTITY_KEY_LENGTH} characters")


def _sanitize(value: float) -> tuple[int, float]:
    """(is_nan, value) as MLflow stores it: NaN as 0 with is_nan, +-inf as the largest float."""
    if math.isnan(value):
        return 1, 0.0
    if math.isinf(value):
        return 0, _FLOAT_MAX if value > 0 else -_FLOAT_MAX
    return 0, float(value)


def _local_dir(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri.startswith("/"):
        return Path(uri)
    return None


class SqliteStore:
    """The subset of ``MlflowClient`` the tracker uses, on an embedded store."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.uri = f"sqlite:///{self.path}"
        self._con: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._mlflow: MlflowStore | None = None

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._con is None:
                # Autocommit mode with explicit transactions; MLflow's own sessions wait 30 s too.
                self._con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            con = self._con
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- experiments ------------------------------------------------------------------

    def get_experiment_by_name(self, name: str) -> Experiment | None:
        with self._tx() as con:
            row = con.execute("SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments "
                              "WHERE name = ? AND workspace = 'default'", (name,)).fetchone()
        return Experiment(str(row[0]), row[1], row[2], row[3]) if row else None

    def create_experiment(self, name: str, artifact_location: str | None = None) -> str:
        if not name or not isinstance(name, str):
            raise StoreError("an experiment needs a name")
        now = int(time.time() * 1000)
        with self._tx() as con:
            try:
                cur = con.execute("INSERT INTO experiments (name, artifact_location, lifecycle_stage, creation_time, "
                                  "last_update_time, workspace) VALUES (?, ?, 'active', ?, ?, 'default')",
                                  (name, artifact_location, now, now))
            except sqlite3.IntegrityError as e:
                raise StoreError(f"Experiment(name={name}) already exists") from e
            exp_id = cur.lastrowid
            if not artifact_location:
                root = (self.path.parent / "mlartifacts").resolve().as_uri()
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                            (f"{root}/{exp_id}", exp_id))
        return str(exp_id)

    # -- runs ---------------------------------------------------------------------------

    def create_run(self, experiment_id: str, start_time: int | None = None, tags: dict[str, str] | None = None,
                   run_name: str | None = None) -> Run:
        tags = dict(tags or {})
        if run_name and tags.get(RUN_NAME_TAG) not in (None, run_name):
            raise StoreError(f"run_name {run_name!r} and the mlflow.runName tag {tags[RUN_NAME_TAG]!r} differ")
        run_name = run_name or tags.get(RUN_NAME_TAG) or f"run-{uuid.uuid4().hex[:8]}"
        tags.setdefault(RUN_NAME_TAG, run_name)
        checked = self._checked_tags([RunTag(k, str(v)) for k, v in tags.items()])
        run_id = uuid.uuid4().hex
        with self._tx() as con:
            row = con.execute("SELECT artifact_location, lifecycle_stage FROM experiments WHERE experiment_id = ?",
                              (int(experiment_id),)).fetchone()
            if row is None:
                raise StoreError(f"no experiment with id {experiment_id}")
            if row[1] != "active":
                raise StoreError(f"the experiment with id {experiment_id} is deleted; restore it or use another")
            artifact_uri = f"{str(row[0]).rstrip('/')}/{run_id}/artifacts"
            con.execute("INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, "
                        "status, start_time, end_time, deleted_time, source_version, lifecycle_stage, artifact_uri, "
                        "experiment_id) VALUES (?, ?, 'UNKNOWN', '', '', ?, 'RUNNING', ?, NULL, NULL, '', 'active', "
                        "?, ?)",
                        (run_id, run_name, tags.get(USER_TAG, "unknown"),
                         start_time if start_time is not None else int(time.time() * 1000), artifact_uri,
                         int(experiment_id)))
            con.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)",
                            [(t.key, t.value, run_id) for t in checked])
        return Run(RunInfo(run_id, str(experiment_id), artifact_uri))

    def _active_run(self, con: sqlite3.Connection, run_id: str) -> tuple[str, str]:
        row = con.execute("SELECT lifecycle_stage, artifact_uri FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"Run with id={run_id} not found")
        if row[0] != "active":
            raise StoreError(f"The run {run_id} must be in the 'active' state. Current state is {row[0]}.")
        return row[0], row[1]

    @staticmethod
    def _checked_tags(tags: Iterable[RunTag]) -> list[RunTag]:
        out: dict[str, RunTag] = {}
        for t in tags:
            _check_name("tag", t.key)
            value = "" if t.value is None else str(t.value)
            if len(value) > MAX_TAG_VAL_LENGTH:  # MLflow truncates a long tag value
                value = value[:MAX_TAG_VAL_LENGTH]
            out[t.key] = RunTag(t.key, value)  # the last of duplicate keys wins, as in MLflow
        return list(out.values())

    def log_batch(self, run_id: str, metrics: Iterable[Metric] = (), params: Iterable[Param] = (),
                  tags: Iterable[RunTag] = ()) -> None:
        metrics, params, tags = list(metrics), list(params), list(tags)
        if len(metrics) > MAX_METRICS_PER_BATCH or len(params) > MAX_PARAMS_TAGS_PER_BATCH \
                or len(tags) > MAX_PARAMS_TAGS_PER_BATCH:
            raise StoreError(f"a batch holds at most {MAX_METRICS_PER_BATCH} metrics and "
                             f"{MAX_PARAMS_TAGS_PER_BATCH} params and tags")
        rows: dict[tuple[str, int, int, float, int], None] = {}
        for m in metrics:
            _check_name("metric", m.key)
            if isinstance(m.value, bool) or not isinstance(m.value, (int, float)):
                raise StoreError(f"metric {m.key!r} has a value that is not a number: {m.value!r}")
            is_nan, value = _sanitize(m.value)
            rows[(m.key, int(m.timestamp), int(m.step), value, is_nan)] = None
        keys = [p.key for p in params]
        if len(set(keys)) != len(keys):
            raise StoreError("duplicate parameter keys in one batch")
        for p in params:
            _check_name("param", p.key)
        params = [Param(p.key, str(p.value)[:MAX_PARAM_VAL_LENGTH]) for p in params]  # MLflow truncates too
        checked_tags = self._checked_tags(tags)
        with self._tx() as con:
            self._active_run(con, run_id)
            if params:
                existing = dict(con.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))
                changed = [p.key for p in params if p.key in existing and existing[p.key] != p.value]
                if changed:
                    raise StoreError(f"Changing param values is not allowed: {', '.join(changed)} of run {run_id}")
                con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                                [(p.key, p.value, run_id) for p in params if p.key not in existing])
            if rows:
                con.executemany("INSERT OR IGNORE INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                                "VALUES (?, ?, ?, ?, ?, ?)",
                                [(k, v, ts, run_id, step, nan) for (k, ts, step, v, nan) in rows])
                self._update_latest(con, run_id, list(rows))
            for t in checked_tags:
                con.execute("INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?) "
                            "ON CONFLICT (key, run_uuid) DO UPDATE SET value = excluded.value",
                            (t.key, t.value, run_id))
                if t.key == RUN_NAME_TAG:
                    con.execute("UPDATE runs SET name = ? WHERE run_uuid = ?", (t.value, run_id))

    @staticmethod
    def _update_latest(con: sqlite3.Connection, run_id: str, rows: list[tuple[str, int, int, float, int]]) -> None:
        """``latest_metrics``: per key, the value at the highest (step, timestamp, value)."""
        best: dict[str, tuple[int, int, float, int]] = {}
        for key, ts, step, value, nan in rows:
            cand = (step, ts, value, nan)
            if key not in best or cand[:3] > best[key][:3]:
                best[key] = cand
        current = {k: (s, t, v) for k, s, t, v in con.execute(
            f"SELECT key, step, timestamp, value FROM latest_metrics WHERE run_uuid = ? "
            f"AND key IN ({','.join('?' * len(best))})", (run_id, *best))}
        for key, (step, ts, value, nan) in best.items():
            old = current.get(key)
            if old is None:
                con.execute("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (key, value, ts, step, nan, run_id))
            elif (step, ts, value) > old:
                con.execute("UPDATE latest_metrics SET value = ?, timestamp = ?, step = ?, is_nan = ? "
                            "WHERE key = ? AND run_uuid = ?", (value, ts, step, nan, key, run_id))

    def set_terminated(self, run_id: str, status: str = "FINISHED", end_time: int | None = None) -> None:
        if status not in ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED"):
            raise StoreError(f"unknown run status {status!r}")
        with self._tx() as con:
            self._active_run(con, run_id)
            con.execute("UPDATE runs SET status = ?, end_time = ? WHERE run_uuid = ?",
                        (status, end_time if end_time is not None else int(time.time() * 1000), run_id))

    def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        with self._tx() as con:
            rows = con.execute("SELECT key, value, timestamp, step, is_nan FROM metrics WHERE run_uuid = ? AND key = ? "
                               "ORDER BY step, timestamp", (run_id, key)).fetchall()
        return [Metric(k, float("nan") if nan else v, ts, step) for k, v, ts, step, nan in rows]

    # -- artifacts --------------------------------------------------------------------------

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        """Copy a file under the run's artifact root, as MLflow's local repository does (through
        a temporary file, keeping the file's times); a remote root goes through MLflow."""
        with self._tx() as con:
            _, artifact_uri = self._active_run(con, run_id)
        root = _local_dir(artifact_uri)
        if root is None:
            if self._mlflow is None:
                self._mlflow = MlflowStore(self.uri)
            self._mlflow.log_artifact(run_id, local_path, artifact_path)
            return
        if artifact_path:
            norm = posixpath.normpath(artifact_path)
            if norm.startswith(("..", "/")):
                raise StoreError(f"invalid artifact path {artifact_path!r}")
            root = root / norm
        root.mkdir(parents=True, exist_ok=True)
        src = Path(local_path)
        dest = root / src.name
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(src, tmp)
            shutil.copystat(src, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


class MlflowStore:
    """MLflow's own client, taking this module's Metric/Param/RunTag in ``log_batch``."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)

    def log_batch(self, run_id: str, metrics: Iterable[Any] = (), params: Iterable[Any] = (),
                  tags: Iterable[Any] = ()) -> None:
        from mlflow.entities import Metric as MMetric
        from mlflow.entities import Param as MParam
        from mlflow.entities import RunTag as MRunTag

        self.client.log_batch(run_id, [MMetric(m.key, m.value, m.timestamp, m.step) for m in metrics],
                              [MParam(p.key, p.value) for p in params], [MRunTag(t.key, t.value) for t in tags])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)
