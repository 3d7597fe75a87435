"""Other frameworks' training programs on one GPU, launched as a user would:

    aitrain launch nproc_per_node=1 -- tests/frameworks/scripts/hf_trainer.py --accelerator cuda

The programs are the CPU framework tests' (tests/frameworks/scripts/, `--accelerator cpu|cuda`).
A program that is not there, or whose framework is not installed, is skipped saying which.
Proof that the job used the GPU: the node agent's NVML samples show the GPU's memory rise while
it ran (the job's CUDA context alone is hundreds of MiB).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from gpu_testing import (
    gpu_memory_swing_mib,
    launch,
    missing_imports,
    mlflow_run,
    nvml_installed,
    pip_names,
)

from aitrain_testing import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(360)]

SCRIPTS = REPO / "tests" / "frameworks" / "scripts"
FRAMEWORKS = {"hf_trainer": "Hugging Face Trainer", "lightning_train": "Lightning"}
MIN_GPU_MEMORY_MIB = 100


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_framework_job_on_one_gpu(tmp_path: Path, name: str, note: Any) -> None:
    framework = FRAMEWORKS[name]
    script = SCRIPTS / f"{name}.py"
    if not script.is_file():
        pytest.skip(f"{framework}: {script.relative_to(REPO)} is not there (it comes with the CPU framework tests)")
    missing = missing_imports(script)
    if missing:
        pytest.skip(f"{framework}: {script.name} imports {', '.join(missing)}, not installed "
                    f"(pip install {pip_names(missing)})")
    t0 = time.monotonic()
    run = launch(tmp_path, ["nproc_per_node=1", "tracking.system_metrics_interval_s=0.25"],
                 program=[str(script), "--accelerator", "cuda"], timeout=330)
    seconds = time.monotonic() - t0
    assert (run.run_dir / "logs" / "rank0.log").read_text().strip(), "rank 0 printed nothing"
    client, mlrun = mlflow_run(tmp_path)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params.get("script_args") == "['--accelerator', 'cuda']", mlrun.data.params
    if not nvml_installed():
        note(f"{framework}: finished in {seconds:.0f}s (GPU use not verified: no NVML)")
        return
    swing = gpu_memory_swing_mib(client, mlrun.info.run_id, dict(mlrun.data.metrics))
    assert swing >= MIN_GPU_MEMORY_MIB, (
        f"the GPU's used memory rose by {swing:.0f} MiB while the job ran: it did not run on the GPU?\n"
        + run.stdout[-3000:])
    note(f"{framework}: finished in {seconds:.0f}s, GPU memory +{swing:,.0f} MiB while it ran")


def test_torchtitan_debug_model_on_one_gpu(tmp_path: Path) -> None:
    """torchtitan needs CUDA (0.3 takes `cuda` as its device when no accelerator is present, and
    imports triton), so it is tested here: `-- -m torchtitan.train` with its smallest debug
    model, run from a torchtitan checkout (its debug config reads ./tests/assets/)."""
    import importlib.util
    import os

    if importlib.util.find_spec("torchtitan") is None or importlib.util.find_spec("triton") is None:
        pytest.skip("torchtitan and triton are not installed (pip install torchtitan triton)")
    checkout = Path(os.environ.get("TORCHTITAN_CHECKOUT", ""))
    if not (checkout / "tests" / "assets" / "tokenizer").is_dir():
        pytest.skip("TORCHTITAN_CHECKOUT is not a torchtitan checkout with tests/assets/ (the debug "
                    "config's tokenizer and c4_test data)")
    r = launch(checkout, ["nproc_per_node=1", f"run_root={tmp_path}"],
               program=["-m", "torchtitan.train", "--module", "llama3", "--config", "llama3_debugmodel",
                        "--training.steps", "10"], timeout=330)
    assert "step: 10" in r.stdout or "step 10" in r.stdout, r.stdout[-3000:]
