"""MLflow tracking from the launcher process, off the training path.

Nothing on a rank talks to MLflow. Ranks and node agents write local files in the
run directory, and the :class:`Tracker` here forwards them from a background thread:

    metrics.jsonl          rank 0's training metrics (``metrics.py``)      -> metrics
    system-<node>.jsonl    each node agent's system metrics (``node/``)    -> metrics system/<node>/...
    phases.jsonl           launcher phase timings (:func:`record_phase`)   -> metrics phase/<name>_s
    progress/*.json        ranks' phase marks (``progress.py``), agents'   -> metrics phase/<name>_s
    nodes/<node>.json      versions and GPUs per node                      -> tags versions.*, artifacts
    documents/<name>.json  :meth:`Tracker.add_document` (topology, env...) -> artifacts <name>.json
    logs/, hang-report-*   at the end                                       -> artifacts

The files are the spool: each is read from a saved offset that advances only after
MLflow accepted the lines, so a tracking server that goes away loses nothing. The
thread retries with backoff while the server is down and catches up when it is back;
at the end it drains for ``drain_timeout_s``, and if the server is still away it says
so and leaves ``tracking.json`` (the run's params, tags, offsets) for
``aitrain runs sync <run_dir>`` to finish the job later.

The embedded store (``sqlite:///``, the default) is written without importing MLflow
(``mlflow_sqlite.py``: the same rows MLflow writes, checked against it), so tracking adds
nothing measurable to a launch's command-to-exit. Any other store goes through MLflow's
client, imported only in the thread after the first training step was reported (or the
job has ended), so tracking never delays the start of the built-in job. A user's
program (``script=``, ``module=``, ``-- train.py``) may log to MLflow itself: for it the run is
created before the ranks start, and :meth:`Tracker.rank_env` gives them MLflow's own
variables (``MLFLOW_TRACKING_URI``, ``MLFLOW_RUN_ID``, ``MLFLOW_EXPERIMENT_ID``), so
``mlflow.start_run()``, HF ``report_to=["mlflow"]`` and Lightning's ``MLFlowLogger(run_id=...)``
log into the launch's run. Whatever they do to it, the tracker ends the run last, with the
job's own status. Secrets are redacted (``redact.py``) in params, tags, documents, the
recorded command line and ``tracking.json``, whose URI has no credentials: a later ``aitrain runs
sync`` takes them from ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` (the same URI with them),
else MLflow's ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``. MLflow's own "View run
at URL" lines would print a URI's credentials: with such a URI they are suppressed (here and in
ranks that log to the run) and the tracker prints them without the credentials.

Default store: an embedded sqlite database under ``run_root`` (no server);
``tracking.uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aitrain.launcher.metrics import read_new
from aitrain.launcher.mlflow_sqlite import Metric, MlflowStore, Param, RunTag, create_store, embedded_store
from aitrain.launcher.redact import redact_mapping, redact_obj, redact_text, redact_uri, strip_uri_credentials
from aitrain.launcher.util import STORAGE_ERRNOS, os_error_text, write_atomic

log = logging.getLogger("aitrain.tracking")

PARAM_VALUE_MAX = 500  # MLflow's limit on a param value
TAG_VALUE_MAX = 5000
STATE_FILE = "tracking.json"
PHASES_FILE = "phases.jsonl"
WORLD_FILE = "world.json"  # the job's size when the launcher changed it after the start (bad nodes left out)
DOCUMENTS_DIR = "documents"
SUPPRESS_URL_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"  # MLflow's switch for its "View run" lines
DRAIN_TIMEOUT_S = float(os.environ.get("AITRAIN_TRACKING_DRAIN_S", "30"))
FIRST_METRIC_GRACE_S = 30.0  # forward anyway after this long without a training step (user scripts)
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
LINES_PER_PASS = 20000
REJECT_AFTER = 3  # attempts at a batch the server answers but refuses


def default_tracking_uri(run_root: Path) -> str:
    return f"sqlite:///{run_root.resolve() / 'mlflow.db'}"


def ensure_sqlite_store(uri: str) -> None:
    """Create a ``sqlite:///`` store that does not exist yet whole, or not at all.

    MLflow creates the schema on first use with a dozen migrations; a launcher killed in the
    middle would leave a half-migrated file that every later run refuses ("out-of-date
    database schema"). So the store is built under a temporary name and hard-linked into
    place (a link never replaces a store another launch made meanwhile)."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    # Left by a launcher that was killed: the temporary store and sqlite's journal beside it.
    for stale in path.parent.glob(f".{path.name}.*.creating*"):
        pid = stale.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            stale.unlink(missing_ok=True)
    if path.exists() or create_store(path):  # from the snapshot of the installed MLflow's empty store
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.creating")
    tmp.unlink(missing_ok=True)
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
        _dispose_engines(f"sqlite:///{tmp}")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another launch made it first: use theirs
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


def _dispose_engines(uri: str) -> None:
    """Drop MLflow's cached engine of a store (best effort: MLflow internals)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()
    except Exception:  # noqa: BLE001
        pass


def resolve_tracking_uri(uri: str | None, run_root: Path) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_root)


def has_credentials(uri: str) -> bool:
    """``http://user:pw@host``, ``https://token@host``, ``...?token=x``: what is not written down."""
    return redact_text(uri) != uri


def recorded_uri(recorded: str, given: str | None = None) -> str:
    """The URI to reach the store ``tracking.json`` names (recorded without its credentials):
    ``given`` or ``MLFLOW_TRACKING_URI`` when it is that URI with them; else the recorded one
    with the masked part left out (MLflow then uses ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``)."""
    if recorded == redact_text(recorded):
        for candidate in (given, os.environ.get("MLFLOW_TRACKING_URI")):
            if candidate and redact_text(candidate) == recorded:
                return candidate
    return recorded if "***" not in recorded else strip_uri_credentials(recorded)


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


def record_phase(run_dir: Path, name: str, seconds: float) -> None:
    """Record a phase timing (``phase/<name>_s``) from any process of the launch, tracker or not."""
    with open(Path(run_dir) / PHASES_FILE, "a") as f:
        f.write(json.dumps({"phase": name, "seconds": float(seconds), "time": time.time()}) + "\n")


def record_world(run_dir: Path, *, nnodes: int, nproc_per_node: int, excluded: list[str]) -> None:
    """The job's size after bad nodes were left out, for the MLflow tags (nnodes, world_size,
    fabric.excluded_nodes) the tracker set from the size the launch started with."""
    write_atomic(Path(run_dir) / WORLD_FILE, json.dumps({"nnodes": nnodes, "world_size": nnodes * nproc_per_node,
                                                         "excluded_nodes": list(excluded)}))


def git_info(path: Path) -> dict[str, str]:
    """Commit, dirty flag, branch and remote of the git repository holding ``path`` (empty if none)."""

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    out = {"git.commit": commit, "mlflow.source.git.commit": commit,
           "git.dirty": "true" if git("status", "--porcelain", "--untracked-files=no") else "false"}
    for key, args in (("git.branch", ("rev-parse", "--abbrev-ref", "HEAD")),
                      ("git.root", ("rev-parse", "--show-toplevel")),
                      ("git.remote", ("config", "--get", "remote.origin.url"))):
        value = git(*args)
        if value:
            out[key] = redact_uri(value)
    if "git.remote" in out:
        out["mlflow.source.git.repoURL"] = out["git.remote"]
    return out


def steady_state(values: list[float]) -> float | None:
    """Median after warm-up: the first 10% of the steps (at least one) are left out."""
    if not values:
        return None
    skip = max(1, len(values) // 10) if len(values) > 2 else 0
    return float(statistics.median(values[skip:]))


class Tracker:
    """One MLflow run per launch, fed from the run directory's spool files in a background thread."""

    def __init__(self, *, uri: str, experiment: str, run_name: str, run_dir: Path,
                 params: dict[str, str], tags: dict[str, str], artifacts: list[Path] | None = None,
                 poll_s: float = 0.5, drain_timeout_s: float = DRAIN_TIMEOUT_S, code_dir: Path | None = None,
                 state: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_dir = Path(run_dir)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.params = redact_mapping(dict(params))
        self.poll_s = poll_s
        self.drain_timeout_s = drain_timeout_s
        self.code_dir = code_dir
        self.error: str | None = None
        self.pending = False  # True after finish() when something could not be sent
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._run_ready = threading.Event()
        self._early_run = False
        self._finished_at: float | None = None
        self._client: Any = None
        self._user_suppressed_urls = False
        self._attempts: dict[str, int] = {}
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._main, name="aitrain-tracker", daemon=True)
        self.state: dict[str, Any] = state or {
            "uri": uri, "experiment": experiment, "run_name": run_name, "run_id": None, "status": None,
            "params": self.params, "params_logged": False, "tags": {}, "tags_logged": {},
            "artifacts": [str(a) for a in artifacts or []], "uploaded": {}, "offsets": {},
            "phases_logged": [], "finished": False, "start_time": time.time(), "end_time": None,
            "not_before": None,
        }
        if state is None and (self.run_dir / STATE_FILE).exists():
            self._new_attempt()
        self.set_tags(**tags)

    # -- API for the launch ---------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        return self.state.get("run_id")

    def start(self, *, create_run_now: bool = False) -> None:
        """Start forwarding. ``create_run_now``: create the MLflow run at once (ranks that log
        to MLflow themselves need its id before they start; see :meth:`rank_env`)."""
        self._early_run = create_run_now
        self._save_state()
        self._thread.start()

    def rank_env(self, timeout: float = 60.0) -> dict[str, str]:
        """MLflow's variables for ranks that log into this run: the URI, the run id and the
        experiment id once the run exists (waits up to ``timeout`` for it; without it, the
        experiment's name, so the user's logging still lands in the right experiment)."""
        self._run_ready.wait(timeout)
        env = {"MLFLOW_TRACKING_URI": self.uri}
        if has_credentials(self.uri):  # the program's mlflow.end_run() would print them
            env[SUPPRESS_URL_ENV] = "true"
        if self.run_id:
            env["MLFLOW_RUN_ID"] = self.run_id
        if self.state.get("experiment_id"):
            env["MLFLOW_EXPERIMENT_ID"] = str(self.state["experiment_id"])
        # Also the name: Accelerate's and HF's MLflow trackers create an experiment of their own
        # name unless it is set, even when they log into MLFLOW_RUN_ID's run.
        env["MLFLOW_EXPERIMENT_NAME"] = self.experiment
        return env

    def phase(self, name: str, seconds: float) -> None:
        """Record a launcher-side phase timing, e.g. ``tracker.phase("probe", 1.8)`` -> ``phase/probe_s``."""
        record_phase(self.run_dir, name, seconds)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """``with tracker.timed("tune"): ...`` records ``phase/tune_s`` (also when the block raises)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phase(name, time.monotonic() - t0)

    def add_document(self, name: str, obj: Any) -> Path:
        """Attach a JSON document (redacted) to the run as artifact ``<name>.json``.

        ``name`` may have folders: ``topology/node1``, ``env/node1``, ``fabric/findings``.
        Callable before or after :meth:`start`; calling it again replaces the document.
        """
        parts = [p for p in Path(name).parts if p not in ("", ".", "..", "/")]
        if not parts:
            raise ValueError(f"document name {name!r} is empty")
        path = self.run_dir / DOCUMENTS_DIR / Path(*parts[:-1]) / f"{parts[-1]}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(redact_obj(obj), indent=2, sort_keys=True, default=str) + "\n")
        return path

    def set_tags(self, **tags: Any) -> None:
        """Tags (redacted) for the run; sent with the next pass."""
        with self._lock:
            for k, v in redact_mapping({k: str(v)[:TAG_VALUE_MAX] for k, v in tags.items()}).items():
                self.state["tags"][k] = v

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """Send what is left, upload logs and end the run with ``status`` (FINISHED/FAILED/KILLED).

        Returns True when everything reached MLflow; otherwise says how to replay it later.
        Never raises: the job's own result matters more than its record."""
        self.state["status"] = status
        self.state["end_time"] = self.state.get("end_time") or time.time()
        self._finished_at = time.monotonic()
        try:
            self._save_state()
        except Exception as e:  # the thread saves it again; a full disk must not hide the job's result
            log.warning("could not save %s: %s", STATE_FILE, e)
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout if timeout is not None else self.drain_timeout_s + 30)
        elif not self.state.get("finished"):
            self._main()  # never started: forward synchronously
        where = redact_text(self.uri)
        if self.state.get("finished"):
            return True
        self.pending = True
        why = self.error or f"the tracking server at {where} was unreachable"
        creds = "MLFLOW_TRACKING_URI=<the tracking URI> " if has_credentials(self.uri) else ""
        print(f"aitrain: MLflow logging is incomplete ({why}); everything is kept in {self.run_dir}. "
              f"Replay it with: {creds}aitrain runs sync {self.run_dir}", flush=True)
        return False

    @classmethod
    def from_run_dir(cls, run_dir: Path, uri: str | None = None, drain_timeout_s: float = 60.0) -> Tracker:
        """The tracker of an earlier launch, to replay its spool (``aitrain runs sync``)."""
        state = json.loads((Path(run_dir) / STATE_FILE).read_text())
        state["uri"] = recorded_uri(state["uri"], uri)
        if uri and uri != state["uri"]:
            # Another store: the run is created there from scratch.
            state.update(uri=uri, run_id=None, params_logged=False, tags_logged={}, uploaded={}, offsets={},
                         phases_logged=[], finished=False)
        t = cls(uri=state["uri"], experiment=state["experiment"], run_name=state["run_name"], run_dir=Path(run_dir),
                params=state["params"], tags={}, drain_timeout_s=drain_timeout_s, state=state)
        t.state["finished"] = False
        t.state["status"] = state.get("status") or "FAILED"
        return t

    def _new_attempt(self) -> None:
        """The run dir holds an earlier attempt (a requeued Slurm job): this run gets only this
        attempt's lines; the earlier state is kept as ``tracking-<run id>.json``."""
        old = self.run_dir / STATE_FILE
        try:
            prev = json.loads(old.read_text()).get("run_id") or "previous"
        except (OSError, ValueError):
            prev = "previous"
        old.replace(self.run_dir / f"tracking-{prev}.json")
        self.state["not_before"] = _process_start_time() - 2.0  # /proc/stat's btime is in whole seconds

    # -- the thread -------------------------------------------------------------------

    def _save_state(self) -> None:
        with self._lock:  # also serialises the writers (the launch thread and the tracker thread)
            # The URI's credentials stay in this process (see recorded_uri for a later sync).
            state = {**self.state, "uri": redact_text(self.uri)}
            write_atomic(self.run_dir / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))

    def _started_training(self) -> bool:
        if self.metrics_file.exists() and self.metrics_file.stat().st_size > 0:
            return True
        from aitrain.launcher.progress import read_record

        return any((read_record(p) or {}).get("step") for p in (self.run_dir / "progress").glob("rank*.json"))

    def _main(self) -> None:
        if self._early_run:
            try:
                self._ensure_run(self._connect())
            except Exception as e:  # the loop retries; the ranks start without a run id
                log.warning("could not create the MLflow run before the ranks start: %s", redact_text(str(e)))
            finally:
                self._run_ready.set()
        try:
            t0 = time.monotonic()
            while not self._done.is_set() and not self._started_training() \
                    and time.monotonic() - t0 < FIRST_METRIC_GRACE_S:
                self._done.wait(self.poll_s)
            if self.code_dir is not None and "git.commit" not in self.state["tags"]:
                self.set_tags(**git_info(self.code_dir))  # after the first step: git costs CPU too
            self._loop()
        except Exception as e:  # tracking must never take the job down
            self.error = redact_text(f"{type(e).__name__}: {e}")  # MLflow's messages name the URL
            log.warning("MLflow tracking failed: %s", self.error)

    def _loop(self) -> None:
        backoff = 0.0
        while True:
            final = self._done.is_set()
            try:
                self._pass(final)
                if self._down_since is not None:
                    print(f"aitrain: tracking server at {redact_text(self.uri)} is back after "
                          f"{time.monotonic() - self._down_since:.0f}s; catching up", flush=True)
                    self._down_since = None
                backoff = 0.0
                if final:
                    return
            except Exception as e:
                storage = storage_fault(e)
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    if storage:  # a full or failing disk under the store, not an unreachable server
                        self.error = f"the MLflow store at {redact_text(self.uri)}: {storage}"
                        print(f"aitrain: {self.error}; training goes on, metrics stay spooled in {self.run_dir} "
                              f"({storage_action(storage)}, then: aitrain runs sync {self.run_dir})", flush=True)
                    else:
                        print(f"aitrain: tracking server at {redact_text(self.uri)} is unreachable "
                              f"({type(e).__name__}); training goes on, metrics stay spooled in {self.run_dir}",
                              flush=True)
                backoff = min(max(backoff * 2, 1.0), 15.0)
                if final and storage:
                    return  # a disk that failed now will not mend while the job's end waits: spooled for sync
                if final and self._finished_at is not None and \
                        time.monotonic() - self._finished_at + backoff > self.drain_timeout_s:
                    return
            self._done.wait(backoff or self.poll_s)

    def _connect(self) -> Any:
        if self._client is None:
            # The embedded store is written without importing MLflow (seconds of CPU on a
            # short job's critical path: mlflow_sqlite.py); anything else through MLflow.
            self._client = embedded_store(self.uri)
        if self._client is None:
            # Fail fast and let the loop retry: MLflow's own retries would block for minutes.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            import mlflow  # noqa: F401  (sets its loggers' levels on import)

            for name in ("alembic", "mlflow", "urllib3"):  # after the import: mlflow sets its own level
                logging.getLogger(name).setLevel(logging.ERROR)
            if has_credentials(self.uri):  # MLflow's "View run at URL" lines: printed by _view_lines
                self._user_suppressed_urls = os.environ.get(SUPPRESS_URL_ENV, "").lower() in ("1", "true")
                os.environ[SUPPRESS_URL_ENV] = "true"
            ensure_sqlite_store(self.uri)
            self._client = MlflowStore(self.uri)
        return self._client

    def _server_is_up(self) -> bool:
        if not self.uri.startswith(("http://", "https://")):
            return True
        import urllib.request

        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=3) as r:
                return r.status == 200
        except Exception:
            return False

    def _attempt(self, key: str, fn: Any, *args: Any) -> bool:
        """Run ``fn``; False if the server is up but keeps refusing it (the caller skips the item)."""
        try:
            fn(*args)
            self._attempts.pop(key, None)
            return True
        except Exception as e:
            if not self._server_is_up():
                raise
            n = self._attempts[key] = self._attempts.get(key, 0) + 1
            if n < REJECT_AFTER:
                raise
            self._attempts.pop(key, None)
            error = redact_text(f"{type(e).__name__}: {e}")
            log.warning("MLflow refused %s: %s", key, error)
            with open(self.run_dir / "tracking-rejected.jsonl", "a") as f:
                f.write(json.dumps({"item": key, "error": error[:2000]}) + "\n")
            return False

    def _pass(self, final: bool) -> None:
        client = self._connect()
        self._ensure_run(client)
        run_id = self.state["run_id"]
        if not self.state["params_logged"]:
            items = [Param(k, v) for k, v in sorted(self.state["params"].items())]
            for i in range(0, len(items), 100):
                self._attempt(f"params[{i}]", client.log_batch, run_id, [], items[i:i + 100])
            self.state["params_logged"] = True
            self._save_state()
        self._node_tags()
        self._world_tags()
        with self._lock:
            tags = {k: v for k, v in self.state["tags"].items() if self.state["tags_logged"].get(k) != v}
        if tags:
            batch = [RunTag(k, v) for k, v in sorted(tags.items())]
            self._attempt("tags", client.log_batch, run_id, [], [], batch)
            with self._lock:
                self.state["tags_logged"].update(tags)
            self._save_state()
        self._upload_documents(client, run_id)
        self._forward_spools(client, run_id)
        self._rank_phases(client, run_id, final)
        if final:
            self._finish_run(client, run_id)

    def _ensure_run(self, client: Any) -> None:
        if self.state["run_id"]:
            return
        exp_id = experiment_id(client, self.uri, self.experiment)
        with self._lock:
            tags = dict(self.state["tags"])
        start = self.state.get("start_time")
        run = client.create_run(exp_id, run_name=self.run_name, tags=tags,
                                start_time=int(start * 1000) if start else None)
        with self._lock:
            self.state["run_id"] = run.info.run_id
            self.state["experiment_id"] = str(exp_id)
            self.state["tags_logged"] = tags
        write_atomic(self.run_dir / "mlflow_run_id", run.info.run_id + "\n")
        self._save_state()

    # -- what gets forwarded ------------------------------------------------------------

    def _upload(self, client: Any, run_id: str, path: Path, artifact_path: str | None) -> None:
        key = str(path.relative_to(self.run_dir)) if path.is_relative_to(self.run_dir) else str(path)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return
        if self.state["uploaded"].get(key) == mtime:
            return
        self._attempt(f"artifact {key}", client.log_artifact, run_id, str(path), artifact_path)
        with self._lock:
            self.state["uploaded"][key] = mtime  # sent, or refused for good (see tracking-rejected.jsonl)
        self._save_state()

    def _upload_documents(self, client: Any, run_id: str) -> None:
        for name in self.state["artifacts"]:
            self._upload(client, run_id, Path(name), None)
        docs = self.run_dir / DOCUMENTS_DIR
        for path in sorted(docs.rglob("*.json")) if docs.is_dir() else []:
            rel = path.parent.relative_to(docs)
            self._upload(client, run_id, path, None if str(rel) == "." else str(rel))
        for path in sorted((self.run_dir / "nodes").glob("*.json")):
            self._upload(client, run_id, path, "nodes")

    def _node_tags(self) -> None:
        nodes = []
        for path in sorted((self.run_dir / "nodes").glob("*.json")):
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            nodes.append(info)
        if not nodes:
            return
        nodes.sort(key=lambda n: n.get("node_rank", 0))
        tags = {f"versions.{k}": str(v) for k, v in (nodes[0].get("versions") or {}).items()}
        tags["nodes"] = ",".join(str(n.get("host")) for n in nodes)
        gpus = nodes[0].get("gpus") or []
        if gpus:
            tags["gpu"] = f"{len(gpus)}x {gpus[0].get('name')}"
        self.set_tags(**tags)

    def _world_tags(self) -> None:
        path = self.run_dir / WORLD_FILE
        try:
            if path.stat().st_mtime < (self.state.get("not_before") or 0):
                return  # an earlier attempt's (a requeued Slurm job that left nodes out then)
            world = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        self.set_tags(**{"nnodes": world["nnodes"], "world_size": world["world_size"],
                         "fabric.excluded_nodes": ",".join(world.get("excluded_nodes") or [])})

    def _spools(self) -> list[Path]:
        return [self.metrics_file, self.run_dir / PHASES_FILE, *sorted(self.run_dir.glob("system-*.jsonl"))]

    def _forward_spools(self, client: Any, run_id: str) -> None:
        mfu = self._mfu_scale()
        not_before = self.state.get("not_before")
        for path in self._spools():
            key = path.name
            while True:
                offset = self.state["offsets"].get(key, 0)
                records = _read_lines(path, offset, LINES_PER_PASS)
                if not records:
                    break
                batch: list[Any] = []
                batch_end = offset
                for rec, line_end in records:
                    if not_before is None or float(rec.get("time") or not_before) >= not_before:
                        batch.extend(_metrics_of(rec, Metric, mfu if path == self.metrics_file else None))
                    batch_end = line_end
                    if len(batch) >= METRICS_PER_BATCH:
                        self._send(client, run_id, key, batch, offset, batch_end)
                        offset, batch = batch_end, []
                if batch_end > offset:
                    self._send(client, run_id, key, batch, offset, batch_end)
                if len(records) < LINES_PER_PASS:
                    break

    def _send(self, client: Any, run_id: str, key: str, metrics: list[Any], start: int, end: int) -> None:
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            self._attempt(f"{key}@{start}+{i}", client.log_batch, run_id, metrics[i:i + METRICS_PER_BATCH])
        with self._lock:
            self.state["offsets"][key] = end
        self._save_state()

    def _mfu_scale(self) -> float | None:
        """MFU per token/s: 6 x params / (peak FLOP/s x GPUs); None on CPU or when unknown."""
        from aitrain.launcher.node.nodeinfo import peak_flops
        from aitrain.launcher.progress import read_record

        rank0 = read_record(self.run_dir / "progress" / "rank0.json") or {}
        n_params = (rank0.get("info") or {}).get("n_params")
        if not n_params or rank0.get("info", {}).get("device", "cuda") != "cuda":
            return None
        try:
            node = json.loads(sorted((self.run_dir / "nodes").glob("*.json"))[0].read_text())
            gpu = node["gpus"][0]["name"]
        except (IndexError, KeyError, OSError, ValueError):
            return None
        dtype = "bf16" if self.state["params"].get("strategy.mixed_precision") == "bf16" else "fp32"
        peak = peak_flops(gpu, dtype)
        world = int(self.state["tags"].get("world_size", "1") or 1)
        return 6.0 * float(n_params) / (peak * world) if peak else None

    def _rank_phases(self, client: Any, run_id: str, final: bool) -> None:
        """phase/<mark>_s: the slowest rank's time for each phase, once every rank has it (or at the end)."""
        from aitrain.launcher.progress import phase_durations, read_record

        world = int(self.state["tags"].get("world_size", "0") or 0)
        per_phase: dict[str, list[float]] = {}
        for path in (self.run_dir / "progress").glob("rank*.json"):
            for name, seconds in phase_durations(read_record(path) or {}).items():
                per_phase.setdefault(name, []).append(seconds)
        for path in (self.run_dir / "progress").glob("agent-*.json"):
            try:
                agent = json.loads(path.read_text())
                per_phase.setdefault("rendezvous", []).append(float(agent["rendezvous_s"]))
            except (OSError, ValueError, KeyError):
                continue
        now = int(time.time() * 1000)
        metrics = [Metric(f"phase/{name}_s", max(values), now, 0) for name, values in sorted(per_phase.items())
                   if name not in self.state["phases_logged"]
                   and (final or name == "rendezvous" or (world and len(values) >= world))]
        if metrics:
            self._attempt("rank phases", client.log_batch, run_id, metrics)
            with self._lock:
                self.state["phases_logged"].extend(m.key[len("phase/"):-len("_s")] for m in metrics)
            self._save_state()

    def _finish_run(self, client: Any, run_id: str) -> None:
        now = int(time.time() * 1000)
        summary = []
        steps = metric_column(self.metrics_file, "step_time_s")
        tokens = metric_column(self.metrics_file, "tokens_per_s")
        mfu = metric_column(self.metrics_file, "mfu")
        if not mfu and tokens and (scale := self._mfu_scale()):
            mfu = [t * scale for t in tokens]
        for key, values in (("phase/steady_step_s", steps), ("steady/tokens_per_s", tokens), ("steady/mfu", mfu)):
            value = steady_state(values)
            if value is not None:
                summary.append(Metric(key, value, now, 0))
        if summary:
            self._attempt("summary", client.log_batch, run_id, summary)
        for name in ("logs",):
            d = self.run_dir / name
            if d.is_dir():
                for path in sorted(d.rglob("*")):
                    if path.is_file():
                        rel = path.parent.relative_to(self.run_dir)
                        self._upload(client, run_id, path, str(rel))
        not_before = self.state.get("not_before") or 0

        def this_attempt(paths: Any) -> list[Path]:
            return [p for p in sorted(paths) if p.stat().st_mtime >= not_before and p.stat().st_size]

        hang = this_attempt(self.run_dir.glob("hang-report-*.json"))
        for path in [*hang, *this_attempt(self.run_dir.glob("hang-report-*.txt")),
                     *this_attempt((self.run_dir / "progress").glob("stack-rank*.txt"))]:
            self._upload(client, run_id, path, "hang")
        if self.metrics_file.exists():
            self._upload(client, run_id, self.metrics_file, None)
        if hang:
            self._hang_tags(hang)
        with self._lock:
            tags = {k: v for k, v in self.state["tags"].items() if self.state["tags_logged"].get(k) != v}
        tags["aitrain.tracked"] = "true"
        self._attempt("final tags", client.log_batch, run_id, [], [], [RunTag(k, v) for k, v in tags.items()])
        end = self.state.get("end_time")
        client.set_terminated(run_id, status=self.state.get("status") or "FINISHED",
                              end_time=int(end * 1000) if end else None)
        self._view_lines(run_id)
        with self._lock:
            self.state["tags_logged"].update(tags)
            self.state["finished"] = True
        self._save_state()

    def _view_lines(self, run_id: str) -> None:
        """MLflow's own "View run" lines, which it does not print for a URI with credentials
        (:data:`SUPPRESS_URL_ENV`): the same links without them (the browser asks for them)."""
        if not (self.uri.startswith(("http://", "https://")) and has_credentials(self.uri)):
            return
        if self._user_suppressed_urls:
            return
        host = redact_text(strip_uri_credentials(self.uri)).rstrip("/")
        experiment = f"{host}/#/experiments/{self.state.get('experiment_id')}"
        print(f"🏃 View run {self.run_name} at: {experiment}/runs/{run_id}\n🧪 View experiment at: {experiment}",
              flush=True)

    def _hang_tags(self, reports: list[Path]) -> None:
        behind, summaries = [], []
        for path in reports:
            try:
                rep = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            behind += [f"{b['rank']}@{b['host']}" for b in rep.get("behind", [])]
            summaries.append(rep.get("summary", ""))
        self.set_tags(**{"aitrain.hang": "true", "aitrain.hang.behind": ",".join(behind) or "unknown",
                         "aitrain.hang.summary": " | ".join(summaries)})


def open_client(uri: str) -> Any:
    """The client a store is written through: the embedded store directly, else MLflow's."""
    client: Any = embedded_store(uri)
    if client is None:
        ensure_sqlite_store(uri)
        client = MlflowStore(uri)
    return client


def experiment_id(client: Any, uri: str, name: str) -> str:
    """The id of experiment ``name``, made when missing (an embedded store keeps its artifacts
    beside it, under ``mlartifacts/``)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    artifact_location = None
    if uri.startswith("sqlite:///"):
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except Exception:  # created concurrently by another launch
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def storage_fault(e: BaseException) -> str:
    """``disk full (ENOSPC)`` when ``e`` (or what caused it) is a storage fault, else ''."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return os_error_text(seen)
        text = str(seen).lower()
        for needle, what in (("database or disk is full", "disk full (ENOSPC)"),
                             ("disk i/o error", "disk I/O error (EIO)"),
                             ("readonly database", "read-only (EROFS/EACCES)"),
                             ("no space left on device", "disk full (ENOSPC)")):
            if needle in text:
                return what
        seen = seen.__cause__ or seen.__context__
    return ""


def storage_action(fault: str) -> str:
    """What to do about a :func:`storage_fault`, before replaying the spool."""
    if "ENOSPC" in fault or "EDQUOT" in fault:
        return "free space"
    if "EIO" in fault:
        return "check the disk and its filesystem"
    if "EROFS" in fault or "EACCES" in fault:
        return "make the store writable (its owner, mode or mount)"
    return "fix the store"


def _process_start_time() -> float:
    """When this process started (wall clock), from /proc; now if unknown."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


def _read_lines(path: Path, offset: int, limit: int) -> list[tuple[dict[str, Any], int]]:
    """Up to ``limit`` complete JSON lines after ``offset``: [(record, offset after it)]."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(64 * 1024 * 1024)
    except FileNotFoundError:
        return []
    out: list[tuple[dict[str, Any], int]] = []
    pos = 0
    while len(out) < limit:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        line = data[pos:nl]
        pos = nl + 1
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        out.append((rec if isinstance(rec, dict) else {}, offset + pos))
    return out


def _metrics_of(rec: dict[str, Any], metric_cls: Any, mfu_scale: float | None) -> list[Any]:
    if "phase" in rec and "seconds" in rec:  # phases.jsonl
        return [metric_cls(f"phase/{rec['phase']}_s", float(rec["seconds"]), int(float(rec.get("time", 0)) * 1000), 0)]
    step = int(rec.get("step", 0) or 0)
    ts = int(float(rec.get("time", time.time())) * 1000)
    out = [metric_cls(k, float(v), ts, step) for k, v in rec.items()
           if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    if mfu_scale and isinstance(rec.get("tokens_per_s"), (int, float)) and "mfu" not in rec:
        out.append(metric_cls("mfu", float(rec["tokens_per_s"]) * mfu_scale, ts, step))
    return out


def metric_column(path: Path, key: str) -> list[float]:
    """``key``'s numbers in a metrics.jsonl, in the order they were logged (a bool is no number)."""
    records, _ = read_new(path, 0)
    return [float(r[key]) for r in records
            if isinstance(r, dict) and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
