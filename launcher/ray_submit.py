"""``aitrain.submit(overrides, address=...)``: start a job on Ray from Python (a notebook) and
get a :class:`Job` handle back: ``status()``, ``logs()``, ``wait()``, ``cancel()``.

Two ways in, picked by the address (else ``RAY_ADDRESS``):

* ``http://head:8265`` (the Jobs API): the cluster runs ``aitrain launch`` of the job as a
  Ray job; the driver, the tracking and the job live on the cluster and keep running when
  the notebook disconnects. ``Job.handle`` (``ray://head:8265/<submission id>``) works with
  ``aitrain status|logs|cancel`` and :func:`attach` from anywhere.
* ``ray://head:10001`` (the Ray client), ``host:port``, or unset (a local Ray): a driver
  process on this machine (``aitrain launch backend=ray``, its own session, so a kernel
  restart does not stop it) connects to the cluster and runs the job; its output is in
  ``<run dir>/driver.log``. The job ends if this machine goes away (use the Jobs API for jobs
  that must outlive it).

Overrides are the same as on the command line, checked against the schema here (a typo
fails in the notebook, not on the cluster).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from aitrain.errors import ConfigError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobState:
    """What ``Job.status()`` returns. state: PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED."""

    state: str
    message: str = ""
    handle: str | None = None
    run_dir: str = ""

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @property
    def ok(self) -> bool:
        return self.state == "SUCCEEDED"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        head = f"{self.handle or 'job'}: {self.state}"
        return head + (f"\n{self.message.strip()}" if self.message.strip() and not self.ok else "")

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython shows the plain text
        p.text(str(self))


class Job:
    """A submitted job. ``status()``, ``logs()``, ``wait()`` and ``cancel()`` (idempotent)."""

    handle: str | None = None
    run_dir: str = ""

    def status(self) -> JobState:
        raise NotImplementedError

    def lines(self, *, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        """The job's output lines (``[rank<N> <node>]:`` prefixed); ``follow``: until it ends."""
        raise NotImplementedError

    def cancel(self) -> str:
        raise NotImplementedError

    def logs(self, *, follow: bool = False, rank: int | None = None, file: TextIO | None = None) -> str:
        """The output so far; ``follow=True`` prints each line as it comes (to ``file``,
        default stdout) until the job ends, and returns all of it."""
        out = []
        for line in self.lines(follow=follow, rank=rank):
            out.append(line)
            if follow:
                print(line, file=file or sys.stdout, flush=True)
        return "\n".join(out)

    def wait(self, timeout: float | None = None, poll_s: float = 1.0) -> JobState:
        """Block until the job ends (or ``timeout`` seconds pass); returns its last state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if st.done or (deadline is not None and time.monotonic() >= deadline):
                return st
            time.sleep(poll_s)

    def __repr__(self) -> str:
        return f"<aitrain.Job {self.handle or self.run_dir}>"


# -- through the Jobs API --------------------------------------------------------------------


class JobsApiJob(Job):
    """A job the cluster runs (Ray Jobs API); survives the notebook."""

    def __init__(self, handle: str, backend: Any = None) -> None:
        from aitrain.launcher.backends.ray import RayBackend

        self.handle = handle
        self._backend = backend or RayBackend()

    def status(self) -> JobState:
        st = self._backend.status(self.handle)
        self.run_dir = st.run_dir or self.run_dir
        message = st.message
        if st.failures:  # root cause first, then the failing rank's last lines from the driver's report
            i = st.message.find("last lines of rank")
            message = "\n".join(f["message"] for f in st.failures) + ("\n" + st.message[i:] if i >= 0 else "")
        return JobState(st.state if st.state != "UNKNOWN" else "FAILED", message, self.handle, st.run_dir)

    def lines(self, *, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        return self._backend.logs(self.handle, follow=follow, rank=rank)

    def cancel(self) -> str:
        return self._backend.cancel(self.handle)


# -- a driver process on this machine --------------------------------------------------------


class DriverJob(Job):
    """``aitrain launch backend=ray`` as a child process of this one (Ray client / GCS / local)."""

    def __init__(self, argv: list[str], run_dir: Path, cwd: str | None = None, env: dict[str, str] | None = None
                 ) -> None:
        self.run_dir = str(run_dir)
        self.log_path = run_dir / "driver.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._cancelled = False
        with open(self.log_path, "ab") as log:
            # Its own session: a Ctrl-C or a kernel interrupt in the notebook is not meant for it.
            self._proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self._proc.pid

    def status(self) -> JobState:
        code = self._proc.poll()
        if code is None:
            return JobState("RUNNING", "", None, self.run_dir)
        if code == 0:
            return JobState("SUCCEEDED", "", None, self.run_dir)
        state = "STOPPED" if self._cancelled or code in (128 + signal.SIGTERM, -signal.SIGTERM) else "FAILED"
        return JobState(state, self._error(), None, self.run_dir)

    def _error(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        i = text.rfind("aitrain: error:")
        return text[i:].strip() if i >= 0 else "\n".join(text.strip().splitlines()[-10:])

    def lines(self, *, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        prefix = None if rank is None else f"[rank{rank} "
        offset, partial = 0, ""
        while True:
            done = self._proc.poll() is not None
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
            except OSError:
                chunk = b""
            parts = (partial + chunk.decode(errors="replace")).split("\n")
            partial = parts.pop()
            if done and partial:
                parts.append(partial)
                partial = ""
            for line in parts:
                if prefix is None or line.startswith(prefix):
                    yield line
            if not follow or done:
                return
            time.sleep(0.3)

    def cancel(self) -> str:
        """SIGTERM to the driver: it stops every rank, kills the actors, removes the placement group."""
        if self._proc.poll() is not None:
            return f"the job is not running ({self.status().state}); nothing to cancel"
        self._cancelled = True
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)  # Ray cleans up a dead driver's actors itself
            self._proc.wait()
        return f"cancelled the job in {self.run_dir}"


# -- entry points ------------------------------------------------------------------------------------


def _check(overrides: Sequence[str]) -> list[str]:
    from aitrain.launcher.cli_launch import normalize_overrides
    from aitrain.launcher.config import validate_overrides

    argv = [str(o) for o in overrides]
    if any(not isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides must be strings like 'nnodes=2', got {list(overrides)!r}",
                          "pass a list of command-line overrides, e.g. ['+strategy=fsdp', 'nnodes=2']")
    argv = normalize_overrides(argv)
    validate_overrides(["backend=ray", *[a for a in argv if not a.startswith("hydra.")]])
    for a in argv:
        key = a.split("=", 1)[0].lstrip("+~")
        if key in ("backend", "dry_run") and a.split("=", 1)[1:] not in (["ray"], ["false"]):
            raise ConfigError(f"{a!r}: aitrain.submit runs on Ray (backend=ray) and always runs the job",
                              "leave backend and dry_run out; use `aitrain launch ... dry_run=true` to look at a plan")
    return argv


def _value(argv: Sequence[str], key: str) -> str | None:
    found = None
    for a in argv:
        k, sep, v = a.partition("=")
        if sep and k.lstrip("+~") == key:
            found = v
    return found


def submit(overrides: Sequence[str] = (), *, address: str | None = None, runtime_env: dict[str, Any] | None = None,
           python: str | None = None, cwd: str | None = None) -> Job:
    """Start a training job on Ray and return its :class:`Job` handle.

    ``overrides``: what follows ``aitrain launch`` (``["+strategy=fsdp", "nnodes=2"]``).
    ``address``: ``http://head:8265`` (Jobs API), ``ray://head:10001`` (Ray client),
    ``host:port``, or None (``RAY_ADDRESS``, else a local Ray). ``runtime_env``: Ray's (Jobs
    API: the job's; e.g. ``{"working_dir": "."}`` for your script). ``python``: the
    interpreter that runs ``aitrain launch`` (on the cluster for the Jobs API).
    """
    from aitrain.launcher.backends.ray import RayBackend, entrypoint_argv, parse_address

    argv = _check(overrides)
    addr = parse_address(address or _value(argv, "backend.address"))
    if addr.kind == "jobs":
        backend = RayBackend(address=addr.value)
        run_root = _value(argv, "run_root")
        entry = entrypoint_argv(argv, python=python or sys.executable)
        client = backend.jobs_client(addr.dashboard)
        try:
            sid = client.submit_job(entrypoint=" ".join(_shell_quote(a) for a in entry),
                                    runtime_env=runtime_env or None,
                                    metadata={"aitrain.overrides": " ".join(argv)[:1000],
                                              **({"aitrain.run_root": run_root} if run_root else {})})
        except Exception as e:
            from aitrain.launcher.backends.ray import connection_error

            raise connection_error(addr, e) from e
        return JobsApiJob(f"ray://{addr.dashboard}/{sid}", backend)
    run_root = Path(cwd or os.getcwd(), _value(argv, "run_root") or "outputs").resolve()
    now = datetime.now()
    run_dir = run_root / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")
    argv = [a for a in argv if a.split("=", 1)[0].lstrip("+~") not in ("backend", "backend.address", "run_root",
                                                                           "hydra.run.dir")]
    launch = [python or sys.executable, "-m", "aitrain.launcher.cli", "launch", "backend=ray", *argv,
              f"run_root={run_root}", f"hydra.run.dir={run_dir}"]
    if addr.value:
        launch.append(f"backend.address={addr.value}")
    if runtime_env:
        launch.append(f"++backend.runtime_env={hydra_value(runtime_env)}")
    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)  # a notebook's active MLflow run is not this job's
    return DriverJob(launch, run_dir, cwd=cwd, env=env)


def attach(handle: str) -> Job:
    """A :class:`Job` for a handle printed earlier (``ray://head:8265/<submission id>``)."""
    from aitrain.launcher.backends.ray import parse_handle

    parse_handle(handle)
    return JobsApiJob(handle)


def _shell_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def hydra_value(value: Any) -> str:
    """A Python value in Hydra's override syntax (``{env_vars:{A:'1'}}``)."""
    import re

    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if not re.match(r"^[A-Za-z_][\w\-]*$", str(k)):
                raise ConfigError(f"runtime_env key {k!r} cannot be passed as a Hydra override",
                                  "use plain names for runtime_env keys (env_vars, working_dir, pip, ...)")
            parts.append(f"{k}:{hydra_value(v)}")
        return "{" + ",".join(parts) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if value is None:
        return "null"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"
