"""CPU sets for local ranks: disjoint, NUMA-aligned when GPU NUMA nodes are known."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aitrain.errors import FabricError
from aitrain.fabric.host import (
    cpu_sets_for_ranks,
    format_cpulist,
    parse_cpulist,
    read_cpu_topology,
    read_numa_nodes,
    read_online_cpus,
)

# two sockets, 4 cores each, 2 threads per core: node0 = cores 0-3 (+ siblings 8-11)
NODES = {0: [0, 1, 2, 3, 8, 9, 10, 11], 1: [4, 5, 6, 7, 12, 13, 14, 15]}
CPUS = list(range(16))
SIBLINGS = {c: sorted({c % 8, c % 8 + 8}) for c in CPUS}


def test_cpulist_round_trip() -> None:
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert format_cpulist([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert parse_cpulist("") == [] and format_cpulist([]) == ""
    with pytest.raises(FabricError, match="cannot parse CPU list"):
        parse_cpulist("0-a")


@given(st.sets(st.integers(0, 300)))
def test_cpulist_format_parse_property(cpus: set[int]) -> None:
    assert parse_cpulist(format_cpulist(sorted(cpus))) == sorted(cpus)


def test_ranks_follow_their_gpu_numa_node() -> None:
    sets = cpu_sets_for_ranks(4, CPUS, NODES, gpu_numa=[0, 0, 1, 1], thread_siblings=SIBLINGS)
    assert sets == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    # GPUs listed out of order: rank 0's GPU sits on node 1
    sets = cpu_sets_for_ranks(2, CPUS, NODES, gpu_numa=[1, 0])
    assert set(sets[0]) <= set(NODES[1]) and set(sets[1]) <= set(NODES[0])


def test_all_gpus_on_one_node_share_that_node() -> None:
    sets = cpu_sets_for_ranks(2, CPUS, NODES, gpu_numa=[1, 1], thread_siblings=SIBLINGS)
    assert sets == [[4, 5, 12, 13], [6, 7, 14, 15]]


def test_unknown_gpu_numa_spreads_ranks_over_nodes_in_blocks() -> None:
    for gpu_numa in (None, [0, None, 1, 1], [-1, -1, -1, -1]):
        sets = cpu_sets_for_ranks(4, CPUS, NODES, gpu_numa=gpu_numa)
        assert set(sets[0]) | set(sets[1]) <= set(NODES[0])
        assert set(sets[2]) | set(sets[3]) <= set(NODES[1])


def test_siblings_stay_on_one_rank() -> None:
    sets = cpu_sets_for_ranks(2, NODES[0], mode="core", thread_siblings=SIBLINGS)
    assert sets == [[0, 1, 8, 9], [2, 3, 10, 11]]
    # more ranks than cores: threads are split after all
    assert len(cpu_sets_for_ranks(8, NODES[0], mode="core", thread_siblings=SIBLINGS)) == 8


def test_core_mode_and_single_node_are_an_even_split() -> None:
    assert cpu_sets_for_ranks(3, list(range(8)), mode="core") == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert cpu_sets_for_ranks(2, [0, 1, 2, 3], {0: [0, 1, 2, 3]}, [0, 0]) == [[0, 1], [2, 3]]


def test_none_mode_gives_every_rank_every_cpu() -> None:
    sets = cpu_sets_for_ranks(3, [3, 1, 2], mode="none")
    assert sets == [[1, 2, 3]] * 3 and sets[0] is not sets[1]


def test_crowded_node_falls_back_to_blocks() -> None:
    nodes = {0: [0, 1], 1: [2, 3, 4, 5]}
    sets = cpu_sets_for_ranks(3, range(6), nodes, gpu_numa=[0, 0, 0])
    assert sets == [[0, 1], [2, 3], [4, 5]]  # 3 ranks do not fit node 0's two CPUs


def test_impossible_requests_teach() -> None:
    with pytest.raises(FabricError, match="disjoint CPU sets: only 2 CPUs") as e:
        cpu_sets_for_ranks(3, [0, 1])
    assert "mode 'none'" in str(e.value)
    with pytest.raises(FabricError, match="unknown CPU binding mode 'socket'"):
        cpu_sets_for_ranks(1, [0], mode="socket")  # type: ignore[arg-type]
    with pytest.raises(FabricError, match="at least one"):
        cpu_sets_for_ranks(0, [0])


@settings(max_examples=150, deadline=None)
@given(
    ncpus=st.integers(1, 64),
    nnodes=st.integers(1, 4),
    data=st.data(),
)
def test_binding_properties(ncpus: int, nnodes: int, data: st.DataObject) -> None:
    cpus = list(range(ncpus))
    nodes = {n: cpus[n::nnodes] for n in range(nnodes) if cpus[n::nnodes]}
    nranks = data.draw(st.integers(1, ncpus))
    gpu_numa = data.draw(st.none() | st.lists(st.sampled_from([None, *nodes]), min_size=nranks,
                                              max_size=nranks))
    mode = data.draw(st.sampled_from(["numa", "core"]))
    sets = cpu_sets_for_ranks(nranks, cpus, nodes, gpu_numa, mode)  # type: ignore[arg-type]
    assert len(sets) == nranks
    assert all(sets), "every rank gets at least one CPU"
    flat = [c for s in sets for c in s]
    assert len(flat) == len(set(flat)), "sets are disjoint"
    assert set(flat) <= set(cpus)
    if mode == "numa" and len(nodes) > 1:
        node_of = {c: n for n, cs in nodes.items() for c in cs}
        assert all(len({node_of[c] for c in s}) == 1 for s in sets), "each set inside one node"
    if mode == "core":
        assert max(map(len, sets)) - min(map(len, sets)) <= 1


def test_topology_readers(make_host, tmp_path: Path) -> None:
    paths = make_host(**{"sys/devices/system/node/node2/cpulist": "\n"})  # a memory-only node
    assert read_online_cpus(paths.sys) == list(range(8))
    assert read_numa_nodes(paths.sys) == {0: [0, 1, 4, 5], 1: [2, 3, 6, 7]}
    topo = read_cpu_topology(paths.sys)
    assert topo.thread_siblings[4] == [0, 4]
    assert cpu_sets_for_ranks(2, topo.online, topo.numa_nodes, [0, 1],
                              thread_siblings=topo.thread_siblings) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert read_online_cpus(tmp_path) == [] and read_numa_nodes(tmp_path) == {}


def test_live_machine_has_online_cpus() -> None:
    assert read_online_cpus() != []
