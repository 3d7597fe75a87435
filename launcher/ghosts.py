"""MLflow runs whose launcher was killed outright (SIGKILL, OOM, a closed laptop): no RUNNING ghosts.

A launcher that dies without running its ``finally`` leaves its MLflow run RUNNING and the
rest of its spool (``tracking.json``, metrics.jsonl, logs) in the run dir. Each launch
records who it is (``launcher.json``: host, boot id, pid and the pid's start time); the next
aitrain command that touches the store or the job registry (``aitrain runs``, ``aitrain
list``, a launch) finds runs whose launcher is gone from this host, sends what was spooled
and ends them KILLED, as ``aitrain runs sync`` would. A launcher on another host (a Slurm
batch job on a compute node) is never judged from here.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aitrain.launcher.util import process_alive, process_start, write_atomic

LAUNCHER_FILE = "launcher.json"
LOCK_FILE = "tracking.lock"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def record_launcher(run_dir: Path) -> None:
    """This process is the launcher of ``run_dir``'s MLflow run."""
    pid = os.getpid()
    write_atomic(Path(run_dir) / LAUNCHER_FILE, json.dumps({
        "host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "start": process_start(pid)}))


def launcher_gone(run_dir: Path) -> bool:
    """True only when the run's launcher ran on this host and is certainly not running now."""
    try:
        who = json.loads((Path(run_dir) / LAUNCHER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if who.get("host") != socket.gethostname():
        return False
    if who.get("boot_id") and who["boot_id"] != _boot_id():
        return True  # the machine rebooted since
    return not process_alive(int(who.get("pid") or 0), who.get("start"))


def _unfinished(run_dir: Path) -> dict[str, Any] | None:
    from aitrain.launcher.tracking import STATE_FILE

    try:
        state = json.loads((Path(run_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return None if state.get("finished") else state


def recover(run_dir: Path, *, say: Callable[[str], None] | None = None, timeout: float = 30.0) -> bool:
    """Send a killed launch's spool and end its run KILLED. False when there was nothing to do,
    another aitrain command is doing it, or the store could not take it (tried again next time)."""
    from aitrain.launcher.tracking import Tracker

    run_dir = Path(run_dir)
    state = _unfinished(run_dir)
    if state is None or not launcher_gone(run_dir):
        return False
    try:
        lock = open(run_dir / LOCK_FILE, "a")  # noqa: SIM115  (held until the end of the function)
    except OSError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # another command is recovering it
        if _unfinished(run_dir) is None:
            return False
        tracker = Tracker.from_run_dir(run_dir, drain_timeout_s=timeout)
        ok = tracker.finish("KILLED", timeout=timeout + 5)
    if ok and say is not None:
        say(f"aitrain: MLflow run {tracker.run_id} ({run_dir}) was left RUNNING by a launcher that was killed; "
            "its spooled metrics and logs are sent and the run is marked KILLED")
    return ok


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def recover_dirs(run_dirs: Iterable[Path | str], say: Callable[[str], None] | None = _stderr) -> int:
    """Recover the killed launches among ``run_dirs``; how many were."""
    done = 0
    for d in run_dirs:
        try:
            done += recover(Path(d), say=say)
        except Exception as e:  # never let a ghost take down the command that found it
            if say is not None:
                say(f"aitrain: could not finish the MLflow run of {d} ({type(e).__name__}: {e}); "
                    f"aitrain runs sync {d} tries again")
    return done


def recover_from_registry(say: Callable[[str], None] | None = _stderr, *, store: str | None = None) -> int:
    """The killed launches among the jobs launched from this machine (``aitrain list``'s registry);
    ``store``: only those that tracked to this MLflow store (a launch cleans up its own store,
    and says nothing of others' servers)."""
    from aitrain.launcher.backends.api import JobRegistry

    dirs = [str(e.get("run_dir")) for _, e in JobRegistry().entries() if e.get("run_dir")]
    if store is not None:
        from aitrain.launcher.redact import redact_text

        want = {store, redact_text(store)}  # tracking.json keeps the URI without its credentials
        dirs = [d for d in dirs if (_unfinished(Path(d)) or {}).get("uri") in want]
    return recover_dirs(dirs, say)


def recover_from_store(store: Any, experiment_ids: list[str],
                       say: Callable[[str], None] | None = _stderr, *, uri: str | None = None) -> int:
    """The killed launches among the store's RUNNING runs (``aitrain runs``; ``store``: a
    :mod:`aitrain.launcher.runstore` reader), and with ``uri`` the parent runs of killed sweeps."""
    runs = store.search(experiment_ids, limit=200, status="RUNNING")
    done = recover_dirs((r.data.tags["aitrain.run_dir"] for r in runs if r.data.tags.get("aitrain.run_dir")), say)
    for r in runs:
        if uri is not None and r.data.tags.get("aitrain.sweep") == "parent":
            try:
                done += recover_sweep(r, uri, say)
            except Exception as e:  # never let a ghost take down the command that found it
                if say is not None:
                    say(f"aitrain: could not end the sweep run {r.info.run_id} ({type(e).__name__}: {e})")
    return done


def recover_sweep(run: Any, uri: str, say: Callable[[str], None] | None = _stderr) -> bool:
    """End KILLED the parent run of a sweep (``aitrain launch -m``) whose process is gone from
    this host without ending it: killed, or stopped by a job's failure under Hydra's basic
    sweeper. Its jobs' runs are recovered on their own."""
    sweep_dir = run.data.tags.get("aitrain.sweep.dir")
    if not sweep_dir or not launcher_gone(Path(sweep_dir)):
        return False
    from aitrain.launcher.tracking import open_client

    open_client(uri).set_terminated(run.info.run_id, "KILLED")
    if say is not None:
        say(f"aitrain: MLflow run {run.info.run_id} (sweep {sweep_dir}) was left RUNNING by a sweep that ended "
            "without finishing it; it is marked KILLED")
    return True
