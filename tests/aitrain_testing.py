"""Helpers shared by the test packages: run the real `aitrain` command.

Import them as ``from aitrain_testing import ...`` — never ``from conftest import ...``:
with a conftest.py in several test folders, the name ``conftest`` means whichever was
imported first, and collection breaks depending on which tests run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


def aitrain_argv() -> list[str]:
    return [sys.executable, "-m", "aitrain.launcher.cli"]


def run_aitrain(args: list[str], cwd: Path, env: dict[str, str] | None = None,
                timeout: float = 180) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.update(env or {})
    return subprocess.run(aitrain_argv() + args, cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    """``cond()``'s first truthy value, polled every ``poll`` s; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)


def all_gone(pids: list[int], within: float = 10) -> list[int]:
    """The pids still alive after waiting up to ``within`` s for all of them to end."""
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


C = TypeVar("C")


def up_or_skip(cluster: C, what: str) -> Iterator[C]:
    """A module fixture's body for a real cluster (``up()``/``down()``): up, or the module
    skipped saying why (environment problems); down at the end whatever happened."""
    import pytest

    try:
        cluster.up()  # type: ignore[attr-defined]
    except Exception as e:  # pragma: no cover - environment problems
        cluster.down()  # type: ignore[attr-defined]
        pytest.skip(f"could not start {what}: {e}")
    try:
        yield cluster
    finally:
        cluster.down()  # type: ignore[attr-defined]


class MlflowServer:
    """`mlflow server` on loopback for tests (sqlite store and artifacts under ``root``):
    :meth:`launch` starts it in the background (it takes seconds: start it before it is
    needed), :meth:`wait_up` waits for its /health, :meth:`start` does both; :meth:`stop`
    returns when the port is free again (a test may start it anew)."""

    def __init__(self, root: Path) -> None:
        import socket

        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), cwd=self.root,
            stdout=log, stderr=log, start_new_session=True)

    def wait_up(self, timeout: float = 90) -> None:
        import urllib.request

        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"mlflow server did not come up in {timeout}s")

    def start(self, timeout: float = 90) -> None:
        self.launch()
        self.wait_up(timeout)

    def stop(self) -> None:
        import signal
        import socket

        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        for _ in range(50):  # the port is free again
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)


# -- containers: Podman with an image built offline -------------------------------------------

PODMAN_IMAGE = "localhost/aitrain-test:bookworm-py311"


def podman_unavailable() -> str:
    """Why the Podman tests cannot run here ('' when they can)."""
    import shutil

    if os.geteuid() != 0:
        return "needs root (rootful Podman)"
    for tool in ("podman", "runc", "mmdebstrap"):
        if not shutil.which(tool):
            return f"{tool} is not installed (scripts/test.sh installs it on Debian)"
    return ""


def podman_env(root: Path) -> dict[str, str]:
    """What Podman needs in this sandbox: runc (crun refuses the hybrid cgroup layout) and no
    default ulimits (raising nofile/nproc needs CAP_SYS_RESOURCE, which the sandbox lacks)."""
    conf = root / "containers.conf"
    if not conf.exists():
        root.mkdir(parents=True, exist_ok=True)
        conf.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n')
    return {"CONTAINERS_CONF": str(conf)}


def podman_image(workdir: Path) -> str:
    """A Debian bookworm image with python3.11 (no torch, no aitrain), built offline from
    Debian's packages (mmdebstrap, about 20 s) and imported once per machine."""
    env = {**os.environ, **podman_env(workdir)}
    if subprocess.run(["podman", "image", "exists", PODMAN_IMAGE], env=env).returncode == 0:
        return PODMAN_IMAGE
    tar = workdir / "rootfs.tar"
    subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=python3.11", "bookworm", str(tar)],
                   check=True, env=env, capture_output=True, timeout=600)
    subprocess.run(["podman", "import", "--quiet", str(tar), PODMAN_IMAGE], check=True, env=env,
                   capture_output=True, timeout=300)
    tar.unlink()
    return PODMAN_IMAGE


def podman_containers(env: dict[str, str] | None = None) -> list[str]:
    """Every container Podman knows of (running or not): `podman ps -a`."""
    out = subprocess.run(["podman", "ps", "-a", "--format", "{{.ID}} {{.Labels}} {{.Status}}"],
                         env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60)
    return [ln for ln in out.stdout.splitlines() if ln.strip()]
