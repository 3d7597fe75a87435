"""Where a Ray job goes (``backend.address``, else ``RAY_ADDRESS``) and how to get in (token auth).

* unset: a running local cluster (``ray start``), else a Ray instance started for this job;
* ``host:port`` (the GCS) or ``auto``: that cluster, this process is the driver;
* ``ray://head:10001``: the same through the Ray client;
* ``http(s)://head:8265``: the Ray Jobs API (the cluster runs the whole job).

Before Ray is asked to connect, the address's TCP port is tried with a short timeout
(:func:`check_reachable`): Ray itself waits 30 s or more, then blames token auth, when
nothing listens there. A missing ``ray`` package is one error with the install command
(:func:`import_ray`).

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
import socket
import sys
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


INSTALL_HINT = ("install the Ray extra into the Python that runs aitrain: `pip install -c constraints.txt "
                "-e '.[ray]'` in a clone of aitrain (as README.md installs it), or `pip install 'aitrain[ray]'`")


def _ray_missing() -> BackendError:
    return BackendError(f"backend=ray needs the ray package, which is not installed for {sys.executable}",
                        INSTALL_HINT)


def import_ray() -> Any:
    """``import ray``, or one BackendError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        if (e.name or "").split(".")[0] == "ray":
            raise _ray_missing() from e
        raise BackendError(f"the ray package is installed but does not import: {type(e).__name__}: {e}",
                           "reinstall it: " + INSTALL_HINT) from e
    return ray


PROBE_TIMEOUT_S = 3.0  # a TCP connect across a data centre takes milliseconds
RAY_CLIENT_PORT = 10001  # `ray start --head --ray-client-server-port` default

_NOT_LISTENING_HINTS = {
    "gcs": "is the head up (`ray status` on it)? host:port is its GCS: `ray start --head --port=PORT` "
           "(6379 unless given); from another machine use the head's address, not 127.0.0.1",
    "client": "is the head up (`ray status` on it)? ray:// goes to its Ray client server, "
              f"`ray start --head --ray-client-server-port=PORT` ({RAY_CLIENT_PORT} unless given)",
    "jobs": "is the head up (`ray status` on it)? http:// goes to its dashboard (port 8265 unless "
            "--dashboard-port is given); for other machines start it with --dashboard-host=0.0.0.0",
}


def endpoint(address: RayAddress) -> tuple[str, int] | None:
    """The host and TCP port an address connects to first; None for a local Ray or ``auto``."""
    if address.kind == "local" or not address.value or address.value == "auto":
        return None
    url = address.value if "://" in address.value else f"//{address.value}"
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"backend.address={address.value!r}: {e}",
                          "a port is a number from 1 to 65535, e.g. ray://head:10001") from e
    if not parts.hostname:
        raise ConfigError(f"backend.address={address.value!r} names no host",
                          "e.g. ray://head:10001, head:6379 or http://head:8265")
    if port is None:
        port = {"client": RAY_CLIENT_PORT, "jobs": 443 if parts.scheme == "https" else 80}.get(address.kind, 0)
    return parts.hostname, port


def _through_proxy(address: RayAddress, host: str) -> bool:
    """Ray reaches this host through an HTTP(S) proxy: the Jobs API client (requests) where
    http(s)_proxy is set, gRPC (GCS, Ray client) only with RAY_grpc_enable_http_proxy=1."""
    proxies = urllib.request.getproxies_environment()
    if address.kind == "jobs" and address.value:
        names = [urllib.parse.urlsplit(address.value).scheme, "all"]
    elif os.environ.get("RAY_grpc_enable_http_proxy", "0").lower() in ("1", "true"):
        names = ["grpc", "https", "http"]
    else:
        return False
    return any(proxies.get(n) for n in names) and not urllib.request.proxy_bypass(host)


def check_reachable(address: RayAddress, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Something listens at the address's host:port, or a BackendError saying what is wrong.

    Ray's own clients retry a closed port for 30 s or more and then suggest token auth;
    a TCP connect says "nothing is listening" at once. Not tried for a local Ray, ``auto``,
    or a Jobs API reached through a proxy (the proxy, not this machine, connects there).
    """
    ep = endpoint(address)
    if ep is None:
        return
    host, port = ep
    if _through_proxy(address, host):
        return
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    hint = _NOT_LISTENING_HINTS.get(address.kind, "is the cluster up and reachable from here?")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except socket.gaierror as e:
        raise BackendError(f"cannot connect to {address}: the host name {host!r} does not resolve ({e.strerror})",
                           "check backend.address (or RAY_ADDRESS): the head node's name or IP address") from e
    except ConnectionRefusedError as e:
        raise BackendError(f"cannot connect to {address}: nothing is listening at {where} (connection refused)",
                           hint) from e
    except TimeoutError as e:
        raise BackendError(f"cannot connect to {address}: no answer from {where} within {timeout:g} s (the host "
                           "is down, or a firewall drops connections to that port)", hint) from e
    except OSError as e:  # no route to host, network unreachable, ...
        raise BackendError(f"cannot connect to {address}: {where}: {e.strerror or e}", hint) from e


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


