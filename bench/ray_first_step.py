"""Time to the first optimizer step on Ray: aitrain's Ray backend vs a plain Ray Train TorchTrainer.

Both sides run the same 2-rank tiny DDP job (the built-in GPT, gloo, one AdamW step)
on the same already-running local Ray cluster (started here, or --address):

* aitrain: ``aitrain launch backend=ray backend.address=<gcs> nproc_per_node=2
  script=<rank program>`` (Hydra composition, fabric probe/check/tune per node, the
  default MLflow tracking: the whole launch a user runs);
* Ray Train: ``python <driver>`` that connects to the cluster and runs
  ``TorchTrainer(train_func, ScalingConfig(num_workers=2)).fit()``; Ray Train sets up
  the gloo process group, ``train_func`` runs the same step.

Each side is timed from the start of its process until rank 0 finished its first
optimizer step (rank 0 writes the wall-clock time to a file: no log forwarding delay).
Repetitions are interleaved so load drift hits both alike; the median is reported.

    python bench/ray_first_step.py [--reps 3] [--address HOST:PORT]

Target: aitrain <= 0.5x TorchTrainer (median).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The job both sides run (process group already initialised when `init` is False).
STEP = '''
import os, time, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from aitrain.strategies.model import GPT, GPTArgs, cross_entropy
from aitrain.launcher.data import MarkovTokens

def first_step(marker, init):
    if init:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(GPT(GPTArgs()))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = MarkovTokens(256, 64, 4, 0).local_batch(0, 16, rank, world)
    loss = cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if rank == 0:
        with open(marker, "w") as f:
            f.write(repr(time.time()))
    dist.barrier()
    if init:
        dist.destroy_process_group()
'''

AITRAIN_RANK = STEP + '''
first_step(os.environ["BENCH_MARKER"], init=True)
'''

TRAINER_DRIVER = STEP + '''
import ray
from ray.train import ScalingConfig, RunConfig
from ray.train.torch import TorchTrainer, TorchConfig

marker = os.environ["BENCH_MARKER"]
ray.init(address=os.environ["BENCH_ADDRESS"], logging_level="ERROR", log_to_driver=False)
trainer = TorchTrainer(lambda: first_step(marker, init=False),
                       scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                       torch_config=TorchConfig(backend="gloo"),
                       run_config=RunConfig(storage_path=os.environ["BENCH_STORAGE"], name="bench"))
trainer.fit()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def time_to_step(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300,
                 verbose: bool = False) -> float:
    marker = cwd / "first-step"
    marker.unlink(missing_ok=True)
    env = dict(env, BENCH_MARKER=str(marker))  # the driver's env; aitrain's ranks get it via fabric.env
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = [f"{time.time() - t0:7.2f} {line}" for line in proc.stdout]
    code = proc.wait(timeout)
    if code != 0 or not marker.exists():
        raise RuntimeError(f"{argv[:4]}... exited {code} without a first step:\n{''.join(out)[-3000:]}")
    elapsed = float(marker.read_text()) - t0
    if verbose:
        print(f"--- {Path(argv[0]).name} {argv[1]}: first step at {elapsed:.2f}s\n{''.join(out)[-4000:]}", flush=True)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--address", help="a running cluster's GCS address (default: start a local head here)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each run's output with timestamps")
    args = ap.parse_args()
    bindir = Path(sys.executable).parent
    tmp = Path(tempfile.mkdtemp(prefix="aitrain-ray-bench-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    started = False
    address = args.address
    if not address:
        # Ray's single-machine mode keeps every Ray process on 127.0.0.1 (else it registers
        # this machine's network address even with --node-ip-address=127.0.0.1).
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        port = _free_port()
        subprocess.run([str(bindir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--num-cpus=4", "--include-dashboard=false", "--disable-usage-stats"],
                       check=True, capture_output=True, env=env)
        started = True
        address = f"127.0.0.1:{port}"
    env["BENCH_ADDRESS"] = address
    env["BENCH_STORAGE"] = str(tmp / "ray-results")
    if "RAY_AUTH_MODE" not in env and (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"  # what aitrain does for itself; the plain driver needs it too
    try:
        (tmp / "rank.py").write_text(AITRAIN_RANK)
        (tmp / "trainer.py").write_text(TRAINER_DRIVER)
        aitrain = [str(bindir / "aitrain"), "launch", "backend=ray", f"backend.address={address}",
                   "nproc_per_node=2", f"script={tmp / 'rank.py'}", f"fabric.env.BENCH_MARKER={tmp / 'first-step'}"]
        trainer = [sys.executable, str(tmp / "trainer.py")]
        print(f"cluster {address}; warm-up (page cache, MLflow schema, Ray Train imports)", flush=True)
        time_to_step(aitrain, tmp, env)
        time_to_step(trainer, tmp, env)
        a, t = [], []
        for i in range(args.reps):
            a.append(time_to_step(aitrain, tmp, env, verbose=args.verbose))
            t.append(time_to_step(trainer, tmp, env, verbose=args.verbose))
            print(f"rep {i + 1}: aitrain {a[-1]:.2f}s, TorchTrainer {t[-1]:.2f}s", flush=True)
    finally:
        if started:
            subprocess.run([str(bindir / "ray"), "stop", "--force"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    ma, mt = statistics.median(a), statistics.median(t)
    print(f"time to first optimizer step, median of {args.reps}: aitrain {ma:.2f}s, TorchTrainer {mt:.2f}s, "
          f"ratio {ma / mt:.2f}x (target <= 0.5x)")
    return 0 if ma <= 0.5 * mt else 1


if __name__ == "__main__":
    sys.exit(main())
