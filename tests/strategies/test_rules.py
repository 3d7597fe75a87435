"""Pre-start checks (no torch, no processes): degrees per strategy, options, the built-in model
against TP and PP, the batch splits. Each error says what was found and ends with a hint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from aitrain.errors import ConfigError
from aitrain.strategies.options import PP_SCHEDULES, StrategyOptions
from aitrain.strategies.plan import ParallelPlan
from aitrain.strategies.rules import BUILTIN_STRATEGIES, check_batch, check_degrees, preflight

GPT = SimpleNamespace(n_layer=2, n_head=4, d_model=64, mlp_ratio=4, vocab_size=256, seq_len=64)
OPTS = StrategyOptions()


def plan(world: int, **degrees: int) -> ParallelPlan:
    return ParallelPlan.resolve(world_size=world, **degrees)


def test_builtin_strategies() -> None:
    assert BUILTIN_STRATEGIES == ("ddp", "fsdp", "fsdp_tp", "fsdp_tp_pp", "hsdp", "pp", "tp")


@pytest.mark.parametrize("strategy,degrees", [
    ("ddp", dict(dp_replicate=-1, dp_shard=1)),
    ("fsdp", dict(dp_shard=-1)),
    ("hsdp", dict(dp_replicate=2, dp_shard=-1)),
    ("tp", dict(dp_shard=1, tp=-1)),
    ("pp", dict(dp_shard=1, pp=-1)),
    ("pp", dict(dp_shard=-1, pp=2)),
    ("fsdp_tp", dict(dp_shard=-1, tp=2)),
    ("fsdp_tp_pp", dict(dp_shard=-1, tp=2, pp=2)),
])
def test_each_strategy_accepts_its_own_degrees(strategy: str, degrees: dict) -> None:
    preflight(strategy, plan(8, **degrees), OPTS, model=SimpleNamespace(**{**vars(GPT), "n_layer": 8, "n_head": 8}),
              train=SimpleNamespace(global_batch_size=16, grad_accum=1))


@pytest.mark.parametrize("strategy,degrees,wrong", [
    ("ddp", dict(dp_shard=-1), "parallel.dp_shard=4"),
    ("ddp", dict(dp_replicate=2, tp=2, dp_shard=1), "parallel.tp=2"),
    ("fsdp", dict(dp_shard=2, pp=2), "parallel.pp=2"),
    ("hsdp", dict(dp_shard=2, tp=2), "parallel.tp=2"),
    ("tp", dict(dp_shard=2, tp=2), "parallel.dp_shard=2"),
    ("pp", dict(pp=2, tp=2, dp_shard=1), "parallel.tp=2"),
    ("fsdp_tp", dict(tp=2, pp=2, dp_shard=1), "parallel.pp=2"),
])
def test_degrees_a_strategy_cannot_run_are_named(strategy: str, degrees: dict, wrong: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_degrees(strategy, plan(4, **degrees))
    msg = str(e.value)
    assert f"strategy {strategy} needs" in msg and wrong in msg and "HINT:" in msg


def test_wrong_product_fails_with_the_numbers_and_a_hint() -> None:
    with pytest.raises(ConfigError) as e:
        ParallelPlan.resolve(world_size=4, dp_replicate=1, dp_shard=3, tp=1, pp=1)
    assert "multiply to 3" in str(e.value) and "world size is 4" in str(e.value) and "HINT:" in str(e.value)
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible .* product 4"):
        ParallelPlan.resolve(world_size=6, dp_shard=-1, tp=2, pp=2)


def test_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as e:
        preflight("nope", plan(2), OPTS)
    assert "unknown strategy 'nope'" in str(e.value)
    assert "ddp, fsdp, fsdp_tp, fsdp_tp_pp, hsdp, pp, tp" in str(e.value)


def test_tp_that_does_not_divide_the_heads_names_the_module() -> None:
    with pytest.raises(ConfigError) as e:
        preflight("tp", plan(3, dp_shard=1, tp=-1), OPTS, model=GPT)
    msg = str(e.value)
    assert "cannot shard module 'layers.0.attention'" in msg and "4 heads" in msg and "tp=3" in msg
    assert "HINT:" in msg


def test_tp_that_does_not_divide_the_vocabulary_names_the_embedding() -> None:
    model = SimpleNamespace(**{**vars(GPT), "vocab_size": 255})
    with pytest.raises(ConfigError, match=r"module 'tok_embeddings'.*255 vocabulary rows.*tp=2"):
        preflight("tp", plan(2, dp_shard=1, tp=-1), OPTS, model=model)


def test_sequence_parallel_needs_the_sequence_to_split() -> None:
    model = SimpleNamespace(**{**vars(GPT), "n_head": 6, "d_model": 60, "seq_len": 65})
    opts = StrategyOptions(sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"sequence \(65 tokens\) over tp=2"):
        preflight("tp", plan(2, dp_shard=1, tp=-1), opts, model=model)
    preflight("tp", plan(2, dp_shard=1, tp=-1), StrategyOptions(), model=model)  # fine without SP


def test_more_pipeline_stages_than_layers_says_so() -> None:
    with pytest.raises(ConfigError) as e:
        preflight("pp", plan(4, dp_shard=1, pp=-1), OPTS, model=GPT)
    msg = str(e.value)
    assert "4 stages (parallel.pp=4)" in msg and "2 layer(s) (model.n_layer=2)" in msg and "HINT:" in msg


def test_interleaved_stages_count_against_the_layers() -> None:
    opts = StrategyOptions(pp_schedule="Interleaved1F1B")
    with pytest.raises(ConfigError, match=r"4 stages \(parallel.pp=2 x pp.stages_per_rank=2\)"):
        preflight("pp", plan(2, dp_shard=1, pp=-1), opts, model=GPT)
    preflight("pp", plan(2, dp_shard=1, pp=-1), opts, model=SimpleNamespace(**{**vars(GPT), "n_layer": 4}))


def test_batch_must_split_over_dp_accumulation_and_microbatches() -> None:
    p = plan(4, dp_shard=2, pp=2)
    check_batch(p, OPTS, global_batch_size=16, grad_accum=2)  # 16 / 2 dp / 2 accum = 4 = 4 micro-batches
    with pytest.raises(ConfigError, match="does not split over the 2 data-parallel ranks"):
        check_batch(p, OPTS, global_batch_size=15, grad_accum=1)
    with pytest.raises(ConfigError, match="train.grad_accum=3"):
        check_batch(p, OPTS, global_batch_size=16, grad_accum=3)
    with pytest.raises(ConfigError, match="pp.microbatches=4"):
        check_batch(p, OPTS, global_batch_size=8, grad_accum=2)


def test_options_are_validated_and_list_the_choices() -> None:
    with pytest.raises(ConfigError, match="not a known pipeline schedule. Known schedules: GPipe, 1F1B"):
        StrategyOptions(pp_schedule="ZeroBubbleMagic")
    with pytest.raises(ConfigError, match="activation_checkpointing='some'.*none, selective, full"):
        StrategyOptions(activation_checkpointing="some")
    with pytest.raises(ConfigError, match="mixed_precision='fp8'"):
        StrategyOptions(mixed_precision="fp8")
    with pytest.raises(ConfigError, match="one stage per rank"):
        StrategyOptions(pp_schedule="1F1B", pp_stages_per_rank=2)
    assert StrategyOptions(pp_schedule="Interleaved1F1B").stages_per_rank == 2
    assert StrategyOptions(pp_schedule="GPipe").stages_per_rank == 1
    assert set(PP_SCHEDULES) >= {"GPipe", "1F1B", "Interleaved1F1B"}


def test_options_from_config_like_objects() -> None:
    strategy = SimpleNamespace(name="tp", mixed_precision="bf16", activation_checkpointing="full", compile=False,
                               sequence_parallel=True)
    opts = StrategyOptions.from_config(strategy, {"schedule": "GPipe", "microbatches": 8, "stages_per_rank": 0})
    assert (opts.mixed_precision, opts.activation_checkpointing, opts.sequence_parallel) == ("bf16", "full", True)
    assert (opts.pp_schedule, opts.pp_microbatches) == ("GPipe", 8)
