"""Slurm variables -> node/rank facts, against real variable sets and nodelist forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from aitrain.errors import ConfigError
from aitrain.launcher.environment import SlurmEnvironment, detect, expand_nodelist, expand_tasks_per_node

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"


def load_env(name: str) -> dict[str, str]:
    out = {}
    for line in (FIXTURES / name).read_text().splitlines():
        k, _, v = line.partition("=")
        out[k] = v
    return out


@pytest.mark.parametrize(
    "nodelist,expected",
    [
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("node[1-2]", ["node1", "node2"]),
        ("node1", ["node1"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
        ("dgx-a100-[001-002],login", ["dgx-a100-001", "dgx-a100-002", "login"]),
        ("x[7]", ["x7"]),
    ],
)
def test_expand_nodelist(nodelist: str, expected: list[str]) -> None:
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize("bad", ["gpu[01-04", "gpu01]", "gpu[4-1]", "gpu[a-b]"])
def test_malformed_nodelist_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="node list"):
        expand_nodelist(bad)


def test_tasks_per_node() -> None:
    assert expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert expand_tasks_per_node("2(x2)") == [2, 2]
    assert expand_tasks_per_node("1") == [1]


def test_real_batch_script_variables() -> None:
    s = SlurmEnvironment.from_env(load_env("real-22.05-batch.env"))
    assert s.job_id == "3" and s.nodes == ("node1", "node2") and s.nnodes == 2
    assert s.node_name == "node1" and s.node_rank == 0 and s.cluster == "aits"
    assert not s.in_step  # the batch shell is not a job step
    with pytest.raises(ConfigError, match="job step"):
        s.torch_env()


def test_real_step_task_variables() -> None:
    s = SlurmEnvironment.from_env(load_env("real-22.05-step-task3.env"))
    assert s.node_name == "node2" and s.node_rank == 1 and s.in_step
    assert s.torch_env() == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                             "GROUP_RANK": "1"}


# Typical sets from a larger cluster (values as Slurm 22.05-23.11 print them).
TABLE = [
    (dict(SLURM_JOB_ID="812", SLURM_JOB_NODELIST="gpu[01-04,07]", SLURMD_NODENAME="gpu07", SLURM_NODEID="4",
          SLURM_PROCID="36", SLURM_LOCALID="4", SLURM_NTASKS="40", SLURM_STEP_ID="0",
          SLURM_TASKS_PER_NODE="8(x5)", SLURM_GPUS_ON_NODE="8", SLURM_RESTART_COUNT="2"),
     dict(node_rank=4, nnodes=5, rank="36", local_rank="4", world="40", local_world="8", restarts=2)),
    (dict(SLURM_JOB_ID="9", SLURM_JOB_NODELIST="gpu[01-04,07]", SLURMD_NODENAME="gpu03", SLURM_NODEID="2",
          SLURM_PROCID="2", SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="5", SLURM_STEP_ID="1",
          SLURM_STEP_TASKS_PER_NODE="1(x5)", SLURM_NTASKS="40"),
     dict(node_rank=2, nnodes=5, rank="2", local_rank="0", world="5", local_world="1", restarts=0)),
]


@pytest.mark.parametrize("env,expected", TABLE)
def test_rank_mapping_table(env: dict[str, str], expected: dict) -> None:
    s = SlurmEnvironment.from_env(env)
    assert s.node_rank == expected["node_rank"] and s.nnodes == expected["nnodes"]
    assert s.restart_count == expected["restarts"]
    t = s.torch_env()
    assert (t["RANK"], t["LOCAL_RANK"], t["WORLD_SIZE"], t["LOCAL_WORLD_SIZE"]) == (
        expected["rank"], expected["local_rank"], expected["world"], expected["local_world"])


def test_node_rank_from_name_when_nodeid_missing() -> None:
    s = SlurmEnvironment.from_env({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[1-3]", "SLURMD_NODENAME": "n3"})
    assert s.node_rank == 2


def test_detection_order() -> None:
    assert detect({}).kind == "plain"
    assert detect({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"}).kind == "slurm"
    assert detect({"SLURM_JOB_ID": "1", "TORCHELASTIC_RUN_ID": "x", "RANK": "0"}).kind == "torchrun"
    assert detect({"RAY_NODE_ID": "abc"}).kind == "ray"
