"""The Backend protocol every backend implements, in the spirit of TorchX's ``schedulers/api.py``.

A backend turns a planned :class:`~aitrain.launcher.job.JobSpec` into a request and runs or
submits it:

``dryrun(spec) -> Request``
    pure: the complete request, nothing touched; ``str(request)`` is what would run (the
    ranks and their env, the whole sbatch script, the Ray placement or Jobs API entrypoint).
``run(request) -> Outcome``
    in the foreground: the pipeline (probe, check, tune, smoke) on the job's nodes, then the
    ranks. A failed, interrupted or preempted job is an :class:`Outcome`, not an exception;
    exceptions are for jobs that could not start.
``submit(request) -> handle``
    hand the job over (sbatch, the Ray Jobs API, a detached process on this machine) and
    return its handle (``slurm://cluster/123``, ``ray://head:8265/raysubmit_x``,
    ``local://host/3f9a2c1b``).
``status(handle)``, ``logs(handle, follow, rank)``, ``cancel(handle)`` (idempotent, here),
``list()`` (the jobs submitted from this machine, from :class:`JobRegistry`).

Every backend maps its own states onto one :class:`JobState` in one table.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from aitrain.errors import AitrainError, BackendError
from aitrain.launcher.failures import RankExit
from aitrain.launcher.util import write_atomic

if TYPE_CHECKING:
    from aitrain.launcher.config import JobConfig
    from aitrain.launcher.job import JobSpec

OUTCOME_FILE = "outcome.json"  # in the run dir: how the job ended (written by the launch that ran it)


class JobState(str, Enum):
    """A job's state, whatever runs it."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PREEMPTED = "PREEMPTED"
    UNKNOWN = "UNKNOWN"

    @property
    def terminal(self) -> bool:
        """Ended for good. A PREEMPTED job is not: it is requeued and runs again."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @property
    def mlflow_status(self) -> str:
        """The MLflow run status of a job that ended in this state."""
        return {JobState.SUCCEEDED: "FINISHED", JobState.FAILED: "FAILED"}.get(self, "KILLED")

    def __str__(self) -> str:
        return self.value


@dataclass
class JobStatus:
    """What ``status(handle)`` says about a job, for every backend."""

    handle: str
    state: JobState
    backend: str = ""
    native_state: str = ""  # the scheduler's own word for it (Slurm's TIMEOUT, the Jobs API's STOPPED)
    run_dir: str = ""
    nodes: str = ""
    restarts: int = 0
    exit_code: int | None = None
    message: str = ""
    submitted_at: float | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)  # RankExit dicts, root cause first

    @property
    def done(self) -> bool:
        """Ended, or no longer known to anyone (nothing to wait for)."""
        return self.state.terminal or self.state is JobState.UNKNOWN

    @property
    def ok(self) -> bool:
        return self.state is JobState.SUCCEEDED

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    def __str__(self) -> str:
        native = f"{self.backend}: {self.native_state}" if self.native_state and \
            self.native_state != self.state.value else ""
        lines = [f"{self.handle}: {self.state.value}" + (f" ({native})" if native else "")]
        lines.append(f"  backend:  {self.backend or '-'}")
        if self.nodes:
            lines.append(f"  nodes:    {self.nodes}")
        if self.restarts:
            lines.append(f"  restarts: {self.restarts}")
        lines.append(f"  run dir:  {self.run_dir or '-'}")
        if self.exit_code not in (None, 0):
            lines.append(f"  exit:     {self.exit_code}")
        for i, f in enumerate(self.failures[:4]):
            lines.append(f"  {'failed:' if i == 0 else 'also:  '}   {f.get('message') or f}")
            if i == 0:
                lines.extend(f"            {t}" for t in (f.get("tail") or [])[-6:])
        if self.message and not self.ok and not self.failures:
            lines += [f"  message:  {line}" for line in self.message.strip().splitlines()[-8:]]
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython shows the plain text
        p.text(str(self))


@dataclass(frozen=True)
class Outcome:
    """How a job that ran in the foreground ended (what ``run()`` returns)."""

    state: JobState
    exit_code: int = 0
    message: str = ""
    hint: str = ""
    failures: tuple[RankExit, ...] = ()

    @classmethod
    def succeeded(cls) -> Outcome:
        return cls(JobState.SUCCEEDED)

    @classmethod
    def interrupted(cls, signum: int, message: str) -> Outcome:
        return cls(JobState.CANCELLED, 128 + signum, message)

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "exit_code": self.exit_code, "message": self.message,
                "hint": self.hint, "failures": [f.to_dict() for f in self.failures], "time": time.time()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Outcome:
        return cls(JobState(d.get("state", "UNKNOWN")), int(d.get("exit_code") or 0), str(d.get("message") or ""),
                   str(d.get("hint") or ""), tuple(RankExit.from_dict(f) for f in d.get("failures") or []))


def write_outcome(run_dir: Path, outcome: Outcome) -> None:
    with contextlib.suppress(OSError):
        write_atomic(Path(run_dir) / OUTCOME_FILE, json.dumps(outcome.to_dict(), indent=1))


def read_outcome(run_dir: str | Path) -> Outcome | None:
    try:
        return Outcome.from_dict(json.loads(Path(run_dir, OUTCOME_FILE).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


R = TypeVar("R", bound="Request")


@dataclass
class Request:
    """The dry-run result of a backend: everything ``run`` or ``submit`` needs, nothing started.

    ``env``/``env_reasons``: the job env every rank gets (the spec's, plus what the backend
    adds); ``tags``: facts for the MLflow run; ``remote``: ``submit`` hands it to a scheduler
    (``aitrain launch`` returns with a handle instead of running it here)."""

    spec: JobSpec
    env: dict[str, str] = field(default_factory=dict)
    env_reasons: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    remote: ClassVar[bool] = False

    @classmethod
    def of(cls: type[R], spec: JobSpec, **kw: Any) -> R:
        """A request of this kind for ``spec``, starting from the spec's env and reasons."""
        return cls(spec=spec, env=dict(spec.env), env_reasons=dict(spec.env_reasons), **kw)


class Backend(ABC):
    """One way of reaching nodes. Clients (subprocess runners, Ray) are constructor arguments."""

    name: ClassVar[str]
    scheme: ClassVar[str]  # of its handles: slurm://, ray://, local://

    @abstractmethod
    def dryrun(self, spec: JobSpec) -> Request:
        """The complete request; no side effects."""

    @abstractmethod
    def run(self, request: Request) -> Outcome:
        """Run the job in the foreground until it ends."""

    @abstractmethod
    def submit(self, request: Request) -> str:
        """Hand the job over; its handle."""

    @abstractmethod
    def status(self, handle: str) -> JobStatus: ...

    @abstractmethod
    def logs(self, handle: str, *, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        """The job's output lines (every rank, prefixed), or one rank's; ``follow``: until it ends."""

    @abstractmethod
    def _cancel(self, handle: str, status: JobStatus) -> None:
        """Stop a job that is pending or running."""

    def cancel(self, handle: str) -> str:
        """Stop the job. Idempotent: a job that has ended (or is unknown) is left as it is."""
        st = self.status(handle)
        if st.done:
            return f"{st.handle} is not running ({st.native_state or st.state.value}); nothing to cancel"
        self._cancel(handle, st)
        return f"cancelled {st.handle}"

    def list(self) -> list[JobStatus]:
        """The jobs submitted from this machine to this backend, newest first."""
        return list_jobs(self.name)

    def requeue(self, request: Request) -> None:
        """Put a preempted job back in the queue (only backends that return PREEMPTED)."""
        raise BackendError(f"the {self.name} backend cannot requeue a job")

    def relaunch_settings(self, job: JobConfig) -> tuple[dict[str, str], dict[str, str]]:
        """Overrides the re-run of a submitted job gets: (always set, set unless the user did)."""
        return {}, {}

    def check_ready(self, request: Request) -> None:
        """Before a job runs here: what can be found out in seconds about the cluster it needs
        (a closed port), so the launch stops before it creates a run dir and an MLflow run.
        Not part of the dry run, which touches no cluster. Default: nothing to check."""
        return None


# -- the jobs submitted from this machine -------------------------------------------------------


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "aitrain"


class JobRegistry:
    """``$XDG_STATE_HOME/aitrain/jobs.json``: handle -> backend, run dir, when, (local) pid.

    What ``aitrain list`` shows and what ``status``/``logs`` of a handle look up. Writers take
    a lock; the file is replaced whole. The newest ``KEEP`` entries are kept."""

    KEEP = 500
    FILE = "jobs.json"
    LEGACY = "slurm-jobs.json"  # before every backend had handles: Slurm's alone

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or state_dir()
        self.path = self.directory / self.FILE

    def _read(self) -> dict[str, dict[str, Any]]:
        reg: dict[str, dict[str, Any]] = {}
        try:
            legacy = json.loads((self.directory / self.LEGACY).read_text())
            reg.update({h: {"backend": "slurm", **e} for h, e in legacy.items()})
        except (OSError, ValueError, AttributeError):
            pass
        try:
            reg.update(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            pass
        return reg

    def get(self, handle: str) -> dict[str, Any]:
        return self._read().get(handle, {})

    def entries(self, backend: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        items = [(h, e) for h, e in self._read().items() if backend is None or e.get("backend") == backend]
        return sorted(items, key=lambda he: -float(he[1].get("submitted") or 0))

    def remember(self, handle: str, *, backend: str, run_dir: Path | str, **extra: Any) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(self.directory / ".jobs.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                reg = self._read()
                reg[handle] = {"backend": backend, "run_dir": str(run_dir), "submitted": time.time(),
                               "host": socket.gethostname(), **extra}
                keep = dict(sorted(reg.items(), key=lambda he: -float(he[1].get("submitted") or 0))[:self.KEEP])
                write_atomic(self.path, json.dumps(keep, indent=1), mode=0o600)
        except OSError as e:  # a read-only home must not fail a launch
            print(f"aitrain: warning: could not record {handle} in {self.path}: {e}", flush=True)


def list_jobs(backend: str | None = None, limit: int | None = None) -> list[JobStatus]:
    """The jobs registered on this machine (for ``backend``, or all), newest first, each with
    its state as its own backend reports it (by the handle's scheme)."""
    from aitrain.launcher.backends import backend_for_handle

    out = []
    for handle, entry in JobRegistry().entries(backend)[:limit]:
        try:
            st = backend_for_handle(handle).status(handle)
        except AitrainError as e:
            st = JobStatus(handle, JobState.UNKNOWN, message=e.message)
        st.backend = str(entry.get("backend") or st.backend)
        st.run_dir = st.run_dir or str(entry.get("run_dir") or "")
        st.submitted_at = st.submitted_at or entry.get("submitted")
        out.append(st)
    return out
