"""Config composition and validation: typos fail early and name the valid keys."""

from __future__ import annotations

import pytest

from aitrain.errors import ConfigError
from aitrain.launcher.cli.launch import normalize_overrides
from aitrain.launcher.config import (
    JobConfig,
    check_key,
    job_config_from_dict,
    schema_keys,
    validate_overrides,
)
from aitrain.strategies.plan import ParallelPlan


def test_free_form_keys_need_no_plus() -> None:
    assert normalize_overrides(["fabric.env.NCCL_DEBUG=WARN", "+fabric.env.A=1", "fabric.envx=1"]) == [
        "++fabric.env.NCCL_DEBUG=WARN", "+fabric.env.A=1", "fabric.envx=1"]


def test_plus_group_is_rewritten_for_default_groups() -> None:
    assert normalize_overrides(["+strategy=fsdp", "+backend=local", "+foo=1", "train.lr=1"]) == [
        "strategy=fsdp", "backend=local", "+foo=1", "train.lr=1"]


@pytest.mark.parametrize("key", ["nnodes", "nproc_per_node", "train.lr", "model.d_model",
                                 "fabric.env.NCCL_DEBUG", "backend.max_restarts", "hydra.run.dir",
                                 "tracking.uri", "parallel.dp_shard"])
def test_known_keys_pass(key: str) -> None:
    check_key(key)


def test_typo_names_the_key_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as e:
        check_key("train.lrr")
    msg = str(e.value)
    assert "train.lrr" in msg and "did you mean 'train.lr'" in msg
    assert "global_batch_size" in msg and "steps" in msg


def test_top_level_typo() -> None:
    with pytest.raises(ConfigError, match="nproc_per_nod.*Valid keys there:.*nproc_per_node"):
        check_key("nproc_per_nod")


def test_descending_into_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="is a value, not a group"):
        check_key("train.lr.x")


def test_backend_keys_depend_on_the_chosen_backend() -> None:
    with pytest.raises(ConfigError, match="backend.partition"):
        check_key("backend.partition", backend="local")


def test_validate_overrides_skips_group_choices_and_flags_typos() -> None:
    validate_overrides(["strategy=ddp", "backend=local", "train.steps=3"])
    with pytest.raises(ConfigError, match="model.d_modl"):
        validate_overrides(["model.d_modl=3"])


def test_schema_keys_are_dotted_leaves() -> None:
    keys = schema_keys(JobConfig)
    assert "train.lr" in keys and "nnodes" in keys and "model.n_layer" in keys


def test_job_config_round_trip_from_dict() -> None:
    cfg = job_config_from_dict({"nproc_per_node": 3, "train": {"lr": 0.5}, "backend": {"name": "local"}})
    assert cfg.nproc_per_node == 3 and cfg.train.lr == 0.5 and cfg.backend.name == "local"


def test_job_config_from_dict_rejects_wrong_types() -> None:
    with pytest.raises(Exception, match="steps"):
        job_config_from_dict({"train": {"steps": "many"}})


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(world_size=4), (1, 4, 1, 1)),
        (dict(world_size=4, dp_replicate=-1, dp_shard=1), (4, 1, 1, 1)),
        (dict(world_size=8, dp_replicate=2, tp=2), (2, 2, 2, 1)),
        (dict(world_size=8, dp_shard=2, tp=2, pp=2), (1, 2, 2, 2)),
    ],
)
def test_parallel_plan_resolves_the_rest(kwargs: dict, expected: tuple) -> None:
    p = ParallelPlan.resolve(**kwargs)
    assert (p.dp_replicate, p.dp_shard, p.tp, p.pp) == expected
    assert p.world_size == kwargs["world_size"]


def test_parallel_plan_wrong_product_gives_numbers_and_hint() -> None:
    with pytest.raises(ConfigError) as e:
        ParallelPlan.resolve(world_size=4, dp_shard=3, tp=1)
    assert "multiply to 3" in str(e.value) and "world size is 4" in str(e.value) and "HINT" in str(e.value)


def test_parallel_plan_indivisible_rest() -> None:
    with pytest.raises(ConfigError, match="not divisible"):
        ParallelPlan.resolve(world_size=6, tp=4)


def test_parallel_plan_two_free_degrees() -> None:
    with pytest.raises(ConfigError, match="more than one"):
        ParallelPlan.resolve(world_size=4, dp_shard=-1, tp=-1)
