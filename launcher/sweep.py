"""A sweep (``aitrain launch -m``) as one MLflow record, and the value Hydra's sweepers optimise.

* A Hydra callback (:class:`SweepTracking`, in ``configs/config.yaml``) makes one parent MLflow
  run when the sweep starts (tags: the sweep's overrides, the sweeper, the launcher) and writes
  its id to ``<sweep dir>/aitrain-sweep.json``. Every job of the sweep, in this process or in a
  launcher plugin's worker (joblib), finds it there: its run gets ``mlflow.parentRunId`` and a
  name made of its own overrides and the sweep's id, so names never repeat across sweeps.
* Each job returns ``sweep.objective`` (default ``loss``), taken as ``sweep.objective_mode``
  says (``last``, ``min``, ``max``, ``mean_last_N``) from rank 0's ``metrics.jsonl`` or, for a
  user's program that logs to MLflow itself, from its MLflow run: the value Hydra's optimising
  sweepers (``hydra/sweeper=optuna``) read. Each result is appended to
  ``<sweep dir>/aitrain-sweep.jsonl``.
* When the sweep ends the callback records every trial's value on the parent run, the best
  trial (its overrides, run id and value; minimised unless the sweeper says ``maximize``), and
  ends the parent run.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra-core < 1.1
    Callback = object  # type: ignore[assignment,misc]

from aitrain.errors import ConfigError

SWEEP_FILE = "aitrain-sweep.json"
RESULTS_FILE = "aitrain-sweep.jsonl"
NAME_MAX = 240  # MLflow's run name column holds 250


def parse_mode(mode: str) -> tuple[str, int]:
    """``last|min|max|mean_last_N`` -> (kind, N)."""
    if mode in ("last", "min", "max"):
        return mode, 1
    if mode.startswith("mean_last_") and mode[len("mean_last_"):].isdigit() and int(mode[len("mean_last_"):]) > 0:
        return "mean_last", int(mode[len("mean_last_"):])
    raise ConfigError(f"sweep.objective_mode={mode!r} is not one of last, min, max, mean_last_N",
                      "e.g. sweep.objective_mode=mean_last_10 (the mean of the last 10 values)")


def reduce(values: list[float], mode: str) -> float:
    kind, n = parse_mode(mode)
    if kind == "last":
        return values[-1]
    if kind == "min":
        return min(values)
    if kind == "max":
        return max(values)
    tail = values[-n:]
    return sum(tail) / len(tail)


def logged_values(run_dir: Path, key: str, uri: str | None) -> list[float]:
    """``key``'s values in step order: rank 0's metrics.jsonl, else the job's MLflow run."""
    from aitrain.launcher.tracking import metric_column, open_client

    values = metric_column(run_dir / "metrics.jsonl", key)
    if values or uri is None:
        return values
    try:
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
    except OSError:
        return []

    return [m.value for m in open_client(uri).get_metric_history(run_id, key)]


def objective(run_dir: Path, key: str, mode: str, uri: str | None) -> float:
    """The value of this job for the sweeper; a job that logged no ``key`` is an error."""
    values = logged_values(run_dir, key, uri)
    if not values:
        raise ConfigError(f"sweep.objective={key}: the job logged no '{key}' (not in {run_dir / 'metrics.jsonl'} "
                          "nor in its MLflow run)", "set sweep.objective= to a metric the job logs, e.g. loss")
    return reduce(values, mode)


def wait_for_job(backend: Any, handle: str, run_dir: Path, poll_s: float = 2.0) -> tuple[int, Path]:
    """(exit code, run dir) of a submitted job once it has ended (an optimising sweeper needs
    each trial's value before it picks the next)."""
    print(f"aitrain: waiting for {handle} to end: the sweeper needs its result", flush=True)
    while True:
        st = backend.status(handle)
        if st.done:
            return (0 if st.state.value == "SUCCEEDED" else st.exit_code or 1), Path(st.run_dir or run_dir)
        time.sleep(poll_s)


def _sweep_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return None
    return Path(hc.sweep.dir).resolve() if hc.mode == RunMode.MULTIRUN else None


def current_sweep() -> dict[str, Any] | None:
    """The sweep this job belongs to (its parent run), or None outside a multirun."""
    d = _sweep_dir()
    if d is None:
        return None
    try:
        info = json.loads((d / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        info = {}
    info["dir"] = str(d)
    return info


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def child_run_name(overrides: list[str], sweep: dict[str, Any]) -> str:
    """``train.lr=0.001 strategy=fsdp [16-29-32-265139]``: the job's values of the swept keys
    (all its overrides when the sweep's keys are unknown) and the sweep's id."""
    swept = set(sweep.get("swept") or [])
    mine = [o for o in overrides if _key(o) in swept] or overrides
    name = " ".join(mine) or "defaults"
    suffix = f" [{Path(sweep['dir']).name}]"
    return name[:NAME_MAX - len(suffix)] + suffix


def swept_keys(overrides: list[str], sweeper: Any) -> list[str]:
    """The keys a sweep varies: its sweep overrides (``a=1,2``, ``interval(...)``, ``choice(...)``)
    and a sweeper's own search space (``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = []
    try:
        keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]
    except Exception:  # noqa: BLE001 - Hydra has already accepted them; a name is not worth failing for
        pass
    try:
        keys += [str(k) for k in (sweeper.get("params") or {})]
    except Exception:  # noqa: BLE001
        pass
    return keys


def record_result(sweep_dir: str, num: int, overrides: list[str], value: float | None, run_dir: Path,
                  handle: str | None = None) -> None:
    """One job of the sweep: its value (None: failed, or submitted and not waited for) and
    where it is (its run dir, MLflow run, scheduler handle)."""
    try:
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
    except OSError:
        run_id = None
    _append(sweep_dir, {"num": num, "overrides": overrides, "value": value, "run_id": run_id, "run_dir": str(run_dir),
                        "handle": handle})


def _append(sweep_dir: str, record: dict[str, Any]) -> None:
    line = json.dumps({**record, "time": time.time()}) + "\n"
    fd = os.open(Path(sweep_dir) / RESULTS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())  # one write with O_APPEND: lines of parallel jobs never interleave
    finally:
        os.close(fd)


def record_submitted(sweep_dir: str, num: int, overrides: list[str], run_dir: Path, handle: str) -> None:
    """A job handed to a scheduler and not waited for (Hydra's basic sweeper)."""
    _append(sweep_dir, {"num": num, "overrides": overrides, "value": None, "run_dir": str(run_dir), "handle": handle,
                        "submitted": True})


def _tracking(config: Any) -> tuple[str, str] | None:
    """(tracking URI, experiment) of the sweep, or None when tracking is off."""
    from aitrain.launcher.tracking import resolve_tracking_uri

    tracking = config.get("tracking") or {}
    if not tracking.get("enabled", True):
        return None
    return resolve_tracking_uri(tracking.get("uri"), Path(str(config.run_root))), str(tracking.get("experiment"))


def _target(node: Any) -> str:
    try:
        return str(node.get("_target_") or "")
    except Exception:  # noqa: BLE001
        return ""


class SweepTracking(Callback):
    """Hydra callback: the sweep's parent MLflow run (see the module's docstring)."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from aitrain.launcher.redact import redact_text
        from aitrain.launcher.tracking import experiment_id, open_client

        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = list(config.hydra.overrides.task)
        info: dict[str, Any] = {"started": time.time(), "swept": swept_keys(overrides, config.hydra.sweeper)}
        where = _tracking(config)
        if where is not None:
            uri, experiment = where
            tags = {"aitrain.sweep": "parent", "aitrain.sweep.dir": str(sweep_dir),
                    "aitrain.sweep.overrides": redact_text(" ".join(overrides))[:5000],
                    "aitrain.sweep.sweeper": _target(config.hydra.sweeper),
                    "aitrain.sweep.launcher": _target(config.hydra.launcher)}
            try:
                client = open_client(uri)
                run = client.create_run(experiment_id(client, uri, experiment), run_name=f"sweep {sweep_dir.name}",
                                        tags=tags)
                info.update(parent_run_id=run.info.run_id, uri=uri)
                from aitrain.launcher.ghosts import record_launcher

                record_launcher(sweep_dir)  # a killed sweep's run is ended KILLED later (ghosts.recover_sweep)
            except Exception as e:  # the sweep runs anyway; its jobs are tracked on their own
                print(f"aitrain: could not make the sweep's MLflow run: {redact_text(str(e))}", flush=True)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(info) + "\n")

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from aitrain.launcher.mlflow_sqlite import Metric, RunTag

        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        try:
            info = json.loads((sweep_dir / SWEEP_FILE).read_text())
        except (OSError, ValueError):
            return
        parent = info.get("parent_run_id")
        if not parent:
            return
        from aitrain.launcher.tracking import open_client

        results = []
        try:
            for line in (sweep_dir / RESULTS_FILE).read_text().splitlines():
                results.append(json.loads(line))
        except (OSError, ValueError):
            pass
        objective_key = str(config.sweep.objective)
        maximize = "max" in str(config.hydra.sweeper.get("direction", "minimize")).lower()
        scored = [r for r in results if isinstance(r.get("value"), (int, float)) and math.isfinite(r["value"])]
        now = int(time.time() * 1000)
        metrics = [Metric(f"trial/{objective_key}", float(r["value"]), now, int(r["num"])) for r in scored]
        handles = [str(r["handle"]) for r in results if r.get("handle")]
        failed = [r for r in results if r.get("value") is None and not (r.get("handle") and r.get("submitted"))]
        tags = [RunTag("aitrain.sweep.trials", str(len(results))),
                RunTag("aitrain.sweep.failed_trials", str(len(failed)))]
        if handles:  # jobs handed to a scheduler: where to follow them (aitrain status/logs HANDLE)
            tags.append(RunTag("aitrain.sweep.handles", " ".join(handles)[:5000]))
        if scored:
            best = (max if maximize else min)(scored, key=lambda r: r["value"])
            metrics.append(Metric(f"best/{objective_key}", float(best["value"]), now, 0))
            tags += [RunTag("aitrain.sweep.best_overrides", " ".join(best["overrides"])[:5000]),
                     RunTag("aitrain.sweep.best_run_id", str(best.get("run_id") or "")),
                     RunTag("aitrain.sweep.best_value", repr(best["value"]))]
        try:
            client = open_client(info["uri"])
            for i in range(0, len(metrics), 1000):
                client.log_batch(parent, metrics[i:i + 1000])
            client.log_batch(parent, [], [], tags)
            client.set_terminated(parent, status="FINISHED")
        except Exception as e:  # noqa: BLE001
            print(f"aitrain: could not finish the sweep's MLflow run {parent}: {e}", flush=True)
