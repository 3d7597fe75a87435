"""Every strategy through the real `aitrain launch`: 10 steps of the tiny GPT on gloo, fp32, and
rank 0's per-step losses must match a single-process reference (same seed, same global batches)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aitrain_testing import run_aitrain
from losses_reference import reference_losses, run_losses, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# TP and PP change the order of floating-point reductions; everything else should agree to ~1e-6.
RTOL, ATOL = 1e-4, 1e-5


def launch(tmp_path: Path, strategy: str, nproc: int, *extra: str, n_layer: int = 2) -> list[float]:
    run_dir = tmp_path / "run"
    r = run_aitrain(["launch", f"+strategy={strategy}", f"nproc_per_node={nproc}", *tiny_overrides(n_layer),
                     *extra, f"hydra.run.dir={run_dir}"], tmp_path, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[rank0]:step 1/10" in r.stdout and "[rank0]:step 10/10" in r.stdout
    return run_losses(run_dir)


def assert_matches_reference(losses: list[float], n_layer: int = 2) -> None:
    ref = reference_losses(n_layer)
    assert len(losses) == len(ref) == 10
    assert losses == pytest.approx(list(ref), rel=RTOL, abs=ATOL), \
        "\n".join(f"step {i + 1}: got {a:.7f} reference {b:.7f}"
                  for i, (a, b) in enumerate(zip(losses, ref, strict=True)))
    assert ref[-1] < ref[0]  # it trains


# Options that must not change fp32 numerics (gradient accumulation, activation checkpointing)
# ride on the strategies, so each code path runs once without launching twice as many jobs.
TWO_RANKS = {
    "ddp_grad_accum": ("ddp", ["train.grad_accum=2"]),  # DDP no_sync on the first micro-step
    "fsdp_full_ac": ("fsdp", ["strategy.activation_checkpointing=full"]),
    "hsdp_grad_accum": ("hsdp", ["train.grad_accum=2"]),  # 2 replicas x 1 shard at 2 ranks; FSDP2 no-sync
    "tp_sequence_parallel_selective_ac": ("tp", ["strategy.sequence_parallel=true",
                                                 "strategy.activation_checkpointing=selective"]),
    "pp_gpipe_grad_accum": ("pp", ["pp.schedule=GPipe", "train.grad_accum=2", "pp.microbatches=2"]),
    "pp_1f1b": ("pp", ["pp.schedule=1F1B"]),
    "fsdp_tp": ("fsdp_tp", []),  # tp=2 (no sequence parallel), dp_shard=1 at 2 ranks
    "fsdp_tp_pp": ("fsdp_tp_pp", ["parallel.tp=1"]),  # 2 stages, each FSDP x TP over 1 rank
}


@pytest.mark.parametrize("case", list(TWO_RANKS))
def test_two_ranks_match_single_process(tmp_path: Path, case: str) -> None:
    strategy, extra = TWO_RANKS[case]
    assert_matches_reference(launch(tmp_path, strategy, 2, *extra))


def test_interleaved_1f1b_two_stages_per_rank(tmp_path: Path) -> None:
    # 2 ranks x 2 stages per rank = 4 stages: one block each.
    losses = launch(tmp_path, "pp", 2, "pp.schedule=Interleaved1F1B", n_layer=4)
    assert_matches_reference(losses, n_layer=4)


FOUR_RANKS = {
    "hsdp_2x2": ("hsdp", ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    "fsdp_tp_2x2": ("fsdp_tp", ["parallel.tp=2"]),
    "pp2_fsdp2": ("pp", ["parallel.pp=2", "parallel.dp_shard=2"]),
    "fsdp_tp_pp_2x2_sp": ("fsdp_tp_pp", ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1",
                                         "strategy.sequence_parallel=true"]),
}


@pytest.mark.parametrize("case", list(FOUR_RANKS))
def test_four_ranks_match_single_process(tmp_path: Path, case: str) -> None:
    strategy, extra = FOUR_RANKS[case]
    assert_matches_reference(launch(tmp_path, strategy, 4, *extra))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_bf16_trains_close_to_fp32(tmp_path: Path, strategy: str) -> None:
    # bf16 compute (autocast for DDP, FSDP2's MixedPrecisionPolicy) with fp32 master weights.
    losses = launch(tmp_path, strategy, 2, "strategy.mixed_precision=bf16")
    assert losses == pytest.approx(list(reference_losses(2)), rel=5e-3)
    assert losses != pytest.approx(list(reference_losses(2)), rel=1e-7, abs=0)  # really in bf16


def test_compiled_blocks_match_single_process(tmp_path: Path) -> None:
    # torch.compile (inductor on CPU) per transformer block, under FSDP2 on one rank.
    assert_matches_reference(launch(tmp_path, "fsdp", 1, "strategy.compile=true"))
