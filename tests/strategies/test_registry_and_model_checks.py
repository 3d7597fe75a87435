"""The strategy registry, and the checks that walk a real module (TP plan, pipeline cuts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aitrain import strategies
from aitrain.errors import ConfigError
from aitrain.strategies import registry
from aitrain.strategies.compose import check_model
from aitrain.strategies.model import GPT, GPTArgs, cross_entropy
from aitrain.strategies.options import StrategyOptions
from aitrain.strategies.plan import ParallelPlan
from aitrain.strategies.pp import PipelineModule, cut_stage, split_layers, stage_ids
from aitrain.strategies.tp import check_tp_model


def test_every_builtin_strategy_is_registered() -> None:
    assert strategies.names() == ["ddp", "fsdp", "fsdp_tp", "fsdp_tp_pp", "hsdp", "pp", "tp"]


def test_registering_a_name_twice_is_an_error() -> None:
    registry.names()
    with pytest.raises(ConfigError, match="strategy 'fsdp' is already registered .*aitrain.strategies.fsdp"):
        @strategies.register("fsdp")
        def again(model, *, plan, mesh, options):  # pragma: no cover
            return model


def test_a_new_strategy_registers_and_is_found() -> None:
    @strategies.register("test_identity", summary="does nothing")
    def identity(model, *, plan, mesh, options):
        return model

    try:
        assert strategies.get("test_identity") is identity
        assert "test_identity" in strategies.names()
    finally:
        registry._REGISTRY.pop("test_identity")


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as e:
        strategies.get("nope")
    assert "unknown strategy 'nope'. Known strategies: ddp, fsdp, fsdp_tp, fsdp_tp_pp, hsdp, pp, tp." in str(e.value)
    assert "HINT:" in str(e.value)


def test_apply_checks_the_degrees_before_touching_the_model() -> None:
    plan = ParallelPlan.resolve(world_size=2, dp_replicate=1, dp_shard=1, tp=2, pp=1)
    with pytest.raises(ConfigError, match="strategy ddp needs parallel.tp=1"):
        strategies.apply(nn.Linear(2, 2), plan, strategy="ddp")


def gpt(**kw: int) -> GPT:
    with torch.device("meta"):
        return GPT(GPTArgs(**{"n_layer": 2, "n_head": 4, "d_model": 32, "seq_len": 16, **kw}))


def test_tp_check_names_the_module_whose_heads_do_not_split() -> None:
    with pytest.raises(ConfigError) as e:
        check_tp_model(gpt(n_head=2, d_model=32), 4)
    assert "cannot shard module 'layers.0.attention': its 2 heads do not split evenly over tp=4 ranks" in str(e.value)


class Conv1dBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.n_head = 4
        for w in ("wq", "wk", "wv"):
            setattr(self.attention, w, nn.Linear(8, 8))
        self.attention.wo = nn.Conv1d(8, 8, 1)


def test_tp_check_names_a_module_of_the_wrong_kind() -> None:
    model = nn.Module()
    model.layers = nn.ModuleDict({"0": Conv1dBlock()})
    with pytest.raises(ConfigError) as e:
        check_tp_model(model, 2)
    assert "cannot shard module 'layers.0.attention.wo': it is a Conv1d, not an nn.Linear" in str(e.value)
    assert "tp_plan" in str(e.value)  # the hint: bring your own plan


def test_tp_check_a_model_without_blocks() -> None:
    with pytest.raises(ConfigError, match="Sequential has no 'layers'"):
        check_tp_model(nn.Sequential(nn.Linear(2, 2)), 2)


def test_check_model_more_stages_than_layers() -> None:
    plan = ParallelPlan.resolve(world_size=4, dp_replicate=1, dp_shard=1, tp=1, pp=4)
    with pytest.raises(ConfigError, match="4 stages .* the model has 2 layer"):
        check_model(gpt(), plan, StrategyOptions())


def test_pipeline_cannot_split_a_model_without_layers() -> None:
    plan = ParallelPlan.resolve(world_size=2, dp_replicate=1, dp_shard=1, tp=1, pp=2)
    with pytest.raises(ConfigError, match="cannot split Sequential: it has no 'layers' nn.ModuleDict"):
        check_model(nn.Sequential(nn.Linear(2, 2)), plan, StrategyOptions())


def test_layers_split_into_consecutive_stages() -> None:
    keys = [str(i) for i in range(5)]
    assert split_layers(keys, 2) == [["0", "1", "2"], ["3", "4"]]
    assert split_layers(keys, 5) == [[k] for k in keys]
    one_f1b, interleaved = StrategyOptions(), StrategyOptions(pp_schedule="Interleaved1F1B")
    assert stage_ids(1, 2, one_f1b) == [1]
    assert stage_ids(1, 2, interleaved) == [1, 3]
    assert stage_ids(0, 2, StrategyOptions(pp_schedule="ZBVZeroBubble")) == [0, 3]


def test_cut_stages_run_like_the_whole_model_and_keep_its_names() -> None:
    torch.manual_seed(0)
    model = GPT(GPTArgs(n_layer=3, n_head=4, d_model=32, seq_len=16))
    x = torch.randint(0, 256, (2, 16))
    want = model(x)
    first = cut_stage(model, ["0", "1"], first=True, last=False)
    last = cut_stage(model, ["2"], first=False, last=True)
    assert first.norm is None and first.output is None and last.tok_embeddings is None
    torch.testing.assert_close(last(first(x)), want)
    pm = PipelineModule(model, [first, last])
    assert [n for n, _ in pm.named_parameters()] == [n for n, _ in model.named_parameters()]
    with pytest.raises(RuntimeError, match="forward_backward"):
        pm(x)


def test_forward_backward_accumulates_to_the_full_batch_gradient() -> None:
    torch.manual_seed(0)
    model = GPT(GPTArgs(n_layer=1, n_head=4, d_model=32, seq_len=16))
    x, y = torch.randint(0, 256, (8, 16)), torch.randint(0, 256, (8, 16))
    cross_entropy(model(x), y).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = strategies.forward_backward(model, x, y, cross_entropy, grad_accum=4)
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, cross_entropy(model(x), y).detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="train.grad_accum=3"):
        strategies.forward_backward(model, x, y, cross_entropy, grad_accum=3)


def test_clip_grad_norm_matches_torch_on_a_plain_module() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        (m(torch.ones(2, 4)) * 10).sum().backward()
    want = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5)
    got = strategies.clip_grad_norm_(b, 0.5)
    torch.testing.assert_close(got, want)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
