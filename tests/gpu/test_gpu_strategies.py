"""The built-in job on one GPU through the real `aitrain launch`: device=cuda, nccl, one rank.

Every strategy in configs/strategy/ whose config fits world size 1 runs 10 steps of the tiny
GPT; rank 0's losses must match tests/strategies' single-process CPU fp32 reference (same seed,
init and batches), so a wrong device, dtype or collective on the GPU path shows up as numbers.
Strategies whose config fixes a degree above 1 (hsdp, fsdp_tp, fsdp_tp_pp) need more ranks
than one GPU gives: they are skipped, saying which degrees (tests/strategies runs them on CPU).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from gpu_testing import launch, metrics_records, reference_losses, run_losses, tiny_model

from aitrain_testing import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

STEPS, BATCH, N_LAYER = 10, 8, 2
STRATEGY_CONFIGS = REPO / "configs" / "strategy"
# fp32 on the GPU (no TF32 for matmuls: torch's default) against fp32 on the CPU.
FP32_RTOL, FP32_ATOL = 1e-3, 1e-4
# bf16 compute with fp32 master weights: close to the fp32 reference, but apart from the fp32 run
# on the same GPU (on the tiny model bf16 moves the losses by ~1e-5 relative; fp32 run to run ~1e-7).
BF16_RTOL, BF16_MIN_DEVIATION = 2e-2, 2e-6


def strategy_cases() -> list[Any]:
    """One case per configs/strategy/*.yaml; those that need more than one rank are skipped."""
    cases = []
    for path in sorted(STRATEGY_CONFIGS.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        fixed = {k: v for k, v in (cfg.get("parallel") or {}).items() if isinstance(v, int) and v > 1}
        ranks = math.prod(fixed.values())
        marks = []
        if ranks > 1:
            degrees = " x ".join(f"{k}={v}" for k, v in fixed.items())
            marks.append(pytest.mark.skip(
                reason=f"{path.stem} needs >= {ranks} ranks ({degrees} in configs/strategy/{path.name}); "
                       "one GPU is world size 1 (tests/strategies runs it on CPU ranks)"))
        cases.append(pytest.param(path.stem, marks=marks, id=path.stem))
    return cases


def launch_builtin(tmp_path: Path, strategy: str, *extra: str) -> tuple[str, list[float]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    run = launch(tmp_path, [f"+strategy={strategy}", "nproc_per_node=1", "device=cuda", "dist_backend=nccl",
                            *tiny_model(N_LAYER), f"train.global_batch_size={BATCH}", f"train.steps={STEPS}",
                            "tracking=none", *extra])
    assert f"[rank0]:aitrain: training {strategy} on 1 rank(s)" in run.stdout, run.stdout[-3000:]
    assert ", device cuda," in run.stdout, "the rank did not train on the GPU:\n" + run.stdout[-3000:]
    assert f"[rank0]:step {STEPS}/{STEPS}" in run.stdout, run.stdout[-3000:]
    return run.output, run_losses(run.run_dir)


def rate(tmp_path: Path) -> str:
    """Median tokens/s after the first step."""
    tokens = [float(r["tokens_per_s"]) for r in metrics_records(tmp_path / "run")][1:]
    return f"{statistics.median(tokens):,.0f} tokens/s" if tokens else "no tokens/s"


def max_rel(losses: list[float], ref: list[float] | tuple[float, ...]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, ref, strict=True))


def compare(losses: list[float], ref: tuple[float, ...]) -> str:
    return "\n".join(f"step {i + 1}: got {a:.7f} reference {b:.7f} ({(a - b) / b:+.2e})"
                     for i, (a, b) in enumerate(zip(losses, ref, strict=False)))


# Rank 0's fp32 losses on the GPU per strategy, for the bf16 tests (which run after these).
FP32_ON_GPU: dict[str, list[float]] = {}


@pytest.mark.parametrize("strategy", strategy_cases())
def test_builtin_job_on_one_gpu_matches_cpu_reference(tmp_path: Path, strategy: str,
                                                       note: Callable[[str], None]) -> None:
    _, losses = launch_builtin(tmp_path, strategy)
    ref = reference_losses(N_LAYER, STEPS, BATCH)
    assert len(losses) == STEPS, losses
    assert losses == pytest.approx(list(ref), rel=FP32_RTOL, abs=FP32_ATOL), compare(losses, ref)
    assert losses[-1] < losses[0]
    FP32_ON_GPU[strategy] = losses
    note(f"{strategy} fp32: loss {losses[0]:.3f}->{losses[-1]:.3f}, max rel diff to CPU {max_rel(losses, ref):.1e}, "
         f"{rate(tmp_path)}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])  # autocast (DDP) and FSDP2's MixedPrecisionPolicy
def test_bf16_on_one_gpu(tmp_path: Path, strategy: str, gpu: dict[str, Any], note: Callable[[str], None]) -> None:
    if not gpu.get("bf16"):
        pytest.skip(f"{gpu.get('name')} has no bf16 support (torch.cuda.is_bf16_supported() is False)")
    if strategy not in FP32_ON_GPU:  # run alone (-k bf16): the fp32 run on this GPU first
        FP32_ON_GPU[strategy] = launch_builtin(tmp_path / "fp32", strategy)[1]
    fp32 = FP32_ON_GPU[strategy]
    output, losses = launch_builtin(tmp_path, strategy, "strategy.mixed_precision=bf16")
    assert "no bf16 support" not in output, output[-3000:]  # the fp32 fallback of strategies/compose.py
    ref = reference_losses(N_LAYER, STEPS, BATCH)
    assert losses == pytest.approx(list(ref), rel=BF16_RTOL), compare(losses, ref)
    assert losses[-1] < losses[0]
    # Same GPU, same kernels, only the compute dtype differs: bf16 must move the losses.
    apart = max_rel(losses, fp32)
    assert apart > BF16_MIN_DEVIATION, f"losses within {apart:.1e} of the fp32 run on this GPU: " \
        f"not computed in bf16\n" + compare(losses, tuple(fp32))
    note(f"{strategy} bf16: loss {losses[0]:.3f}->{losses[-1]:.3f}, max rel diff to fp32 on GPU {apart:.1e}, "
         f"{rate(tmp_path)}")
