"""Slurm's variables and host lists as Slurm defines them (issue #16 item 8).

``expand_nodelist`` is compared with ``scontrol show hostnames`` itself on a few hundred
generated lists and on the corner cases of Slurm's hostlist.c. scontrol needs a slurm.conf
for this, not a running slurmctld: a three-line one in a temporary directory does. The
allocation checks run the real ``aitrain launch backend=slurm dry_run=true`` with the
variables a batch script sees.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from aitrain.errors import ConfigError
from aitrain.launcher.environment import MAX_SLURM_NODES, SlurmEnvironment, expand_nodelist

from aitrain_testing import run_aitrain

SLURM_CONF = """\
ClusterName=hostlists
SlurmctldHost=localhost
NodeName=localhost CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES
"""


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment in which `scontrol show hostnames` works here (skip where it does not)."""
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not installed (Debian: slurm-client)")
    conf = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    conf.write_text(SLURM_CONF)
    env = dict(os.environ, SLURM_CONF=str(conf))
    r = subprocess.run(["scontrol", "show", "hostnames", "n[1-2]"], env=env, capture_output=True, text=True)
    if r.stdout.split() != ["n1", "n2"]:
        pytest.skip(f"scontrol show hostnames does not work here: {r.stderr.strip()[:200]}")
    return env


def slurm_hostnames(nodelist: str, env: dict[str, str]) -> list[str] | None:
    """What Slurm makes of a list; None where it refuses it."""
    r = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=env, capture_output=True, text=True)
    if r.returncode != 0 or "Invalid hostlist" in r.stderr:
        return None
    return r.stdout.splitlines()


def ours(nodelist: str) -> list[str] | None:
    try:
        return expand_nodelist(nodelist)
    except ConfigError:
        return None


def _range_list(rng: random.Random) -> str:
    items = []
    for _ in range(rng.randint(1, 3)):
        width = rng.choice([0, 0, 2, 3])
        lo = rng.randint(0, 99)
        hi = lo + rng.randint(0, 12)
        lo_s = str(lo).zfill(width)
        hi_s = str(hi).zfill(width) if rng.random() < 0.7 else str(hi)
        items.append(lo_s if rng.random() < 0.3 else f"{lo_s}-{hi_s}")
    return ",".join(items)


def _token(rng: random.Random) -> str:
    prefix = rng.choice(["n", "gpu", "node-", "dgx-a100-", "rack", "c", "x.y-", "login"])
    groups = rng.choice([0, 1, 1, 1, 2, 2, 3])
    if not groups:
        return prefix + (str(rng.randint(0, 120)).zfill(rng.choice([0, 2, 3])) if rng.random() < 0.8 else "")
    parts = [f"[{_range_list(rng)}]" for _ in range(groups)]
    return prefix + "".join(p + rng.choice(["-node", "n", "-", "_s"]) for p in parts[:-1]) + parts[-1]


def generated_lists(count: int, seed: int = 16) -> list[str]:
    """Host lists of 1-4 names or bracket expressions (1-3 groups, zero padding, several
    ranges a group) between the separators Slurm 22.05 and later agree on."""
    rng = random.Random(seed)
    seps = [",", " ", "\t", ", ", ",,", " ,\t"]
    return [rng.choice(seps).join(_token(rng) for _ in range(rng.randint(1, 4))) for _ in range(count)]


# Corner cases of hostlist.c, each read the same by aitrain and by scontrol (None: refused).
CORNERS = [
    "n1 n2", "alpha, host[5-6]", "n[1-2]\tm3", "  n1 ,, n2  ", "rack[1-2]-node[01-02]",
    "a[1-2]b[3-4]c[5-6]",  # three groups: Slurm's order is not left-to-right
    "gpu[098-101]", "n[8-10]", "n[08-10]", "n[01-3]", "n[1-003]", "n[007]", "n[1-]",
    "n[1, 2]", "n[ 1-2]", "n[+1-2]", "n[1a-3]",  # strtoul's leniency, and widths as typed
    "n[1-65536]", "n[1-65537]", "n[1-1000000]",  # MAX_RANGE
    "n[]", "n[1,]", "n[3-1]", "n[a]", "n[1--2]", "n[1x-3]", "n[-1]", "n[[1]]",
    "n[18446744073709551615]", "n[99999999999999999999999]",
]


@pytest.mark.parametrize("nodelist", CORNERS)
def test_corner_cases_read_as_scontrol_reads_them(nodelist: str, scontrol: dict[str, str]) -> None:
    assert ours(nodelist) == slurm_hostnames(nodelist, scontrol)


def test_generated_lists_match_scontrol(scontrol: dict[str, str]) -> None:
    lists = generated_lists(200)
    mismatches = [(nl, slurm_hostnames(nl, scontrol), ours(nl)) for nl in lists
                  if ours(nl) != slurm_hostnames(nl, scontrol)]
    assert not mismatches, mismatches[:5]
    assert sum(len(ours(nl) or []) for nl in lists) > 1000  # the lists are not trivial


def test_separators_never_end_up_in_names() -> None:
    assert expand_nodelist("n1 n2") == ["n1", "n2"]
    assert expand_nodelist("alpha, host[5-6]") == ["alpha", "host5", "host6"]
    assert expand_nodelist("a\tb\nc[1-2]\n") == ["a", "b", "c1", "c2"]  # newline: a separator since Slurm 23.02
    assert expand_nodelist(" , \t") == []


def test_slurm_23_11_suffix_after_the_last_group() -> None:
    # Slurm 22.05 refuses these; 23.11 and later read them (and may print them).
    assert expand_nodelist("n[1-2].ib,x[01-02]-bmc") == ["n1.ib", "n2.ib", "x01-bmc", "x02-bmc"]


@pytest.mark.parametrize("bad", ["n[1-2", "n1]", "a]b[1]", "a[x]b[1-2]c[3]"])
def test_stricter_than_slurm_where_slurm_makes_up_names(bad: str) -> None:
    # Slurm 22.05 gives 'n]', 'n1]', 'a]b1' and nothing at all (no error) for these.
    with pytest.raises(ConfigError, match="Slurm node list"):
        expand_nodelist(bad)


def test_more_hosts_than_slurm_allows_are_refused_without_expanding() -> None:
    t0 = time.monotonic()
    for nodelist in ("n[1-1000000]", "n[1-60000],m[1-60000]", "a[1-65536]-b[1-65536]",
                     "x[0-9999999999]", ",".join(f"n{i}" for i in range(MAX_SLURM_NODES + 1))):
        with pytest.raises(ConfigError, match="65536") as e:
            expand_nodelist(nodelist)
        assert e.value.hint and "scontrol show hostnames" in e.value.hint
    assert time.monotonic() - t0 < 2  # counted, not expanded (a million names take far longer)
    assert len(expand_nodelist("n[1-65536]")) == MAX_SLURM_NODES


def test_a_huge_nodelist_is_one_error_line_from_the_cli(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "backend=slurm", "dry_run=true"], tmp_path,
                    {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-1000000]", "SLURMD_NODENAME": "n1"}, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("aitrain: error: Slurm node list 'n[1-1000000]': the range '1-1000000' has "
                               "1000000 hosts"), r.stderr
    assert "Traceback" not in r.stderr


# -- ranks ----------------------------------------------------------------------------------------

BATCH = {"SLURM_JOB_ID": "3", "SLURM_JOB_NODELIST": "node[1-2]", "SLURMD_NODENAME": "node1",
         "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)"}


def test_ranks_are_read_whenever_they_are_set() -> None:
    # The batch script is task 0 of Slurm's batch step: PROCID/LOCALID/NODEID without a step id.
    s = SlurmEnvironment.from_env({**BATCH, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    assert (s.proc_id, s.local_id, s.node_rank, s.step_id, s.in_step) == (0, 0, 0, None, False)
    with pytest.raises(ConfigError, match="batch script or salloc shell"):
        s.torch_env()  # one process, not rank 0 of 4
    task = {**BATCH, "SLURMD_NODENAME": "node2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}
    s = SlurmEnvironment.from_env(task)
    assert (s.proc_id, s.local_id, s.node_rank) == (3, 1, 1)
    for step_var in ("SLURM_STEP_ID", "SLURM_STEPID"):  # the old name alone counts too
        s = SlurmEnvironment.from_env({**task, step_var: "0"})
        assert s.in_step and s.torch_env() == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                                               "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}


def test_inconsistent_rank_variables_are_refused_with_the_numbers() -> None:
    with pytest.raises(ConfigError, match="SLURM_PROCID=7 but the step has 4 tasks"):
        SlurmEnvironment.from_env({**BATCH, "SLURM_STEP_ID": "0", "SLURM_PROCID": "7",
                                   "SLURM_LOCALID": "1"}).torch_env()
    with pytest.raises(ConfigError, match="SLURM_NODEID=2 but the node list 'node\\[1-2\\]' has 2 nodes"):
        SlurmEnvironment.from_env({**BATCH, "SLURM_NODEID": "2"})


# -- the job against the allocation it runs in ----------------------------------------------------

ALLOCATION = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2",
              "SLURMD_NODENAME": "n1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
              "SLURM_TASKS_PER_NODE": "1(x2)"}


def launch_inside(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_aitrain(["launch", "backend=slurm", "dry_run=true", *args], tmp_path, {**ALLOCATION, **env},
                       timeout=120)


def test_nnodes_that_disagree_with_the_allocation_stop_with_both_numbers(tmp_path: Path) -> None:
    r = launch_inside(tmp_path, "nnodes=1")
    assert r.returncode == 2, r.stdout + r.stderr
    first, hint = r.stderr.strip().splitlines()[-2:]
    assert first == "aitrain: error: nnodes=1 but Slurm allocation 77 has 2 node(s) (n1, n2)"
    assert "nnodes=2" in hint and "salloc -N 1" in hint and "sbatch -N 1" in hint
    r = launch_inside(tmp_path, "nnodes=3", "train.global_batch_size=12")
    assert r.returncode == 2 and "nnodes=3 but Slurm allocation 77 has 2 node(s)" in r.stderr, r.stderr


def test_the_whole_allocation_when_nnodes_is_left_out_or_matches(tmp_path: Path) -> None:
    # The sbatch wrapper (`sbatch -N 2 slurm/aitrain.sbatch ...`) leaves nnodes out.
    for args in ((), ("nnodes=2",)):
        r = launch_inside(tmp_path, *args)
        assert r.returncode == 0, r.stderr
        assert "node n1 (node_rank 0)" in r.stdout and "node n2 (node_rank 1)" in r.stdout


def test_a_job_without_nnodes_is_planned_over_the_whole_allocation(tmp_path: Path) -> None:
    # 2 nodes x 2 ranks: FSDP over 4 shards fits the allocation (planned as 1 node it would not).
    r = launch_inside(tmp_path, "+strategy=fsdp", "parallel.dp_shard=4", "nproc_per_node=2")
    assert r.returncode == 0, r.stderr
    assert "WORLD_SIZE" not in r.stderr and "node n2 (node_rank 1): rendezvous" in r.stdout
    run_dir = next(ln.split("run_dir: ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("run_dir: "))
    assert not Path(run_dir).exists()  # a dry run writes nothing


def test_more_ranks_than_the_allocation_has_gpus_per_node(tmp_path: Path) -> None:
    r = launch_inside(tmp_path, "nnodes=2", "nproc_per_node=4", SLURM_GPUS_ON_NODE="2")
    assert r.returncode == 2, r.stderr
    assert ("aitrain: error: nproc_per_node=4 but Slurm allocation 77 gives each node 2 GPU(s) "
            "(SLURM_GPUS_ON_NODE=2): ranks would share GPUs") in r.stderr
    assert "nproc_per_node=2" in r.stderr and "--gpus-per-node=4" in r.stderr
    for ok in (("nproc_per_node=2",), ("nproc_per_node=4", "device=cpu")):
        r = launch_inside(tmp_path, "nnodes=2", *ok, SLURM_GPUS_ON_NODE="2")
        assert r.returncode == 0, r.stderr
