"""What a GPU launch records in MLflow: NVML system metrics, the MFU estimate, GPU and versions.

One launch serves the module (the built-in job, ddp in bf16 on the small model, 40 steps,
system metrics every 0.25 s); each test reads a different part of its MLflow run. NVML
comes from nvidia-ml-py (the `nvml` extra): without it there are no GPU metrics and, since
the MFU estimate needs the GPU's name from NVML, no MFU either, so the module is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gpu_testing import NVML_MISSING, Launch, host_metric_prefix, launch, mlflow_run, nvml_installed, skip_reason

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

STEPS = 40
GPU_METRICS = ("util_pct", "mem_used_mib", "power_w", "temp_c")


class Observed:
    def __init__(self, workdir: Path, run: Launch) -> None:
        self.workdir = workdir
        self.launch = run
        self.client, self.run = mlflow_run(workdir)
        self.run_id: str = self.run.info.run_id
        self.metrics: dict[str, float] = dict(self.run.data.metrics)
        self.tags: dict[str, str] = dict(self.run.data.tags)

    def history(self, key: str) -> list[float]:
        return [m.value for m in sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Observed:
    reason = skip_reason() or (None if nvml_installed() else NVML_MISSING)
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("observed")
    run = launch(workdir, ["+strategy=ddp", "nproc_per_node=1", "device=cuda", "dist_backend=nccl", "model=small",
                           "strategy.mixed_precision=bf16", f"train.steps={STEPS}", "train.log_every=10",
                           "tracking.system_metrics_interval_s=0.25"])
    return Observed(workdir, run)


def test_run_finished_with_the_gpu_and_its_versions(observed: Observed, gpu: dict[str, Any]) -> None:
    assert observed.run.info.status == "FINISHED"
    tags = observed.tags
    assert gpu["name"] in tags.get("gpu", ""), tags.get("gpu")
    assert tags.get("versions.cuda_runtime") == gpu["cuda"], tags
    assert tags.get("versions.nccl") == gpu["nccl"], tags
    assert tags.get("versions.driver") and tags.get("versions.cuda_driver"), tags
    node = json.loads(next((observed.launch.run_dir / "nodes").glob("*.json")).read_text())
    assert gpu["name"] in [g["name"] for g in node["gpus"]], node["gpus"]
    assert all(g["memory_mib"] > 0 for g in node["gpus"]), node["gpus"]


def test_nvml_system_metrics_recorded(observed: Observed, note: Any) -> None:
    prefix = host_metric_prefix() + "gpu/"
    found = sorted(k[len(prefix):] for k in observed.metrics if k.startswith(prefix))
    indexes = sorted({k.split("/")[0] for k in found})
    assert indexes, f"no {prefix}* metrics; system metrics: " + \
        ", ".join(sorted(k for k in observed.metrics if k.startswith("system/")))
    for i in indexes:
        for name in GPU_METRICS:
            assert f"{i}/{name}" in found, found
    mem = observed.history(f"{prefix}0/mem_used_mib")
    assert len(mem) >= 2 and max(mem) > 0, mem
    assert observed.metrics[f"{prefix}0/power_w"] > 0
    assert 0 < observed.metrics[f"{prefix}0/temp_c"] < 120
    assert 0 <= max(observed.history(f"{prefix}0/util_pct")) <= 100
    note(f"NVML: {len(indexes)} GPU(s), {len(mem)} samples, gpu/0 memory up to {max(mem):,.0f} MiB, "
         f"util up to {max(observed.history(f'{prefix}0/util_pct')):.0f}%, "
         f"power {observed.metrics[f'{prefix}0/power_w']:.0f} W")


def test_mfu_recorded(observed: Observed, gpu: dict[str, Any], note: Any) -> None:
    from aitrain.launcher.node.nodeinfo import peak_flops

    peak = peak_flops(gpu["name"], "bf16")
    if peak is None:
        assert "steady/mfu" not in observed.metrics
        pytest.skip(f"{gpu['name']} is not in launcher/node/nodeinfo.py PEAK_FLOPS: no MFU estimate for it")
    per_step = observed.history("mfu")
    # Steps forwarded before the node agent wrote nodes/<host>.json (NVML) carry no estimate yet.
    assert per_step and all(0 < v < 1 for v in per_step), per_step
    assert "steady/mfu" in observed.metrics, sorted(k for k in observed.metrics if not k.startswith("system/"))
    rank0 = json.loads((observed.launch.run_dir / "progress" / "rank0.json").read_text())
    n_params = rank0["info"]["n_params"]
    # 6 x params x tokens/s over the peak of the one GPU (bf16 peak: the job ran in bf16).
    expected = 6 * n_params * observed.metrics["steady/tokens_per_s"] / peak
    assert observed.metrics["steady/mfu"] == pytest.approx(expected, rel=1e-6)
    assert 0 < observed.metrics["steady/mfu"] < 1
    note(f"MFU (bf16, small model, {n_params / 1e6:.1f}M params): {observed.metrics['steady/mfu']:.2%} at "
         f"{observed.metrics['steady/tokens_per_s']:,.0f} tokens/s; per-step mfu on {len(per_step)}/{STEPS} steps")
