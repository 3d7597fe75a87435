"""Ranks forked from the node agent's zygote (launcher/zygote.py): the built-in job's ranks
start without importing torch again, and behave as exec'd ranks do (exit codes, signals,
stdio, env, teardown)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aitrain_testing import aitrain_argv, alive, all_gone, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

DRIVER = """\
import json, os, subprocess, sys
from aitrain.launcher.zygote import Zygote
z = Zygote.start()
assert z is not None
out = {"zygote": z.pid}
for mode in ("ok", "exit3", "term", "env", "exitmsg"):
    env = {**os.environ, **z.env(), "MODE": mode}
    if mode == "env":
        env["PYTHONHASHSEED"] = "7"  # read at interpreter start: this rank is started fresh
    r = subprocess.run(z.wrap([sys.executable, "-u", "rank.py"]), env=env, capture_output=True, text=True)
    out[mode] = {"code": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
z.stop()
print(json.dumps(out))
"""

RANK = """\
import os, signal, sys
mode = os.environ["MODE"]
print(f"ppid={os.getppid()} cwd={os.getcwd()} torch={'torch' in sys.modules} argv0={sys.argv[0]}", flush=True)
print("to stderr", file=sys.stderr, flush=True)
if mode == "exit3":
    sys.exit(3)
if mode == "exitmsg":
    sys.exit("bye from rank.py")
if mode == "term":
    os.kill(os.getpid(), signal.SIGTERM)
"""


def test_a_forked_rank_keeps_stdio_exit_codes_signals_and_falls_back_to_exec(tmp_path: Path) -> None:
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "rank.py").write_text(RANK)
    r = subprocess.run([sys.executable, "driver.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ok = out["ok"]
    assert ok["code"] == 0 and ok["stderr"] == "to stderr\n", ok
    # Forked from the zygote (its parent), with torch already imported; argv and cwd as `python rank.py`.
    assert f"ppid={out['zygote']} cwd={tmp_path} torch=True argv0=rank.py" in ok["stdout"], ok
    assert out["exit3"]["code"] == 3
    assert out["exitmsg"]["code"] == 1 and out["exitmsg"]["stderr"].endswith("bye from rank.py\n")  # as python does
    assert out["term"]["code"] == -signal.SIGTERM  # the client ends as its rank did
    fresh = out["env"]
    assert fresh["code"] == 0 and f"ppid={out['zygote']}" not in fresh["stdout"] and "torch=False" in fresh["stdout"]


def _launch(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(aitrain_argv() + ["launch", "tracking=none", "train.steps=100000", "train.log_every=1",
                                              "model.n_layer=1", "model.d_model=32", *extra],
                            cwd=tmp_path, env=_shell_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _shell_env(extra: dict[str, str] | None) -> dict[str, str]:
    """A user's shell: no PYTHONUNBUFFERED (the job sets it for its ranks; the zygote must not
    take that for a start-up change and exec every rank)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return {**env, **(extra or {})}


def _rank_pids(tmp_path: Path) -> list[int]:
    def found() -> list[int] | None:
        files = list(tmp_path.glob("outputs/*/*/progress/rank*.json"))
        try:
            docs = [json.loads(p.read_text()) for p in files]
        except ValueError:
            return None
        return [d["pid"] for d in docs] if len(docs) == 2 and all(d.get("step") for d in docs) else None
    return wait_until(found, 90, "two ranks stepping")


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_the_built_in_jobs_ranks_are_forked_and_ctrl_c_stops_them_all(tmp_path: Path) -> None:
    proc = _launch(tmp_path)
    try:
        ranks = _rank_pids(tmp_path)
        zygote = _ppid(ranks[0])
        assert _ppid(ranks[1]) == zygote
        # A fork of the node agent, never exec'd: the agent's command line, not the training module's.
        assert "aitrain.launcher.agent" in _cmdline(ranks[0]) and "aitrain.launcher.agent" in _cmdline(zygote)
        agent = _ppid(zygote)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert out.count("aitrain: error: interrupted by SIGINT; all ranks were stopped") == 1, out
    assert "Traceback" not in out
    assert all_gone([*ranks, zygote, agent]) == []


def test_a_killed_launcher_takes_the_zygote_and_its_ranks_with_it(tmp_path: Path) -> None:
    proc = _launch(tmp_path)
    try:
        ranks = _rank_pids(tmp_path)
        zygote = _ppid(ranks[0])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert all_gone([*ranks, zygote], within=15) == []


def test_without_the_fork_server_each_rank_is_a_fresh_interpreter(tmp_path: Path) -> None:
    proc = _launch(tmp_path, env={"AITRAIN_FORK_SERVER": "0"})
    try:
        ranks = _rank_pids(tmp_path)
        assert all("aitrain.launcher.train" in _cmdline(p) for p in ranks)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not any(alive(p) for p in ranks)
