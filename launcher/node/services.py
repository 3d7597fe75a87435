"""The node agent's services around torch's elastic agent, one set per node.

* rank output: one file per rank under ``<run_dir>/logs/`` and a deduplicated console
  (``logstream.py``), replacing the elastic agent's ``tee``;
* system metrics every ``tracking.system_metrics_interval_s`` into
  ``<run_dir>/system-<node>.jsonl`` (``sysmetrics.py``);
* the hang watchdog over the ranks' heartbeats (``watchdog.py``);
* ``<run_dir>/nodes/<node>.json`` (versions, GPUs) and the agent's own phase marks,
  ``<run_dir>/progress/agent-<node>.json`` (``rendezvous``: request received to ranks spawned).

The options travel in ``AgentRequest.services`` as a plain dict (see :func:`services_options`),
so a Slurm or Ray node agent gets the same services from the same JSON request.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aitrain.launcher.node import logstream, nodeinfo, sysmetrics
from aitrain.launcher.node.exits import ExitClock
from aitrain.launcher.node.watchdog import HangReport, HangWatchdog, terminate_self
from aitrain.launcher.util import write_atomic

if TYPE_CHECKING:
    from aitrain.launcher.job import JobSpec

HANG_EXIT_CODE = 124  # like timeout(1): the job was stopped because it made no progress


@dataclass
class ServicesOptions:
    run_dir: str = ""  # default: the parent of the request's log_dir
    node: str = ""  # node name in metric keys and file names (default: the hostname)
    progress_dir: str = ""  # default: <run_dir>/progress
    system_metrics_interval_s: float = 0.0  # 0: no system metrics
    interfaces: list[str] | None = None  # fabric interfaces to watch (names or prefixes)
    log_ranks: str = "all"
    log_dedup: bool = True
    watchdog_timeout_s: float = 0.0  # 0: no watchdog

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ServicesOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


def services_options(spec: JobSpec, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``AgentRequest.services`` for a JobSpec (what every backend passes to its node agents);
    ``env``: the ranks' env (its tuned interfaces are the ones whose traffic is sampled)."""
    cfg = spec.config
    opts = ServicesOptions(run_dir=str(spec.run_dir), progress_dir=str(Path(spec.run_dir) / "progress"))
    if cfg is not None:
        t = cfg.tracking
        opts.system_metrics_interval_s = float(t.system_metrics_interval_s) if t.enabled and t.system_metrics else 0.0
        opts.interfaces = sysmetrics.interfaces_from_env(dict(env if env is not None else spec.env),
                                                         cfg.fabric.interface)
        opts.log_ranks = str(cfg.log.ranks)
        opts.log_dedup = bool(cfg.log.dedup)
        opts.watchdog_timeout_s = float(cfg.watchdog.timeout_s or 0.0)
    return asdict(opts)


def options_from_run_dir(run_dir: Path) -> dict[str, Any]:
    """Services options from ``<run_dir>/job.yaml``, for a request that carries none."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "job.yaml").read_text()) or {}
    except (OSError, ValueError):
        return {}
    tracking, log = cfg.get("tracking") or {}, cfg.get("log") or {}
    on = tracking.get("enabled", True) and tracking.get("system_metrics", True)
    return {"system_metrics_interval_s": float(tracking.get("system_metrics_interval_s", 10.0)) if on else 0.0,
            "interfaces": sysmetrics.interfaces_from_env(dict(os.environ), (cfg.get("fabric") or {}).get("interface")),
            "log_ranks": str(log.get("ranks", "all")), "log_dedup": bool(log.get("dedup", True)),
            "watchdog_timeout_s": float((cfg.get("watchdog") or {}).get("timeout_s") or 0.0)}


class NodeServices:
    """Started before ``launch_agent``, stopped after it returns (a context manager)."""

    def __init__(self, req: Any) -> None:
        self.req = req
        env = getattr(req, "env", {}) or {}
        given = getattr(req, "services", None) or {}
        run_dir = Path(given.get("run_dir") or env.get("AITRAIN_RUN_DIR") or Path(req.log_dir).parent)
        self.opts = ServicesOptions.from_dict({**(given or options_from_run_dir(run_dir)), "run_dir": str(run_dir)})
        self.node = self.opts.node or env.get("AITRAIN_NODE") or sysmetrics.node_name()
        self.run_dir = run_dir
        self.progress_dir = Path(self.opts.progress_dir or self.run_dir / "progress")
        self.started = time.time()
        self.hang: HangReport | None = None
        self.streams: logstream.RankStreams | None = None
        self.sampler: sysmetrics.SystemMetricsThread | None = None
        self.watchdog: HangWatchdog | None = None
        self.exits = ExitClock(int(getattr(req, "nproc_per_node", 1) or 1))

    def __enter__(self) -> NodeServices:
        self.progress_dir.mkdir(parents=True, exist_ok=True)
        console = logstream.Console(ranks=logstream.parse_ranks(self.opts.log_ranks), dedup=self.opts.log_dedup)
        self.streams = logstream.RankStreams(Path(self.req.log_dir), console)
        self.logs_specs = logstream.rank_logs_specs(self.streams, on_spawn=self._spawned)
        if self.opts.system_metrics_interval_s > 0:
            sampler = sysmetrics.SystemSampler(
                node=self.node, interfaces=self.opts.interfaces, cgroup_pid=self._a_rank_pid,
                gpus=_LazyGpus())
            self.sampler = sysmetrics.SystemMetricsThread(
                sampler, self.run_dir / f"system-{sysmetrics.metric_name(self.node)}.jsonl",
                self.opts.system_metrics_interval_s)
        if self.opts.watchdog_timeout_s > 0:
            self.watchdog = HangWatchdog(progress_dir=self.progress_dir, timeout_s=self.opts.watchdog_timeout_s,
                                         node=self.node, report_dir=self.run_dir, on_hang=self._on_hang)
            self.watchdog.start()
        if self.sampler is not None:
            self.sampler.start()
        # NVML and the NCCL version take a moment on GPU hosts: not on the path to starting ranks.
        self._info_thread = threading.Thread(target=self._write_node_info, name="aitrain-nodeinfo", daemon=True)
        self._info_thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.sampler is not None:
            self.sampler.stop()
        if self.streams is not None:
            self.streams.stop()
        self.exits.stop()
        self._info_thread.join(5)

    # -- pieces -------------------------------------------------------------------

    def ended_at(self, rank: int) -> float | None:
        """When the rank's process ended (None: still running, or not seen)."""
        return self.exits.ended_at(rank)

    def tail(self, rank: int) -> list[str]:
        return self.streams.tail(rank) if self.streams is not None else []

    def err_tail(self, rank: int) -> list[str]:
        return self.streams.err_tail(rank) if self.streams is not None else []

    def _spawned(self, when: float) -> None:
        self.exits.spawned()
        marks = {"node": self.node, "start": self.started, "spawn": when, "rendezvous_s": when - self.started,
                 "rendezvous": f"{getattr(self.req, 'master_addr', '')}:{getattr(self.req, 'master_port', '')}"}
        _write_json(self.progress_dir / f"agent-{sysmetrics.metric_name(self.node)}.json", marks)

    def _write_node_info(self) -> None:
        try:
            info = nodeinfo.collect(self.node, getattr(self.req, "node_rank", 0))
            _write_json(self.run_dir / "nodes" / f"{sysmetrics.metric_name(self.node)}.json", info)
        except Exception as e:  # provenance is best effort
            print(f"aitrain: could not record node info: {e}", file=sys.stderr, flush=True)

    def _a_rank_pid(self) -> int | str:
        from aitrain.launcher.node.watchdog import rank_processes

        pids = rank_processes()
        return min(pids) if pids else "self"

    def _on_hang(self, report: HangReport) -> None:
        self.hang = report
        print(f"aitrain: hang watchdog: {report.summary}\n"
              f"aitrain: stacks of every rank: {report.text_path}; stopping the job", file=sys.stderr, flush=True)
        terminate_self()

    def hang_result(self) -> tuple[int, str, str] | None:
        """(exit code, message, hint) when the watchdog stopped the job."""
        if self.hang is None:
            return None
        return (HANG_EXIT_CODE, f"hang watchdog: {self.hang.summary}",
                f"every rank's stack is in {self.hang.text_path} (and in the MLflow run); "
                "raise watchdog.timeout_s if steps are just slow")


class _LazyGpus:
    """NVML opened in the sampler thread (not on the agent's path to starting ranks)."""

    def __init__(self) -> None:
        self._gpus: sysmetrics.NvmlGpus | None = None

    def sample(self) -> dict[str, float]:
        if self._gpus is None:
            self._gpus = sysmetrics.NvmlGpus()
        return self._gpus.sample()

    def close(self) -> None:
        if self._gpus is not None:
            self._gpus.close()


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=2) + "\n")
