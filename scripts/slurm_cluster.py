#!/usr/bin/env python3
"""A real Slurm cluster on one machine: slurmctld in the root namespace, one slurmd per
network-namespace host of the rig (see netns_rig.py).

* slurmctld listens on the management bridge (``SlurmctldHost=<hostname>(<bridge ip>)``).
* each ``slurmd -N nodeN`` runs in its host's namespace, started with
  ``nsenter --net`` (``ip netns exec`` remounts /sys and slurmd then fails on cgroups);
  ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``.
* the hostname resolves to 127.0.0.1 in every namespace, as on clusters with a bad
  /etc/hosts.

Client commands (sbatch, squeue, scontrol, ...) need ``SLURM_CONF`` from
:meth:`SlurmCluster.env`.

    python scripts/slurm_cluster.py up [--nodes 2] [--name aits]   # prints env to export
    python scripts/slurm_cluster.py down [--name aits]

Needs root, iproute2, and Debian's slurm-wlm and munge.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns_rig import Rig  # noqa: E402

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


def available() -> str | None:
    from netns_rig import available as rig_available

    why = rig_available()
    if why:
        return why
    for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install slurm-wlm munge)"
    return None


def ensure_munge() -> None:
    """A munge key and a running munged (shared by every node: one machine)."""
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        os.chmod(MUNGE_KEY, 0o400)
        shutil.chown(MUNGE_KEY, "munge", "munge") if _has_user("munge") else None
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return
    for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        if _has_user("munge"):
            shutil.chown(d, "munge", "munge")
    cmd = ["munged"] if _has_user("munge") else ["munged", "--force"]
    if _has_user("munge"):
        cmd = ["runuser", "-u", "munge", "--", "munged"]
    subprocess.run(cmd, check=True, capture_output=True)
    for _ in range(50):
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("munged did not start")


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@dataclass
class SlurmCluster:
    nodes: int = 2
    name: str = "aits"
    base: int = 216
    mgmt_rate: str | None = None
    cpus_per_node: int = 2
    state_dir: Path = field(default_factory=lambda: Path("/tmp"))
    rig: Rig | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.state_dir / f"aitrain-slurm-{self.name}"

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def ctld_port(self) -> int:
        return 7000 + self.base

    @property
    def cluster_name(self) -> str:
        return self.name

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def write_conf(self) -> None:
        assert self.rig is not None
        host = socket.gethostname()
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldPort={self.ctld_port}",  # per cluster, so two rigs never share a controller
            f"SlurmctldHost={host}({self.rig.controller_address})",
            "AuthType=auth/munge",
            # Step credentials live 30 s (default 120): a requeued job waits that long before it
            # may run again (the old credentials must expire), which made every requeue test
            # wait two minutes. 30 s still covers a step's launch on a busy 2-core machine.
            "AuthInfo=cred_expire=30",
            "CryptoType=crypto/munge",
            "SlurmUser=root",
            "SlurmdUser=root",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=300",
            "MessageTimeout=10",
            "JobRequeue=1",
            f"StateSaveLocation={self.root}/ctld",
            f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log",
            f"SlurmdLogFile={self.root}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for h, node in zip(self.rig.hosts, self.node_names(), strict=True):
            lines.append(f"NodeName={node} NodeAddr={h.mgmt_ip} NodeHostname={node} "
                         f"CPUs={self.cpus_per_node} RealMemory=2000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.node_names())} Default=YES "
                     "MaxTime=INFINITE State=UP OverSubscribe=FORCE:4")
        self.conf.write_text("\n".join(lines) + "\n")

    def up(self, timeout: float = 60) -> SlurmCluster:
        self.down()
        ensure_munge()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "ctld").mkdir(exist_ok=True)
        for node in self.node_names():
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        self.rig = Rig(self.nodes, name=self.name, base=self.base, mgmt_rate=self.mgmt_rate,
                       controller_ip=True).up()
        self.write_conf()
        env = dict(os.environ, **self.env())
        log = open(self.root / "daemons.out", "ab")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(self.conf)], env=env,
                                           stdout=log, stderr=log, start_new_session=True))
        for h, node in zip(self.rig.hosts, self.node_names(), strict=True):
            self.procs.append(subprocess.Popen(
                h.nsenter() + ["slurmd", "-D", "-f", str(self.conf), "-N", node],
                env=env, stdout=log, stderr=log, start_new_session=True))
        self._save_pids()
        self.wait_idle(timeout)
        return self

    def _save_pids(self) -> None:
        (self.root / "pids.json").write_text(json.dumps([p.pid for p in self.procs]))

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=dict(os.environ, **self.env()),
                               capture_output=True, text=True)
            last = r.stdout.strip() + r.stderr.strip()
            states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
            if len(states) == self.nodes and all(s.startswith("idle") for s in states.values()):
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({p.args}); see {self.root}/daemons.out "
                                       f"and the logs in {self.root}")
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {timeout}s: {last!r}; logs in {self.root}")

    def _controller_alive(self) -> bool:
        """True when the slurmctld this cluster started is still running."""
        try:
            pid = int((self.root / "slurmctld.pid").read_text().split()[0])
            return Path(f"/proc/{pid}/comm").read_text().strip() == "slurmctld"
        except (OSError, ValueError, IndexError):
            return False

    def down(self) -> None:
        """Cancel jobs, stop the daemons, remove the rig (idempotent)."""
        env = dict(os.environ, **self.env())
        if self._controller_alive():
            # Only while our slurmctld runs: a stale slurm.conf from an earlier run names a controller
            # address that no longer exists, and scancel would retry towards the default route.
            try:
                subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True, timeout=10)
            except subprocess.TimeoutExpired:
                pass
        pids = [p.pid for p in self.procs]
        pid_file = self.root / "pids.json"
        if pid_file.exists():
            try:
                pids += json.loads(pid_file.read_text())
            except ValueError:
                pass
        for pid in set(pids):
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pid in set(pids):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.procs = []
        Rig(name=self.name).down()  # also kills anything left in the namespaces (job steps)
        self.rig = None
        if pid_file.exists():
            pid_file.unlink()

    def __enter__(self) -> SlurmCluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--name", default="aits")
    up.add_argument("--base", type=int, default=216)
    down = sub.add_parser("down")
    down.add_argument("--name", default="aits")
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(f"slurm_cluster: {why}", file=sys.stderr)
        return 2
    if args.cmd == "up":
        c = SlurmCluster(args.nodes, args.name, args.base)
        c.up()
        c.procs = []  # leave the daemons running after this command exits
        for k, v in c.env().items():
            print(f"export {k}={v}")
    else:
        SlurmCluster(name=args.name).down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
