"""The Ray Jobs API side of ``backend=ray``: a job the cluster runs, followed by its handle.

``submit`` hands the cluster the job's relaunch command as the entrypoint (``aitrain launch``
of the same job with ``backend.address=auto``): the driver and the MLflow tracking live on the
cluster and the job keeps running without the submitter. The handle is
``ray://<head>:<dashboard port>/<submission id>``.

How the job ended is data: the driver writes ``outcome.json`` in the run dir and, inside a Ray
job, prints it as the last line of its output (``aitrain: outcome: {...}``), which is what a
submitter without the run dir reads back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from aitrain.errors import BackendError, ConfigError
from aitrain.launcher.backends.api import JobState, JobStatus, Outcome, read_outcome
from aitrain.launcher.backends.ray.address import (
    RayAddress,
    check_reachable,
    connection_error,
    ensure_token_auth,
    import_ray,
)

HANDLE_RE = re.compile(r"^ray://(?P<dashboard>[^/]+)/(?P<id>[A-Za-z0-9_.\-]+)$")
DEFAULT_DASHBOARD = "127.0.0.1:8265"
OUTCOME_LINE = "aitrain: outcome: "  # the driver's last line inside a Ray job (JSON)

# The Jobs API's states (ray.job_submission.JobStatus) -> JobState.
STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING, "RUNNING": JobState.RUNNING, "SUCCEEDED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED, "STOPPED": JobState.CANCELLED,
}


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


def jobs_client(dashboard: str) -> Any:
    """A ``JobSubmissionClient`` for the head's dashboard (token auth turned on when found)."""
    ensure_token_auth()
    url = dashboard if dashboard.startswith(("http://", "https://")) else f"http://{dashboard}"
    import_ray()
    check_reachable(RayAddress("jobs", url))  # at once, where nothing listens (Ray retries, then blames auth)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except Exception as e:  # ConnectionError, AuthenticationError, ...
        raise connection_error(RayAddress("jobs", url), e) from e


def outcome_from_logs(text: str) -> Outcome | None:
    """The driver's outcome line in a job's output, if it got to print one."""
    for line in reversed(text.splitlines()):
        if line.startswith(OUTCOME_LINE):
            try:
                return Outcome.from_dict(json.loads(line[len(OUTCOME_LINE):]))
            except (ValueError, TypeError, KeyError):
                return None
    return None


def run_dir_from_logs(text: str) -> str:
    """Where the driver said the run dir is (chosen on the cluster when the submitter gave no run_root)."""
    m = re.search(r"backend ray; run dir (\S+)", text)
    return m.group(1) if m else ""


class JobsApi:
    """status/logs/cancel of a Jobs API job through a client (``client_for(dashboard)``)."""

    def __init__(self, client_for: Callable[[str], Any], environ: Mapping[str, str] | None = None) -> None:
        self.client_for = client_for
        self.environ = environ

    def _error(self, dashboard: str, e: BaseException) -> BackendError:
        return connection_error(RayAddress("jobs", f"http://{dashboard}"), e)

    def status(self, handle: str) -> JobStatus:
        dashboard, sid = parse_handle(handle, self.environ)
        handle = f"ray://{dashboard}/{sid}"
        client = self.client_for(dashboard)
        try:
            info = client.get_job_info(sid)
        except RuntimeError as e:  # the Jobs API answers 404 as RuntimeError
            if "not" in str(e).lower() and "exist" in str(e).lower() or "404" in str(e):
                return JobStatus(handle, JobState.UNKNOWN, "ray",
                                 message=f"no job {sid} on the Jobs API at {dashboard}")
            raise BackendError(f"cannot get the status of {handle}: {e}", "is the dashboard reachable?") from e
        except Exception as e:  # AuthenticationError, connection errors
            raise self._error(dashboard, e) from e
        native = str(getattr(info.status, "value", info.status))
        st = JobStatus(handle, STATES.get(native, JobState.UNKNOWN), "ray", native,
                       (info.metadata or {}).get("aitrain.run_dir", ""), message=info.message or "",
                       submitted_at=(info.start_time or 0) / 1000 or None)
        if st.state is JobState.FAILED or not st.run_dir:
            text = ""
            with contextlib.suppress(Exception):
                text = client.get_job_logs(sid)
            st.run_dir = st.run_dir or run_dir_from_logs(text)
            if st.state is JobState.FAILED:
                outcome = (read_outcome(st.run_dir) if st.run_dir else None) or outcome_from_logs(text)
                if outcome is not None:
                    st.failures = [f.to_dict() for f in outcome.failures if f.failed or f.stopped]
                    st.exit_code = outcome.exit_code
                    st.message = outcome.message or st.message
        return st

    def logs(self, handle: str, *, follow: bool = False, rank: int | None = None,
             poll_s: float = 0.5) -> Iterator[str]:
        """The job's output (every rank, prefixed), or one rank's lines of it."""
        dashboard, sid = parse_handle(handle, self.environ)
        handle = f"ray://{dashboard}/{sid}"
        client = self.client_for(dashboard)
        prefix = None if rank is None else f"[rank{rank} "
        seen, partial = 0, ""
        while True:
            done = not follow or self.status(handle).done
            try:
                text = client.get_job_logs(sid)
            except Exception as e:
                raise self._error(dashboard, e) from e
            chunk, seen = partial + text[seen:], len(text)
            lines = chunk.split("\n")
            partial = lines.pop() if not done else ""
            if done and lines and lines[-1] == "":
                lines.pop()
            for line in lines + ([partial] if done and partial else []):
                if (prefix is None or line.startswith(prefix)) and not line.startswith(OUTCOME_LINE):
                    yield line
            if done:
                return
            time.sleep(poll_s)

    def cancel(self, handle: str) -> None:
        dashboard, sid = parse_handle(handle, self.environ)
        try:
            self.client_for(dashboard).stop_job(sid)
        except Exception as e:
            raise self._error(dashboard, e) from e
