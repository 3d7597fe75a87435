"""Slurm: from `sbatch` to the first optimizer step and to the job's end, aitrain vs `srun torchrun` (#17 item 2).

On the repo's Slurm cluster in network namespaces (scripts/slurm_cluster.py; every node's
hostname resolves to 127.0.0.1, as on clusters with a bad /etc/hosts), at each node count:

* aitrain: `sbatch -N N slurm/aitrain.sbatch` with the full preflight on (probe, check, tune,
  smoke test on every node), the built-in job, 5 steps, 1 rank per node;
* the baseline: a hand-written sbatch that runs `srun torchrun` with a static rendezvous on
  node 1's fabric address and `GLOO_SOCKET_IFNAME` set by hand (torchtitan's
  multinode_trainer.slurm pattern; c10d rendezvous fails on this network), running the same
  model, data and optimizer as a plain script (bench/first_step.py's).

Repetitions are interleaved. Then the preflight's phases (phases.jsonl of each aitrain run)
at every node count, to show how the preflight grows with the number of nodes.

    python bench/slurm_first_step.py [--nodes 2,4] [--scaling 2,4,8] [--reps 3]

Needs root (network namespaces) and Slurm (slurmctld, slurmd, munge). Targets: first step
<= 1.2x the baseline, end <= 1.1x; preflight per-node work in parallel (flat in N).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from first_step import PLAIN_SCRIPT

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import slurm_cluster  # noqa: E402

STEPS = 5
PORT = 29611
AITRAIN_ARGS = [f"train.steps={STEPS}", "train.log_every=1", "nproc_per_node=1", "tracking=none"]


def baseline_script(nnodes: int, master: str, ifname: str, script: Path) -> str:
    bindir = Path(sys.executable).parent
    return f"""#!/bin/bash
#SBATCH --job-name=plain
#SBATCH --ntasks-per-node=1
#SBATCH --output=plain-%j.out
export GLOO_SOCKET_IFNAME={ifname}
export BENCH_STEPS={STEPS}
srun bash -c 'exec {bindir}/torchrun --nnodes={nnodes} --nproc-per-node=1 --rdzv-backend=static \\
  --node-rank=$SLURM_NODEID --master-addr={master} --master-port={PORT} {script}'
"""


def sbatch(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    r = subprocess.run(["sbatch", "--parsable", *argv], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return r.stdout.strip().split(";")[0]


def job_state(job: str, env: dict[str, str]) -> str:
    r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True)
    return r.stdout.strip()


def time_job(argv: list[str], out_name: str, cwd: Path, env: dict[str, str],
             timeout: float = 300) -> tuple[float, float]:
    """(seconds to the first step line, seconds to the job's end) from the sbatch call."""
    t0 = time.perf_counter()
    job = sbatch(argv, cwd, env)
    out = cwd / out_name.replace("%j", job)
    first = None
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        text = out.read_text(errors="replace") if out.exists() else ""
        if first is None and "step 1/" in text:
            first = time.perf_counter() - t0
        if first is not None and not job_state(job, env):
            return first, time.perf_counter() - t0
        if first is None and not job_state(job, env) and out.exists():
            raise RuntimeError(f"job {job} ended without a first step:\n{text[-3000:]}")
        time.sleep(0.05)
    subprocess.run(["scancel", job], env=env)
    raise RuntimeError(f"job {job} did not finish in {timeout}s")


def preflight_phases(cwd: Path, job: str) -> dict[str, float]:
    phases: dict[str, float] = {}
    path = cwd / "outputs" / f"slurm-{job}" / "phases.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        phases[rec["phase"]] = phases.get(rec["phase"], 0.0) + float(rec["seconds"])
    return phases


def measure(n: int, reps: int, base: int, scaling_only: bool) -> tuple[dict[str, list[float]], dict[str, float]]:
    cluster = slurm_cluster.SlurmCluster(nodes=n, name=f"aitsb{n}", base=base)
    cluster.up()
    try:
        assert cluster.rig is not None
        env = dict(os.environ, **cluster.env())
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        env.pop("MLFLOW_TRACKING_URI", None)
        with tempfile.TemporaryDirectory(prefix=f"aitrain-slurm-bench-{n}-") as tmp:
            cwd = Path(tmp)
            script = cwd / "plain_ddp.py"
            script.write_text(PLAIN_SCRIPT)
            node1 = cluster.rig.hosts[0]
            plain = cwd / "plain.sbatch"
            plain.write_text(baseline_script(n, node1.fabric_ip, node1.fabric_if, script))
            sides = {"aitrain": ([f"-N{n}", str(REPO / "slurm" / "aitrain.sbatch"), *AITRAIN_ARGS], "aitrain-%j.out"),
                     "srun torchrun": ([f"-N{n}", str(plain)], "plain-%j.out")}
            if scaling_only:
                sides = {"aitrain": sides["aitrain"]}
            times: dict[str, list[float]] = {f"{s} {w}": [] for s in sides for w in ("first step", "end")}
            phases: dict[str, list[float]] = {}
            for i in range(reps + 1):  # the first round warms the page cache
                for side, (argv, out_name) in sides.items():
                    first, end = time_job(argv, out_name, cwd, env)
                    if i == 0:
                        continue
                    times[f"{side} first step"].append(first)
                    times[f"{side} end"].append(end)
                if i:
                    print(f"  {n} nodes, rep {i}: " + "  ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()),
                          flush=True)
            for out in sorted(cwd.glob("aitrain-*.out"))[1:]:
                job = out.stem.split("-", 1)[1]
                for name, seconds in preflight_phases(cwd, job).items():
                    phases.setdefault(name, []).append(seconds)
            return times, {k: statistics.median(v) for k, v in phases.items()}
    finally:
        cluster.down()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="2,4", help="node counts for the comparison (default 2,4)")
    ap.add_argument("--scaling", default="8", help="extra node counts for the preflight scaling only (default 8)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    why = slurm_cluster.available()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    compare = [int(x) for x in args.nodes.split(",") if x]
    extra = [int(x) for x in args.scaling.split(",") if x and int(x) not in compare]
    preflight: dict[int, dict[str, float]] = {}
    for idx, n in enumerate([*compare, *extra]):
        times, phases = measure(n, args.reps if n in compare else 1, base=232 + idx, scaling_only=n not in compare)
        preflight[n] = phases
        if n in compare:
            med = {k: statistics.median(v) for k, v in times.items()}
            r_first = med["aitrain first step"] / med["srun torchrun first step"]
            r_end = med["aitrain end"] / med["srun torchrun end"]
            print(f"{n} nodes, median: " + ", ".join(f"{k} {v:.1f}s" for k, v in med.items()))
            print(f"{n} nodes: sbatch to first step {r_first:.2f}x (target <= 1.2), "
                  f"sbatch to end {r_end:.2f}x (target <= 1.1)", flush=True)
    names = sorted({k for p in preflight.values() for k in p})
    print("preflight phases (s, median) by node count: " + ", ".join(names))
    for n, phases in preflight.items():
        print(f"  {n:>2} nodes: " + "  ".join(f"{k} {phases.get(k, 0):.2f}" for k in names)
              + f"  total {sum(phases.get(k, 0) for k in ('probe', 'check', 'tune', 'smoke_test')):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
