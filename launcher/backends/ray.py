"""Ray backend: one actor per rank in a placement group, on any Ray cluster.

Where the job runs is ``backend.address`` (else ``RAY_ADDRESS``):

* unset: a running local cluster (``ray start``), else a Ray instance started for this
  job and shut down after it (the embedded default; loopback only, no dashboard);
* ``host:port`` (the GCS) or ``auto``: that cluster, this process is the driver;
* ``ray://head:10001``: the same through the Ray client (this process drives the job
  from outside the cluster);
* ``http://head:8265``: the Ray Jobs API. :meth:`RayBackend.submit` hands the cluster an
  ``aitrain launch`` of the same job as the entrypoint and returns a handle
  ``ray://head:8265/<submission id>`` for ``aitrain status|logs|cancel``; the job keeps
  running without the submitter.

The driver (:mod:`aitrain.launcher.ray_group`) places one bundle per node, starts the
rank actors (:mod:`aitrain.launcher.ray_worker`), probes every Ray node with one task,
checks and tunes the fabric like the Slurm backend, and prints every rank's output with a
``[rank<N> <node>]:`` prefix. A failing rank takes the group down (actors killed,
placement group removed); ``backend.max_failures`` restarts it from the latest checkpoint.

Token auth (Ray >= 2.52): ``ray start --head`` enables it when a token exists
(``~/.ray/auth_token``, which any local ``ray.init()`` creates), and clients then
connect only with ``RAY_AUTH_MODE=token`` set. aitrain sets it whenever it finds a token
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and says so in the
error when none is there.

Ray is imported only when a job actually runs or a handle is queried; ``dryrun`` needs
no Ray at all. The Ray module and the Jobs API client are constructor arguments, so tests
can swap them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from aitrain.errors import BackendError, ConfigError, JobFailedError
from aitrain.launcher.job import JobSpec

HANDLE_RE = re.compile(r"^ray://(?P<dashboard>[^/]+)/(?P<id>[A-Za-z0-9_.\-]+)$")
DEFAULT_DASHBOARD = "127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AUTH_HINT = ("if the cluster uses token authentication (`ray start --head` enables it on Ray >= 2.52 when a "
             "token exists), copy the head node's ~/.ray/auth_token to this machine or set RAY_AUTH_TOKEN "
             "(or RAY_AUTH_TOKEN_PATH); aitrain then sets RAY_AUTH_MODE=token for you")


# -- addresses ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RayAddress:
    """Where the job goes. kind: local (unset: a running local cluster, else start one) |
    gcs (host:port, auto) | client (ray://) | jobs (http(s)://, the Jobs API)."""

    kind: str
    value: str | None = None

    @property
    def dashboard(self) -> str:
        """host:port of the Jobs API (kind jobs)."""
        assert self.value is not None
        return re.sub(r"^https?://", "", self.value).rstrip("/")

    def __str__(self) -> str:
        return {"local": "a running local cluster (ray start), else a Ray instance started for this job",
                "gcs": f"the cluster at {self.value}",
                "client": f"the cluster at {self.value} through the Ray client",
                "jobs": f"the Jobs API at {self.value}"}[self.kind]


def parse_address(address: str | None, environ: Mapping[str, str] | None = None) -> RayAddress:
    env = os.environ if environ is None else environ
    value = (address or "").strip() or (env.get("RAY_ADDRESS") or "").strip()
    if not value:
        return RayAddress("local")
    if value.startswith(("http://", "https://")):
        return RayAddress("jobs", value.rstrip("/"))
    if value.startswith("ray://"):
        return RayAddress("client", value)
    if value == "auto" or re.match(r"^[\w.\-\[\]:]+:\d+$", value):
        return RayAddress("gcs", value)
    raise ConfigError(f"backend.address={value!r} is not a Ray address",
                      "use host:port (the GCS), ray://head:10001 (Ray client), http://head:8265 (Jobs API), "
                      "auto, or leave it unset for a local Ray")


def find_token(environ: Mapping[str, str] | None = None) -> str | None:
    """Where this machine has a Ray auth token (what ``RAY_AUTH_MODE=token`` will use), or None."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    for path in (env.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if path and Path(path).is_file() and Path(path).stat().st_size > 0:
            return path
    return None


def ensure_token_auth(environ: dict[str, str] | None = None) -> str | None:
    """Set ``RAY_AUTH_MODE=token`` when a token is available and the mode is unset.

    Ray clients do not turn token auth on by themselves: without it they time out against a
    ``ray start --head`` cluster. A token sent to a cluster without auth is ignored, so
    setting it whenever a token is found is safe. Returns the token's source, or None.
    """
    env = os.environ if environ is None else environ
    where = find_token(env)
    if where and "RAY_AUTH_MODE" not in env:
        env["RAY_AUTH_MODE"] = "token"
        if env is os.environ and "ray" in sys.modules:
            with contextlib.suppress(Exception):  # ray already imported: refresh its cached config
                from ray._raylet import Config

                Config.initialize("")
    return where


SERVER_SIDE_INIT_FAILURE = "Initialization failure from server"


def connection_error(address: RayAddress, e: BaseException) -> BackendError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if SERVER_SIDE_INIT_FAILURE in str(e):
        # The Ray client server on the head sends its traceback: its last line is the reason.
        reason = [x.strip() for x in str(e).splitlines() if x.strip()][-1]
        return BackendError(
            f"cannot connect to {address}: the Ray client server on the head could not start this "
            f"client's session: {reason}",
            "see ray_client_server*.err under the head's Ray logs (session_latest/logs); on a busy head "
            "the per-client server may need longer than 30 s to start: start the head with "
            "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S=120 in its environment")
    auth = "auth" in str(e).lower() or "token" in str(e).lower() or "connection timeout" in str(e).lower()
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    hint = (f"{AUTH_HINT} (RAY_AUTH_MODE is {mode}; token found: {find_token() or 'none'})" if auth or mode != "token"
            else "is the cluster up (`ray status` on the head) and reachable from here?")
    return BackendError(f"cannot connect to {address}: {text}", hint)


# -- requests (what dry_run prints) -------------------------------------------------------------


@dataclass
class RayRequest:
    """Run the job from this process: placement group, one actor per rank."""

    spec: JobSpec
    address: RayAddress
    opts: Any
    bundles: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        from aitrain.launcher.ray_group import STRATEGIES, rank_slots, worker_resources

        spec, o = self.spec, self.opts
        lines = [f"backend: ray ({self.address})",
                 f"run dir: {spec.run_dir}",
                 f"placement group: {len(self.bundles)} bundle(s), one per node, {STRATEGIES[o.placement]}: "
                 f"{self.bundles[0] if self.bundles else {}}",
                 f"workers: one actor per rank, {worker_resources(o)} each; {spec.world_size} rank(s) "
                 f"({spec.nnodes} node(s) x {spec.nproc_per_node})",
                 f"failures: a failed rank stops the group; restarts: {o.max_failures} "
                 "(from the latest checkpoint, resume=auto)",
                 f"command: {shlex.join(spec.argv)}",
                 "fabric: probed on every Ray node (one task each), checked and tuned per node at launch; "
                 "rendezvous = node 0's address on its tuned interface"]
        if o.runtime_env:
            lines.append(f"runtime_env: {json.dumps(o.runtime_env, sort_keys=True)}")
        lines += [f"note: {n}" for n in self.notes]
        for s in rank_slots(spec.nnodes, spec.nproc_per_node):
            lines.append(f"rank {s.rank}: {s.node} local_rank {s.local_rank}  "
                         f"[output prefix [rank{s.rank} {s.node}]:, log {spec.log_dir}/{s.node}/rank{s.rank}.log]")
        lines.append("env of every rank (plus RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, "
                     "MASTER_PORT and the node's tuned env):")
        from aitrain.launcher.redact import redact_value

        for k in sorted(spec.env):
            reason = spec.env_reasons.get(k)
            lines.append(f"    {k}={redact_value(k, spec.env[k])}" + (f"    # {reason}" if reason else ""))
        return "\n".join(lines)


@dataclass
class RayJobRequest:
    """Submit through the Jobs API: the cluster runs ``aitrain launch`` of the same job."""

    spec: JobSpec
    address: RayAddress
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]

    def __str__(self) -> str:
        lines = [f"backend: ray (submit to {self.address}; the cluster runs the job and tracks it)",
                 f"entrypoint: {self.entrypoint}"]
        if self.runtime_env:
            lines.append(f"runtime_env: {json.dumps(self.runtime_env, sort_keys=True)}")
        lines.append(f"metadata: {json.dumps(self.metadata, sort_keys=True)}")
        return "\n".join(lines)


def entrypoint_argv(overrides: Sequence[str], *, python: str, run_dir: str | None = None,
                    run_root: str | None = None) -> list[str]:
    """``aitrain launch`` of the same job, as the cluster runs it (driver on the cluster)."""
    for o in overrides:
        if any(c in o for c in "\n\r\x00"):
            raise ConfigError(f"override {o!r} contains a newline", "pass one override per argument")
    drop = ("dry_run", "backend.address", "hydra.run.dir", "run_root") if run_dir else ("dry_run", "backend.address")
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in drop]
    if not any(o.split("=", 1)[0].lstrip("+") == "backend" for o in kept):
        kept.insert(0, "backend=ray")
    argv = [python, "-m", "aitrain.launcher.cli", "launch", *kept, "backend.address=auto"]
    if run_root:
        argv.append(f"run_root={run_root}")
    if run_dir:
        argv.append(f"hydra.run.dir={run_dir}")
    return argv


# -- status of a Jobs API job -----------------------------------------------------------------------


@dataclass
class RayJobStatus:
    handle: str
    state: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED (the Jobs API's), or UNKNOWN
    message: str = ""
    run_dir: str = ""
    entrypoint: str = ""
    start_time: float | None = None
    end_time: float | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL or self.state == "UNKNOWN"

    @property
    def ok(self) -> bool:
        return self.state == "SUCCEEDED"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"{self.handle}: {self.state}", f"  run dir:  {self.run_dir or '-'}"]
        if self.start_time:
            end = self.end_time or time.time()
            lines.append(f"  elapsed:  {end - self.start_time:.0f}s")
        for i, f in enumerate(self.failures):
            lines.append(f"  {'failed:' if i == 0 else 'also:  '}   {f['message']}")
        if self.message and self.state not in ("RUNNING", "SUCCEEDED"):
            lines += [f"  message:  {line}" for line in self.message.strip().splitlines()[-8:]]
        return "\n".join(lines)


_FAILED_LINE = re.compile(r"^(?:aitrain: error: )?the job failed.*?: (rank \d+ on \S+ .*)$")
_ALSO_LINE = re.compile(r"^also: (rank \d+ on \S+ .*)$")


def failures_from_logs(text: str) -> list[dict[str, Any]]:
    """The driver's failure report in a job's output: root cause first."""
    out = []
    for line in text.splitlines():
        m = _FAILED_LINE.match(line.strip()) or _ALSO_LINE.match(line.strip())
        if m:
            rank = int(re.match(r"rank (\d+)", m.group(1)).group(1))  # type: ignore[union-attr]
            node = m.group(1).split()[3]
            out.append({"rank": rank, "node": node, "message": m.group(1)})
    return out


def parse_handle(handle: str, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``ray://host:8265/<id>`` (or a bare submission id) -> (dashboard host:port, id)."""
    env = os.environ if environ is None else environ
    h = handle.strip()
    m = HANDLE_RE.match(h)
    if m:
        return m.group("dashboard"), m.group("id")
    if re.match(r"^raysubmit_\w+$", h) or re.match(r"^[\w.\-]+$", h) and not h.isdigit():
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            v = env.get(var, "")
            if v.startswith(("http://", "https://")):
                return re.sub(r"^https?://", "", v).rstrip("/"), h
        return DEFAULT_DASHBOARD, h
    raise ConfigError(f"{handle!r} is not a Ray job handle",
                      "use the handle `aitrain launch backend=ray backend.address=http://head:8265` printed "
                      "(ray://<head>:<dashboard port>/<submission id>)")


def _jobs_client(dashboard: str) -> Any:
    ensure_token_auth()
    from ray.job_submission import JobSubmissionClient

    url = dashboard if dashboard.startswith(("http://", "https://")) else f"http://{dashboard}"
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # ConnectionError, AuthenticationError, ...
        raise connection_error(RayAddress("jobs", url), e) from e


# -- the backend ---------------------------------------------------------------------------------


class RayBackend:
    name = "ray"

    def __init__(self, *, ray_module: Any = None, jobs_client: Callable[[str], Any] = _jobs_client,
                 environ: Mapping[str, str] | None = None, **options: Any) -> None:
        from aitrain.launcher.config import RayBackendConfig, backend_options

        self.opts = backend_options(RayBackendConfig, options, "Ray")
        self._ray = ray_module
        self.jobs_client = jobs_client
        self.environ = os.environ if environ is None else environ
        from aitrain.launcher.ray_group import STRATEGIES

        if self.opts.placement not in STRATEGIES:
            raise ConfigError(f"backend.placement={self.opts.placement!r} is not one of {', '.join(STRATEGIES)}",
                              "spread puts each node's bundle on its own Ray node where it can; pack fills "
                              "Ray nodes first")
        if self.opts.max_failures < 0:
            raise ConfigError(f"backend.max_failures={self.opts.max_failures} is negative",
                              "0 means a failure ends the job; N restarts the group up to N times")

    @property
    def address(self) -> RayAddress:
        return parse_address(self.opts.address, self.environ)

    # The launch asks: does dryrun's result get submitted, or run here?
    def in_allocation(self) -> bool:
        """False only for a Jobs API address from outside a Ray job: that one is submitted."""
        from aitrain.launcher.environment import detect

        return self.address.kind != "jobs" or detect(self.environ).kind == "ray"

    def dryrun(self, spec: JobSpec) -> RayRequest | RayJobRequest:
        from aitrain.launcher.ray_group import node_bundles

        addr = self.address
        tags = getattr(spec, "tags", None)
        if isinstance(tags, dict):
            tags.update({"ray.address": addr.value or "local", "ray.placement": self.opts.placement})
        if not self.in_allocation():
            run_root = str(Path(spec.config.run_root).resolve()) if spec.config is not None else None
            argv = entrypoint_argv(spec.overrides, python=self.opts.python or sys.executable,
                                   run_dir=str(spec.run_dir), run_root=run_root)
            return RayJobRequest(spec, addr, shlex.join(argv), dict(self.opts.runtime_env or {}),
                                 {"aitrain.run_dir": str(spec.run_dir), "aitrain.name": spec.name})
        if spec.nproc_per_node < 1 or spec.nnodes < 1:
            raise ConfigError(f"nnodes={spec.nnodes}, nproc_per_node={spec.nproc_per_node}: need 1 or more of each",
                              "set nnodes and nproc_per_node to 1 or more")
        req = RayRequest(spec, addr, self.opts, node_bundles(self.opts, spec.nnodes, spec.nproc_per_node))
        cfg = spec.config
        if cfg is not None and (cfg.binding != "none" or cfg.resources.cgroup or cfg.profile != "none"):
            req.notes.append("binding, resources.cgroup and profile are applied by the local backend only; "
                             "Ray places and limits the workers (backend.cpus_per_worker, ...)")
        if spec.nnodes > 1:
            req.notes.append("several nodes: the run directory (config, checkpoints, logs, metrics) must be on a "
                             "filesystem every node shares; the job config is also shipped to each node")
        return req

    # -- the Jobs API: submit from outside, follow by handle ---------------------------------

    def submit(self, req: RayJobRequest) -> str:
        client = self.jobs_client(req.address.dashboard)
        try:
            sid = client.submit_job(entrypoint=req.entrypoint, runtime_env=req.runtime_env or None,
                                    metadata=req.metadata)
        except Exception as e:
            raise connection_error(req.address, e) from e
        handle = f"ray://{req.address.dashboard}/{sid}"
        with contextlib.suppress(OSError):
            (req.spec.run_dir / "ray-handle").write_text(handle + "\n")
        return handle

    def status(self, handle: str) -> RayJobStatus:
        dashboard, sid = parse_handle(handle, self.environ)
        handle = f"ray://{dashboard}/{sid}"
        client = self.jobs_client(dashboard)
        try:
            info = client.get_job_info(sid)
        except RuntimeError as e:  # the Jobs API answers 404 as RuntimeError
            if "not" in str(e).lower() and "exist" in str(e).lower() or "404" in str(e):
                return RayJobStatus(handle, "UNKNOWN", f"no job {sid} on the Jobs API at {dashboard}")
            raise BackendError(f"cannot get the status of {handle}: {e}", "is the dashboard reachable?") from e
        except Exception as e:  # AuthenticationError, connection errors
            raise connection_error(RayAddress("jobs", f"http://{dashboard}"), e) from e
        state = str(getattr(info.status, "value", info.status))
        st = RayJobStatus(handle, state, info.message or "", (info.metadata or {}).get("aitrain.run_dir", ""),
                          info.entrypoint or "", (info.start_time or 0) / 1000 or None,
                          (info.end_time or 0) / 1000 or None)
        if state == "FAILED" or not st.run_dir:
            text = ""
            with contextlib.suppress(Exception):
                text = client.get_job_logs(sid)
            if state == "FAILED":
                st.failures = failures_from_logs(text)
            if not st.run_dir:  # chosen on the cluster (aitrain.submit without run_root): the driver says where
                m = re.search(r"backend ray; run dir (\S+)", text)
                st.run_dir = m.group(1) if m else ""
        return st

    def logs(self, handle: str, *, follow: bool = False, rank: int | None = None,
             poll_s: float = 0.5) -> Iterator[str]:
        """The job's output (every rank, prefixed), or one rank's; --follow until the job ends."""
        dashboard, sid = parse_handle(handle, self.environ)
        if rank is not None:
            own = self._rank_log(f"ray://{dashboard}/{sid}", rank)
            if own is not None:  # the rank's own full log (the job's output folds repeated lines)
                yield from _follow_file(own, lambda: not follow or self.status(f"ray://{dashboard}/{sid}").done,
                                        poll_s)
                return
        client = self.jobs_client(dashboard)
        prefix = None if rank is None else f"[rank{rank} "
        seen = 0
        partial = ""
        while True:
            done = not follow or self.status(f"ray://{dashboard}/{sid}").done
            try:
                text = client.get_job_logs(sid)
            except Exception as e:
                raise connection_error(RayAddress("jobs", f"http://{dashboard}"), e) from e
            chunk, seen = text[seen:], len(text)
            chunk = partial + chunk
            lines = chunk.split("\n")
            partial = lines.pop() if not done else ""
            if done and lines and lines[-1] == "":
                lines.pop()
            for line in lines + ([partial] if done and partial else []):
                if prefix is None or line.startswith(prefix):
                    yield line
            if done:
                return
            time.sleep(poll_s)

    def _rank_log(self, handle: str, rank: int) -> Path | None:
        """``<run dir>/logs/<node>/rank<N>.log`` when the run dir is on this machine (shared FS)."""
        try:
            run_dir = self.status(handle).run_dir
        except Exception:  # noqa: BLE001 - fall back to the job's output
            return None
        found = sorted(Path(run_dir).glob(f"logs/*/rank{rank}.log")) if run_dir else []
        return found[0] if found else None

    def cancel(self, handle: str) -> str:
        """Idempotent: cancelling a finished or unknown job is not an error."""
        st = self.status(handle)
        if st.done:
            return f"{st.handle} is not running ({st.state}); nothing to cancel"
        dashboard, sid = parse_handle(handle, self.environ)
        try:
            self.jobs_client(dashboard).stop_job(sid)
        except Exception as e:
            raise connection_error(RayAddress("jobs", f"http://{dashboard}"), e) from e
        return f"cancelled {st.handle}"

    # -- driving the job from this process ------------------------------------------------------

    @contextlib.contextmanager
    def connect(self, spec: JobSpec) -> Iterator[Any]:
        """``ray.init`` for this job (ours to shut down after), or the caller's connection."""
        addr = self.address
        if addr.kind == "jobs":  # inside a Ray job (RAY_JOB_ID set): that job's cluster
            addr = RayAddress("gcs", "auto")
        ensure_token_auth()
        embedded = addr.kind == "local" and _no_running_cluster()
        if embedded and "ray" not in sys.modules:
            # Ray's single-machine mode: every Ray process binds and registers 127.0.0.1 (it would
            # otherwise take this machine's network address, even with _node_ip_address=127.0.0.1).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray = self._ray
        if ray is None:
            import ray  # noqa: F811 - the lazy import: only when the backend runs a job
        if ray.is_initialized():
            yield ray
            return
        kwargs: dict[str, Any] = {"namespace": "aitrain", "log_to_driver": False, "logging_level": logging.WARNING}
        from aitrain.launcher.environment import detect

        if self.opts.runtime_env and detect(self.environ).kind != "ray":
            # (inside a Jobs API job the job already has it: the submission's runtime_env)
            kwargs["runtime_env"] = dict(self.opts.runtime_env)
        if embedded:
            from aitrain.launcher.ray_group import worker_resources

            need = worker_resources(self.opts)
            world = spec.world_size
            kwargs.update(
                num_cpus=int(self.opts.num_cpus or max(os.cpu_count() or 1, math.ceil(need.get("CPU", 0) * world))),
                include_dashboard=False,
            )
            custom = {k: v * world for k, v in need.items() if k not in ("CPU", "GPU")}
            if custom:
                kwargs["resources"] = custom
            print(f"aitrain: ray: no cluster given or running; starting a local Ray instance for this job "
                  f"({kwargs['num_cpus']} CPUs)", flush=True)
        else:
            kwargs["address"] = addr.value if addr.kind != "local" else None
        _quiet_ray_logs()
        for attempt in (1, 2):
            try:
                ray.init(**kwargs)
                break
            except Exception as e:  # ConnectionError, RuntimeError, AuthenticationError, TimeoutError
                if attempt == 1 and addr.kind == "client" and SERVER_SIDE_INIT_FAILURE in str(e):
                    # The head's client server failed to start our session (slow on a busy head):
                    # a new session usually starts fine.
                    print(f"aitrain: ray: {connection_error(addr, e).message.split(': ', 1)[1]}; trying once more",
                          flush=True)
                    with contextlib.suppress(Exception):
                        ray.shutdown()
                    continue
                raise connection_error(addr, e) from e
        try:
            yield ray
        finally:
            with contextlib.suppress(Exception):
                ray.shutdown()

    def run(self, req: RayRequest) -> int:
        """Drive the job: place, probe, tune, run the ranks; restart up to max_failures times."""
        from aitrain.launcher.ray_group import (Interrupted, NodesExcluded, job_config_for_attempt, raise_failed,
                                                run_group)
        from aitrain.launcher.tracking import record_world

        spec = req.spec
        config_file = spec.run_dir / "job.yaml"
        files = {str(config_file): config_file.read_text()} if config_file.is_file() else {}
        cwd = None if (self.opts.runtime_env or {}).get("working_dir") else os.getcwd()
        argv = list(spec.argv)
        excluded: list[str] = []  # Ray nodes the smoke test proved bad (fabric.exclude_bad_nodes=true)
        excluded_labels: list[str] = []
        with self.connect(spec) as ray:
            for attempt in range(self.opts.max_failures + 1):
                if attempt and str(config_file) in argv:
                    resume = getattr(spec.config, "resume", "none")
                    path, text = job_config_for_attempt(config_file, attempt, resume)
                    path.write_text(text)
                    files = {str(path): text}
                    argv = [str(path) if a == str(config_file) else a for a in spec.argv]
                try:
                    while True:
                        try:
                            failures = run_group(ray, spec, self.opts, attempt=attempt, argv=argv, files=files,
                                                 cwd=cwd, exclude_nodes=excluded)
                            break
                        except NodesExcluded as e:
                            # Placed again without them: not a failure of the job, no restart used.
                            print(f"aitrain: ray: {e.message}", flush=True)
                            excluded += e.ray_node_ids
                            excluded_labels += e.labels
                            spec.nnodes -= e.job_nodes
                            record_world(spec.run_dir, nnodes=spec.nnodes, nproc_per_node=spec.nproc_per_node,
                                         excluded=excluded_labels)
                except (Interrupted, KeyboardInterrupt) as e:
                    signum = e.signum if isinstance(e, Interrupted) else 2
                    name = "SIGINT" if signum == 2 else str(e)
                    raise JobFailedError(f"interrupted by {name}; every rank was stopped, the actors and the "
                                         "placement group removed", exit_code=128 + signum) from None
                if not failures:
                    return 0
                if attempt == self.opts.max_failures:
                    raise_failed(failures, spec, attempt + 1)
                from aitrain.launcher.ray_group import failure_message

                print(f"aitrain: ray: {failure_message(failures).splitlines()[0]}; restarting the group "
                      f"(restart {attempt + 1} of at most {self.opts.max_failures}) from the latest checkpoint",
                      flush=True)
        return 0


def _follow_file(path: Path, done: Callable[[], bool], poll_s: float) -> Iterator[str]:
    """A file's lines; then, until ``done()``, the lines appended to it."""
    offset, partial = 0, ""
    while True:
        finished = done()
        with open(path, errors="replace") as f:
            f.seek(offset)
            chunk = f.read()
            offset = f.tell()
        lines = (partial + chunk).split("\n")
        partial = lines.pop()
        if finished and partial:
            lines.append(partial)
        yield from lines
        if finished:
            return
        time.sleep(poll_s)


def _no_running_cluster() -> bool:
    """No RAY_ADDRESS and no cluster started with `ray start` on this machine (the file
    `ray start` leaves and `ray stop` removes; what ``ray.init()`` itself looks at)."""
    if os.environ.get("RAY_ADDRESS"):
        return False
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return not (Path(tmp) / "ray" / "ray_current_cluster").exists()


def _quiet_ray_logs() -> None:
    # Ray's own INFO lines (and the auth banner) are noise next to the ranks' output.
    for name in ("ray", "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(name).setLevel(logging.ERROR)
