"""Where a Ray job goes (``backend.address``, else ``RAY_ADDRESS``) and how to get in (token auth).

* unset: a running local cluster (``ray start``), else a Ray instance started for this job;
* ``host:port`` (the GCS) or ``auto``: that cluster, this process is the driver;
* ``ray://head:10001``: the same through the Ray client;
* ``http(s)://head:8265``: the Ray Jobs API (the cluster runs the whole job).

Token auth (Ray >= 2.52): ``ray start --head`` enables it when a token exists
(``~/.ray/auth_token``, which any local ``ray.init()`` creates), and clients then connect
only with ``RAY_AUTH_MODE=token`` set. aitrain sets it whenever it finds a token
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and says so in the
error when none is there.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aitrain.errors import BackendError, ConfigError

AUTH_HINT = ("if the cluster uses token authentication (`ray start --head` enables it on Ray >= 2.52 when a "
             "token exists), copy the head node's ~/.ray/auth_token to this machine or set RAY_AUTH_TOKEN "
             "(or RAY_AUTH_TOKEN_PATH); aitrain then sets RAY_AUTH_MODE=token for you")


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
                from ray._raylet import Config  # type: ignore[attr-defined]

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


