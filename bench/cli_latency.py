"""How long the everyday commands take, against what a user would run instead.

    aitrain runs --last 10     (a store of 200 runs)   vs  mlflow runs list --experiment-id 1
    aitrain launch --help                               vs  a plain @hydra.main app's --help
    aitrain --help                                      vs  python -c pass (the interpreter alone)

Repetitions are interleaved; medians are printed with the ratio to the baseline and the
target (issue #17: runs <= 1.0 s, launch --help <= 0.7 s, --help <= 0.3 s).

    python bench/cli_latency.py [--reps 5] [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HYDRA_APP = '''
import hydra
from dataclasses import dataclass
from hydra.core.config_store import ConfigStore

@dataclass
class Train:
    lr: float = 3e-3
    steps: int = 100

ConfigStore.instance().store(name="config", node=Train)

@hydra.main(config_name="config", version_base="1.3", config_path=None)
def main(cfg):
    print(cfg)

main()
'''


def make_store(root: Path, n: int) -> None:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    exp = client.create_experiment("aitrain")
    now = int(time.time() * 1000)
    for i in range(n):
        run = client.create_run(exp, run_name=f"ddp-{i}", tags={
            "strategy": "ddp", "backend": "local", "nnodes": "1", "world_size": "2", "nodes": "vm",
            "aitrain.run_dir": str(root / "outputs" / str(i))})
        metrics = [Metric("loss", 1.0 / (s + 1), now, s) for s in range(50)]
        metrics += [Metric(f"phase/{p}_s", 1.0, now, 0) for p in ("probe", "tune", "rendezvous", "first_step")]
        metrics.append(Metric("steady/tokens_per_s", 1e4, now, 0))
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(f"train.p{j}", str(j)) for j in range(40)])
        client.set_terminated(run.info.run_id)


def timed(argv: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{argv} exited {r.returncode}: {r.stderr[-500:]}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--runs", type=int, default=200)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aitrain-bench-cli-"))
    (root / "outputs").mkdir()
    print(f"# {os.cpu_count()} CPUs; a store of {args.runs} runs; {args.reps} reps, interleaved", flush=True)
    make_store(root, args.runs)
    (root / "app.py").write_text(HYDRA_APP)
    bin_dir = Path(sys.executable).parent
    py = sys.executable
    env_uri = f"sqlite:///{root / 'outputs' / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = env_uri
    cases = [
        ("aitrain runs --last 10", [py, "-m", "aitrain.launcher.cli", "runs", "--last", "10"],
         "mlflow runs list", [str(bin_dir / "mlflow"), "runs", "list", "--experiment-id", "1"], 1.0),
        ("aitrain launch --help", [py, "-m", "aitrain.launcher.cli", "launch", "--help"],
         "hydra app --help", [py, str(root / "app.py"), "--help"], 0.7),
        ("aitrain --help", [py, "-m", "aitrain.launcher.cli", "--help"],
         "python -c pass", [py, "-c", "pass"], 0.3),
    ]
    print(f"{'command':<26}{'median':>8}  {'baseline':<20}{'median':>8} {'ratio':>6}  target")
    met = True
    for name, argv, base_name, base_argv, target in cases:
        ours, theirs = [], []
        for _ in range(args.reps):
            ours.append(timed(argv, root))
            theirs.append(timed(base_argv, root))
        a, b = statistics.median(ours), statistics.median(theirs)
        ok = a <= target
        met &= ok
        print(f"{name:<26}{a:>7.2f}s  {base_name:<20}{b:>7.2f}s {a / b:>5.2f}x  <= {target:.1f}s "
              f"{'met' if ok else 'NOT met'}", flush=True)
    print(f"all targets {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
