"""Real Ray clusters for the tests: a local head on loopback, and 2 nodes in network namespaces.

Every Ray process these start is stopped by the fixtures' finalizers (``ray stop --force``
plus the rig's namespace teardown), and the tests assert through Ray's state API that a
job leaves no actor or placement group behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "scripts"))

from aitrain_testing import up_or_skip  # noqa: E402

TINY = ["model.n_layer=1", "model.d_model=32", "model.seq_len=16", "train.global_batch_size=8",
        "train.log_every=1"]


# The head's Ray client server gives a new client's session 30 s to start by default; on this
# 2-core machine, busy with the previous test's Ray workers, that is sometimes too little.
SLOW_HEAD_ENV = {"RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "120"}


def free_port() -> int:
    """A free port below the ephemeral range (where Ray's own components bind theirs) and
    above Ray's worker ports (10002-19999) and client servers (23000-23999)."""
    import random

    while True:
        port = random.randint(24000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def base_env(tmp: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)  # aitrain must turn token auth on by itself
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if tmp is not None:
        env["XDG_STATE_HOME"] = str(tmp / "state")
    return env


def ray_stop() -> None:
    subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)


def gcs_processes() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "gcs_server"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class LocalHead:
    """``ray start --head`` on 127.0.0.1 with the dashboard (Jobs API, state API) and the Ray client."""

    def __init__(self, num_cpus: int = 8) -> None:
        self.port, self.dashboard_port, self.client_port = free_port(), free_port(), free_port()
        self.num_cpus = num_cpus

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    @property
    def jobs(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, tmp: Path | None = None) -> dict[str, str]:
        env = base_env(tmp)
        # Ray's single-machine mode: the head registers 127.0.0.1, never this machine's address.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        return env

    def up(self) -> LocalHead:
        ray_stop()
        # Token auth on (a token is created if this machine has none), as `ray start --head`
        # does wherever a token exists: clients must cope with it.
        r = subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                            f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
                            f"--ray-client-server-port={self.client_port}", f"--num-cpus={self.num_cpus}",
                            f"--resources={json.dumps({'accel': 4})}", "--disable-usage-stats"],
                           env=dict(self.env(), RAY_AUTH_MODE="token", **SLOW_HEAD_ENV), capture_output=True,
                           text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"ray start --head failed: {r.stderr[-2000:]}")
        wait_jobs_api(self.jobs, self.env())
        return self

    def down(self) -> None:
        ray_stop()


def wait_jobs_api(url: str, env: dict[str, str], timeout: float = 60) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # it answers (401 without a token): it is up
            return
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.5)
    raise RuntimeError(f"the Jobs API at {url} did not come up in {timeout}s")


_STATE = """
import json, sys
from ray.util.state import list_actors, list_placement_groups
addr = sys.argv[1]
actors = list_actors(address=addr, filters=[("state", "!=", "DEAD")], raise_on_missing_output=False)
pgs = list_placement_groups(address=addr, filters=[("state", "!=", "REMOVED")], raise_on_missing_output=False)
print(json.dumps({"actors": [[a.class_name, a.state, a.actor_id] for a in actors],
                  "placement_groups": [[p.name, p.state] for p in pgs]}))
"""


def leftovers(dashboard: str, env: dict[str, str], settle_s: float = 15.0) -> dict[str, Any]:
    """Live actors and placement groups per Ray's state API (waiting for teardown to settle)."""
    env = dict(env, RAY_AUTH_MODE="token")
    deadline = time.monotonic() + settle_s
    while True:
        r = subprocess.run([sys.executable, "-c", _STATE, dashboard], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        state = json.loads(r.stdout.strip().splitlines()[-1])
        if not (state["actors"] or state["placement_groups"]) or time.monotonic() > deadline:
            return state
        time.sleep(1)


def aitrain(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 240,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "aitrain.launcher.cli", *args], cwd=cwd, env=env,
                          text=True, capture_output=True, timeout=timeout)


class NetnsRay:
    """A Ray cluster of ``hosts`` nodes in network namespaces of a test rig: the head in the
    first, a worker in each other; Ray talks over the throttled management network."""

    def __init__(self, hosts: int, name: str, base: int) -> None:
        import netns_rig

        self.rig = netns_rig.Rig(hosts_count=hosts, name=name, base=base, controller_ip=True)
        self.temp = Path(f"/tmp/{name}-ray")

    @property
    def head(self) -> Any:
        return self.rig.hosts[0]

    @property
    def gcs(self) -> str:
        return f"{self.head.mgmt_ip}:6379"

    @property
    def client(self) -> str:
        return f"ray://{self.head.mgmt_ip}:10001"

    def up(self) -> NetnsRay:
        ray_stop()
        self.rig.up()
        env = dict(base_env(), **SLOW_HEAD_ENV)
        for i, h in enumerate(self.rig.hosts):
            if (Path.home() / ".ray" / "auth_token").exists() or env.get("RAY_AUTH_TOKEN"):
                # The head turns token auth on when a token exists (it may have just made one);
                # `ray start --address` on a worker node only joins with RAY_AUTH_MODE=token set.
                env.setdefault("RAY_AUTH_MODE", "token")
            where = (["--head", "--port=6379", "--ray-client-server-port=10001", "--include-dashboard=false"]
                     if i == 0 else [f"--address={self.gcs}"])
            r = subprocess.run([*h.nsenter(), str(BIN / "ray"), "start", *where, f"--node-ip-address={h.mgmt_ip}",
                                f"--temp-dir={self.temp / h.name}", "--num-cpus=2", "--disable-usage-stats"],
                               env=env, capture_output=True, text=True, timeout=180)
            if r.returncode != 0:
                raise RuntimeError(f"ray start on {h.name} failed: {r.stderr[-2000:]}")
        return self

    def down(self) -> None:
        ray_stop()
        self.rig.down()
        shutil.rmtree(self.temp, ignore_errors=True)

    def fabric_bytes(self) -> dict[str, int]:
        """rx+tx bytes of fab0 in every namespace."""
        out = {}
        for h in self.rig.hosts:
            text = subprocess.run([*h.nsenter(), "cat", "/proc/net/dev"], capture_output=True, text=True).stdout
            f = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.strip().startswith("fab0:"))
            out[h.name] = int(f[0]) + int(f[8])
        return out


def netns_ray_cluster(hosts: int, name: str, base: int) -> Iterator[NetnsRay]:
    """A module fixture's body: the cluster up (or the module skipped, saying why), then down."""
    return up_or_skip(NetnsRay(hosts=hosts, name=name, base=base), "Ray in network namespaces")
