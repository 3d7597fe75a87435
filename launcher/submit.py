"""``aitrain.submit`` and ``aitrain.attach``: a training job from a notebook or a script, on
any backend, as a :class:`Job` handle (status, logs, wait, cancel).

    job = aitrain.submit(["+strategy=fsdp", "train.steps=100"])             # local, detached
    job = aitrain.submit(["backend=slurm", "nnodes=2"])                      # sbatch
    job = aitrain.submit([...], address="http://head:8265")                 # the Ray Jobs API
    job = aitrain.submit([...], address="ray://head:10001")                 # a Ray driver here
    job.logs(follow=True); job.wait(); job.cancel()
    aitrain.attach("slurm://cluster/1234").status()

The overrides are those of ``aitrain launch``, composed and checked here (a typo fails in the
notebook, not on the cluster). The job is planned once, like a launch, and handed to its
backend's ``submit``: a local job (or a Ray job driven from this machine) runs as a
detached ``aitrain launch`` process that outlives the notebook, its console in
``<run dir>/launch.log``; a Slurm job goes to sbatch; a Jobs API job to the cluster.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from aitrain.errors import ConfigError
from aitrain.launcher.backends.api import Backend, JobStatus


class Job:
    """A job by its handle: ``status()``, ``logs()``, ``wait()`` and ``cancel()`` (idempotent)."""

    def __init__(self, handle: str, backend: Backend | None = None) -> None:
        from aitrain.launcher.backends import backend_for_handle

        self.handle = handle
        self._backend = backend if backend is not None else backend_for_handle(handle)
        self.run_dir = ""

    def status(self) -> JobStatus:
        st = self._backend.status(self.handle)
        self.run_dir = st.run_dir or self.run_dir
        return st

    def lines(self, *, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        """The job's output lines (``[rank<N>]:`` prefixed); ``follow``: until it ends."""
        return self._backend.logs(self.handle, follow=follow, rank=rank)

    def logs(self, *, follow: bool = False, rank: int | None = None, file: TextIO | None = None) -> str:
        """The output so far; ``follow=True`` prints each line as it comes (to ``file``,
        default stdout) until the job ends, and returns all of it."""
        out = []
        for line in self.lines(follow=follow, rank=rank):
            out.append(line)
            if follow:
                print(line, file=file or sys.stdout, flush=True)
        return "\n".join(out)

    def wait(self, timeout: float | None = None, poll_s: float = 1.0) -> JobStatus:
        """Block until the job ends (or ``timeout`` seconds pass); returns its last status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if st.done or (deadline is not None and time.monotonic() >= deadline):
                return st
            time.sleep(poll_s)

    def cancel(self) -> str:
        return self._backend.cancel(self.handle)

    def __repr__(self) -> str:
        return f"<aitrain.Job {self.handle}>"


def _value(argv: Sequence[str], key: str) -> str | None:
    found = None
    for a in argv:
        k, sep, v = a.partition("=")
        if sep and k.lstrip("+~") == key:
            found = v
    return found


def _check(overrides: Sequence[str]) -> list[str]:
    from aitrain.launcher.cli.launch import normalize_overrides
    from aitrain.launcher.config import validate_overrides

    if isinstance(overrides, str) or any(not isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides must be a list of strings like 'nnodes=2', got {overrides!r}",
                          "pass a list of command-line overrides, e.g. ['+strategy=fsdp', 'nnodes=2']")
    argv = normalize_overrides(list(overrides))
    validate_overrides([a for a in argv if not a.startswith("hydra.")])
    if (_value(argv, "dry_run") or "false").lower() not in ("false", "0", "no", "off"):
        raise ConfigError("aitrain.submit always runs the job (dry_run is for `aitrain launch`)",
                          "leave dry_run out; use `aitrain launch ... dry_run=true` to look at a plan")
    return argv


@contextmanager
def _cwd(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def submit(overrides: Sequence[str] = (), *, address: str | None = None, runtime_env: dict[str, Any] | None = None,
           python: str | None = None, cwd: str | None = None) -> Job:
    """Start a training job and return its :class:`Job` handle.

    ``overrides``: what follows ``aitrain launch`` (``["+strategy=fsdp", "nnodes=2"]``); the
    backend is theirs (``backend=slurm``...), local by default, Ray when ``address`` is given.
    ``address``: ``http://head:8265`` (Ray Jobs API), ``ray://head:10001`` (Ray client),
    ``host:port`` (a Ray GCS). ``runtime_env``: Ray's (``{"working_dir": "."}`` ships your
    script). ``python``: the interpreter that runs the job where it starts (Slurm, Ray).
    ``cwd``: the directory the job is launched from (relative paths resolve against it)."""
    from aitrain.launcher.cli.launch import compose_job, composing, plan

    argv = _check(overrides)
    backend = _value(argv, "backend")
    if address is not None or runtime_env is not None:
        if backend not in (None, "ray"):
            raise ConfigError(f"address= and runtime_env= are for backend=ray, not backend={backend}",
                              "leave them out, or submit with backend=ray")
        if backend is None:
            argv.insert(0, "backend=ray")
        if address is not None:
            argv.append(f"backend.address={address}")
        if runtime_env is not None:
            argv.append(f"++backend.runtime_env={hydra_value(runtime_env)}")
    if python is not None:
        if (backend or ("ray" if address or runtime_env else "local")) == "local":
            raise ConfigError("python= is for backend=slurm and backend=ray (the interpreter where the job starts)",
                              "a local job runs with this interpreter; leave python out")
        argv.append(f"backend.python={python}")
    with _cwd(cwd), composing():
        cfg = compose_job(argv)
        be, request = plan(cfg, argv)
        handle = be.submit(request)
    job = Job(handle, None)
    job.run_dir = str(request.spec.run_dir)
    return job


def attach(handle: str) -> Job:
    """A :class:`Job` for a handle printed earlier (``local://``, ``slurm://`` or ``ray://``)."""
    job = Job(handle)
    job.status()  # a handle no backend can read fails here, not later
    return job


def hydra_value(value: Any) -> str:
    """A Python value in Hydra's override syntax (``{env_vars:{A:'1'}}``)."""
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
