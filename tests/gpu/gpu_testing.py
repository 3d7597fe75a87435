"""Helpers of the GPU tier (tests/gpu): is there a GPU torch can use, and launches on it.

Nothing here imports torch, MLflow or pynvml at import time: without an NVIDIA driver the
whole tier is skipped from a few file checks, so collecting it costs nothing on CPU machines.
With a driver, torch is asked once, in a subprocess (the test process holds no CUDA context
that the launched ranks would have to share the GPU with).
"""

from __future__ import annotations

import ast
import functools
import glob
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aitrain_testing import REPO, run_aitrain

# What `scripts/gpu_check.sh` installs, to quote in skip reasons.
GPU_CHECK = "bash scripts/gpu_check.sh"
LAUNCH_TIMEOUT_S = 240.0

_FACTS_SCRIPT = r"""
import json
import torch
f = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": False, "devices": 0}
try:
    torch.cuda.init()
    f["available"] = torch.cuda.is_available()
    f["devices"] = torch.cuda.device_count()
except Exception as e:
    f["error"] = f"{type(e).__name__}: {e}".strip()
if f["available"]:
    p = torch.cuda.get_device_properties(0)
    f.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_mib=p.total_memory // 2**20,
             bf16=bool(torch.cuda.is_bf16_supported()))
    try:
        v = torch.cuda.nccl.version()
        f["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as e:
        f["nccl"] = None
        f["nccl_error"] = f"{type(e).__name__}: {e}"
print("AITRAIN_FACTS " + json.dumps(f))
"""


def driver_present() -> bool:
    """An NVIDIA kernel driver (or at least its device nodes / nvidia-smi) on this machine."""
    return (Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None
            or bool(glob.glob("/dev/nvidia[0-9]*")))


def _torch_build_cuda() -> tuple[str | None, str | None]:
    """(torch version, CUDA version torch was built with), without importing torch."""
    from aitrain.fabric.probe.system import _torch_build_constant

    return _torch_build_constant("__version__"), _torch_build_constant("cuda")


@functools.cache
def torch_facts() -> dict[str, Any]:
    """What this interpreter's torch says about CUDA (asked in a subprocess, once)."""
    r = subprocess.run([sys.executable, "-c", _FACTS_SCRIPT], capture_output=True, text=True, timeout=180)
    line = next((x for x in r.stdout.splitlines() if x.startswith("AITRAIN_FACTS ")), None)
    if line is None:
        return {"available": False, "error": (r.stderr.strip().splitlines() or ["torch did not answer"])[-1]}
    facts: dict[str, Any] = json.loads(line.split(" ", 1)[1])
    return facts


@functools.cache
def skip_reason() -> str | None:
    """Why the GPU tier cannot run here, or None when torch sees a CUDA GPU."""
    if not driver_present():
        return "no NVIDIA GPU here (no /proc/driver/nvidia, no /dev/nvidia*, no nvidia-smi): the GPU tier " \
               f"runs on a machine with one NVIDIA GPU ({GPU_CHECK})"
    version, cuda = _torch_build_cuda()
    if version is None:
        return f"torch is not installed in {sys.executable} ({GPU_CHECK} installs a CUDA build)"
    if cuda is None:
        return f"torch {version} is a CPU build: the GPU tier needs a CUDA build ({GPU_CHECK} installs one)"
    facts = torch_facts()
    if not facts.get("available"):
        why = facts.get("error") or "torch.cuda.is_available() is False"
        return f"torch {version} (CUDA {cuda}) sees no GPU: {why}"
    return None


# -- launches --------------------------------------------------------------------------------


@dataclass
class Launch:
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def launch(workdir: Path, args: list[str], *, program: list[str] | None = None,
           timeout: float = LAUNCH_TIMEOUT_S) -> Launch:
    """``aitrain launch ARGS [-- PROGRAM]`` from ``workdir``, into ``workdir/run``; asserts it succeeded."""
    run_dir = workdir / "run"
    argv = ["launch", *args, f"hydra.run.dir={run_dir}"]
    if program is not None:
        argv += ["--", *program]
    r = run_aitrain(argv, workdir, timeout=timeout)
    assert r.returncode == 0, (f"aitrain {' '.join(argv)} exited {r.returncode}\n"
                               f"--- stdout (tail)\n{r.stdout[-4000:]}\n--- stderr (tail)\n{r.stderr[-4000:]}")
    return Launch(r.stdout, r.stderr, run_dir)


def run_losses(run_dir: Path) -> list[float]:
    """Rank 0's per-step losses from the run directory's metrics spool."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [float(r["loss"]) for r in sorted(records, key=lambda r: r["step"])]


def metrics_records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def reference_losses(n_layer: int, steps: int, batch: int) -> tuple[float, ...]:
    """The single-process CPU fp32 reference of tests/strategies (same seed, data and schedule)."""
    strategies = str(REPO / "tests" / "strategies")
    if strategies not in sys.path:
        sys.path.insert(0, strategies)
    from losses_reference import reference_losses as ref

    return ref(n_layer, steps, batch)


def tiny_model(n_layer: int = 2) -> list[str]:
    """The model of tests/strategies' reference (fast anywhere; the GPU tier checks paths, not speed)."""
    strategies = str(REPO / "tests" / "strategies")
    if strategies not in sys.path:
        sys.path.insert(0, strategies)
    from losses_reference import TINY

    return [f"model.n_layer={n_layer}", f"model.d_model={TINY['d_model']}", f"model.n_head={TINY['n_head']}",
            f"model.seq_len={TINY['seq_len']}", f"model.vocab_size={TINY['vocab_size']}"]


def mlflow_run(workdir: Path) -> tuple[Any, Any]:
    """(client, run) of the launch's run in ``workdir``'s embedded store (outputs/mlflow.db); runs
    that a framework's own logger may have made beside it are not the launch's."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("aitrain")
    assert experiment is not None, "no MLflow experiment 'aitrain' in outputs/mlflow.db"
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "aitrain.command" in r.data.tags]
    assert len(runs) == 1, [(r.info.run_id, r.info.run_name) for r in runs]
    return client, runs[0]


def host_metric_prefix() -> str:
    from aitrain.launcher.node.sysmetrics import metric_name, node_name

    return f"system/{metric_name(node_name())}/"


def gpu_memory_swing_mib(client: Any, run_id: str, metrics: dict[str, float]) -> float:
    """The largest rise of one GPU's used memory over the run's NVML samples (MiB): the job's CUDA
    context and tensors show up there, the samples before the ranks started do not."""
    prefix = host_metric_prefix()
    swing = 0.0
    for key in metrics:
        if key.startswith(prefix + "gpu/") and key.endswith("/mem_used_mib"):
            values = [m.value for m in client.get_metric_history(run_id, key)]
            if values:
                swing = max(swing, max(values) - min(values))
    return swing


def nvml_installed() -> bool:
    return importlib.util.find_spec("pynvml") is not None


NVML_MISSING = f"nvidia-ml-py is not installed: pip install -e '.[nvml]' ({GPU_CHECK} installs it)"


def nvidia_smi(query: str) -> list[list[str]]:
    """``nvidia-smi --query-gpu=QUERY`` rows (one per GPU), fields stripped."""
    r = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr or r.stdout
    return [[f.strip() for f in line.split(",")] for line in r.stdout.splitlines() if line.strip()]


# -- programs of other frameworks ------------------------------------------------------------

# Modules whose pip distribution has another name.
DISTRIBUTIONS = {"pytorch_lightning": "pytorch-lightning", "sklearn": "scikit-learn", "yaml": "pyyaml"}
# Modules a framework needs at run time without the script importing them (HF Trainer: accelerate).
ALSO_NEEDS = {"transformers": ("accelerate",)}


def missing_imports(script: Path) -> list[str]:
    """Top-level modules ``script`` imports that this interpreter cannot find (stdlib and the
    script's own folder aside)."""
    tree = ast.parse(script.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    local = {p.stem for p in script.parent.glob("*.py")} | {p.name for p in script.parent.iterdir() if p.is_dir()}
    stdlib = set(getattr(sys, "stdlib_module_names", ()))
    names = names - stdlib - local - {"__future__"}
    names |= {m for n in names for m in ALSO_NEEDS.get(n, ())}
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def pip_names(modules: list[str]) -> str:
    return " ".join(DISTRIBUTIONS.get(m, m) for m in modules)
