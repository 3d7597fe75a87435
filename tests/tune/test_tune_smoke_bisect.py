"""Bisection over node groups with a fake runner: names the bad nodes in log-depth rounds."""

from __future__ import annotations

import itertools
import math

import pytest

from aitrain.fabric.smoke import find_bad_nodes


class FakeFabric:
    """A group passes iff it holds no bad node (and, optionally, no broken pair)."""

    def __init__(self, bad=(), broken_pairs=()):
        self.bad = set(bad)
        self.broken = {frozenset(p) for p in broken_pairs}
        self.calls: list[list[list[str]]] = []

    def __call__(self, groups):
        self.calls.append(groups)
        flat = [x for g in groups for x in g]
        assert len(flat) == len(set(flat)), f"groups of one round overlap: {groups}"
        assert all(len(g) >= 2 for g in groups), f"a single node proves nothing: {groups}"
        return [not (set(g) & self.bad) and not any(frozenset(p) in self.broken
                                                   for p in itertools.combinations(g, 2)) for g in groups]


def nodes(n):
    return [f"n{i}" for i in range(1, n + 1)]


def test_all_good_is_one_round():
    fake = FakeFabric()
    res = find_bad_nodes(nodes(8), fake)
    assert res.ok and res.bad == [] and len(res.rounds) == 1


def test_one_bad_of_four_named_in_three_rounds():
    fake = FakeFabric(bad={"n3"})
    res = find_bad_nodes(nodes(4), fake)
    assert res.bad == ["n3"] and res.suspects == [] and res.good == ["n1", "n2", "n4"]
    assert len(res.rounds) == 3
    assert "n3" in res.describe()


@pytest.mark.parametrize("n", [3, 4, 5, 8, 16, 33, 64, 100])
def test_one_bad_node_takes_log_rounds(n):
    for bad in (nodes(n)[0], nodes(n)[-1], nodes(n)[n // 2]):
        fake = FakeFabric(bad={bad})
        res = find_bad_nodes(nodes(n), fake, initial_passed=False)
        assert res.bad == [bad] and not res.suspects
        assert len(res.rounds) <= math.ceil(math.log2(n)) + 1
        assert res.group_tests <= 2 * math.ceil(math.log2(n))  # not n(n-1)/2 pairs


def test_several_bad_nodes():
    fake = FakeFabric(bad={"n2", "n7", "n8"})
    res = find_bad_nodes(nodes(10), fake)
    assert res.bad == ["n2", "n7", "n8"] and not res.suspects


def test_two_nodes_cannot_be_told_apart():
    res = find_bad_nodes(nodes(2), FakeFabric(bad={"n2"}), initial_passed=False)
    assert res.bad == [] and res.suspects == ["n1", "n2"] and not res.ok


def test_three_nodes_with_one_bad():
    res = find_bad_nodes(nodes(3), FakeFabric(bad={"n1"}), initial_passed=False)
    assert res.bad == ["n1"]


def test_a_broken_pair_is_reported_not_guessed():
    res = find_bad_nodes(nodes(4), FakeFabric(broken_pairs=[("n1", "n2")]), initial_passed=False)
    assert not res.ok and res.bad == [] and res.flaky
    assert res.unexplained == [["n1", "n2"]]
    assert "n1, n2" in res.describe()


def test_initial_result_is_not_rerun():
    fake = FakeFabric(bad={"n4"})
    res = find_bad_nodes(nodes(4), fake, initial_passed=False)
    assert ["n1", "n2", "n3", "n4"] not in [g for call in fake.calls for g in call]
    assert res.bad == ["n4"]


def test_runner_must_answer_every_group():
    with pytest.raises(ValueError):
        find_bad_nodes(nodes(4), lambda groups: [False], initial_passed=False)


# --------------------------------------------------------------------------- the launch gate


def _gate(bad=(), suspects=(), ok=False, exclude=False, min_nodes=1, precheck=None, flaky=False):
    from aitrain.fabric.smoke import BisectResult
    from aitrain.launcher.nodes import Node, NodesRun, SmokeReport, decide_after_smoke

    nodes = [Node(name=n) for n in nodes_list]
    report = SmokeReport(nodes=list(nodes_list), precheck=dict(precheck or {}))
    rest = [n for n in nodes_list if n not in report.precheck]
    report.full = NodesRun(nodes=rest, ok=ok or (not bad and not suspects and not flaky))
    if not report.full.ok:
        report.bisect = BisectResult(nodes=rest, bad=list(bad), suspects=list(suspects), flaky=flaky)
    return decide_after_smoke(nodes, report, exclude_bad_nodes=exclude, min_nodes=min_nodes)


nodes_list = ["n1", "n2", "n3", "n4"]


def test_gate_passes_every_node_when_the_smoke_passes():
    out = _gate(ok=True)
    assert [n.name for n in out.nodes] == nodes_list and not out.excluded


def test_gate_names_the_bad_node_and_stops():
    from aitrain.errors import FabricError

    with pytest.raises(FabricError, match="n3") as e:
        _gate(bad=["n3"])
    assert "exclude_bad_nodes" in str(e.value)


def test_gate_excludes_proven_bad_nodes_when_asked():
    out = _gate(bad=["n3"], exclude=True)
    assert [n.name for n in out.nodes] == ["n1", "n2", "n4"] and out.excluded == ["n3"]


def test_gate_excludes_a_node_whose_interface_is_down():
    out = _gate(precheck={"n2": "interface fab0 is down on n2"}, exclude=True)
    assert out.excluded == ["n2"] and "fab0 is down" in out.message


def test_gate_never_excludes_on_a_guess():
    from aitrain.errors import FabricError

    with pytest.raises(FabricError, match="could not tell apart"):
        _gate(suspects=["n1", "n2"], exclude=True)
    with pytest.raises(FabricError, match="needs 4"):
        _gate(bad=["n3"], exclude=True, min_nodes=4)
    with pytest.raises(FabricError, match="each passed with others"):
        _gate(flaky=True, exclude=True)
