"""Command to exit of a short local job, with the embedded MLflow on, vs torchrun (#17 items 1 and 7).

Three sides run the same tiny GPT under DDP for 5 steps at 2 ranks on this machine:
aitrain's built-in job with the default config (Hydra, the fabric preflight, MLflow tracking
into the embedded sqlite store, which must hold the finished run when aitrain exits),
aitrain with ``tracking=none``, and ``torchrun --standalone`` running the same model, data
and optimizer as a plain script. Each is timed from process start to process exit;
repetitions are interleaved so drift hits all alike. Peak memory (VmHWM) is sampled from
/proc for the launcher, the node agent and the ranks.

    python bench/command_to_exit.py [--reps 5] [--nproc 2] [--steps 5]

Targets: aitrain <= 1.05x torchrun (median); tracking adds <= 0.5 s; the launcher never
imports torch (its peak RSS stays far below a rank's).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from first_step import PLAIN_SCRIPT  # the same plain torchrun script as the first-step benchmark


def _descendants(root: int) -> dict[int, str]:
    """pid -> cmdline of ``root`` and every process below it."""
    parents: dict[int, int] = {}
    cmds: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmds[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in cmds:
            out[pid] = cmds[pid]
        todo += [c for c, p in parents.items() if p == pid]
    return out


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class PeakRss(threading.Thread):
    """Samples the peak RSS of the launcher, its node agent and its ranks every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = {"launcher": 0, "agent": 0, "zygote": 0, "rank": 0, "rank client": 0}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            found = _descendants(self.pid)
            for pid, cmd in found.items():
                self.peak[self.role(pid, cmd, found)] = max(self.peak[self.role(pid, cmd, found)], _hwm_kib(pid))
            self.done.wait(0.05)

    def role(self, pid: int, cmd: str, found: dict[int, str]) -> str:
        """The agent forks its zygote, which forks the ranks: all three have the agent's command
        line; a rank's client (what torch's agent started) is ``aitrain.launcher.zygote``."""
        if pid == self.pid:
            return "launcher"
        if "aitrain.launcher.zygote" in cmd:
            return "rank client"
        if "aitrain.launcher.agent" in cmd:
            parent = _ppid(pid)
            if "aitrain.launcher.agent" not in found.get(parent, ""):
                return "agent"
            return "zygote" if "aitrain.launcher.agent" not in found.get(_ppid(parent), "") else "rank"
        return "rank" if "python" in cmd else "launcher"


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def time_to_exit(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> tuple[float, dict[str, int]]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    sampler = PeakRss(proc.pid)
    sampler.start()
    _, err = proc.communicate(timeout=timeout)
    elapsed = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}:\n{err[-2000:]}")
    return elapsed, sampler.peak


def finished_runs(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0]
    finally:
        con.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    bindir = Path(sys.executable).parent
    env = dict(os.environ, BENCH_STEPS=str(args.steps))
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        script = cwd / "plain_ddp.py"
        script.write_text(PLAIN_SCRIPT)
        launch = [str(bindir / "aitrain"), "launch", f"nproc_per_node={args.nproc}", f"train.steps={args.steps}"]
        sides = {
            "aitrain": launch,
            "aitrain tracking=none": [*launch, "tracking=none"],
            "torchrun": [str(bindir / "torchrun"), "--standalone", f"--nproc-per-node={args.nproc}", str(script)],
        }
        for argv in sides.values():  # warm-up: page cache, and the embedded store's creation
            time_to_exit(argv, cwd, env)
        times: dict[str, list[float]] = {name: [] for name in sides}
        peaks: dict[str, dict[str, int]] = {}
        db = cwd / "outputs" / "mlflow.db"
        for i in range(args.reps):
            for name, argv in sides.items():
                before = finished_runs(db) if name == "aitrain" else 0
                elapsed, peak = time_to_exit(argv, cwd, env)
                times[name].append(elapsed)
                peaks[name] = {k: max(v, peaks.get(name, {}).get(k, 0)) for k, v in peak.items()}
                if name == "aitrain" and finished_runs(db) != before + 1:
                    raise RuntimeError("the run was not FINISHED in the embedded store when aitrain exited")
            print(f"rep {i + 1}: " + "  ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    ratio = med["aitrain"] / med["torchrun"]
    tracking = med["aitrain"] - med["aitrain tracking=none"]
    print(f"median command to exit, {args.steps} steps at {args.nproc} ranks: "
          + ", ".join(f"{n} {m:.2f}s" for n, m in med.items()))
    print(f"aitrain / torchrun: {ratio:.3f} (target <= 1.05): {'OK' if ratio <= 1.05 else 'ABOVE TARGET'}")
    print(f"tracking adds {tracking:+.2f}s (target <= 0.5 s): {'OK' if tracking <= 0.5 else 'ABOVE TARGET'}")
    for name, peak in peaks.items():
        print(f"peak RSS, {name}: " + ", ".join(f"{role} {kib / 1024:.0f} MiB" for role, kib in peak.items() if kib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
