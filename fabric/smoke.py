"""Finding the bad node(s) after a failed smoke collective, by bisection.

A *group test* runs the smoke all_reduce over a set of nodes; it passes when every
node in it can talk to every other (the model: a node is good or bad, a group passes
iff all its members are good). One node alone proves nothing about the network, so a
single suspect is tested together with a node already known good.

Every round tests disjoint groups *at the same time* (the runner starts them
concurrently), halving each failed group: one bad node among N is named in
1 + log2(N) rounds, not N(N-1)/2 pair tests. The search is pure: the runner is a
function ``run_groups(groups) -> [passed, ...]``, so it is tested with a fake, and
the launcher supplies one that starts real processes.

    result = find_bad_nodes(["n1", "n2", "n3", "n4"], run_groups, initial_passed=False)
    result.bad  -> ["n3"]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

GroupRunner = Callable[[list[list[str]]], list[bool]]


@dataclass
class SmokeRound:
    groups: list[list[str]]
    passed: list[bool]


@dataclass
class BisectResult:
    nodes: list[str]
    bad: list[str] = field(default_factory=list)
    """Nodes proven bad: they fail together with nodes proven good."""
    suspects: list[str] = field(default_factory=list)
    """Nodes that could not be separated (no good partner to test them with)."""
    good: list[str] = field(default_factory=list)
    rounds: list[SmokeRound] = field(default_factory=list)
    flaky: bool = False
    """A group failed although each of its nodes passed with others: an intermittent
    fault, or a fault between those nodes only (see ``unexplained``)."""
    unexplained: list[list[str]] = field(default_factory=list)
    """The smallest such groups."""

    @property
    def ok(self) -> bool:
        return not self.bad and not self.suspects and not self.flaky

    @property
    def group_tests(self) -> int:
        return sum(len(r.groups) for r in self.rounds)

    def describe(self) -> str:
        if self.ok:
            return f"smoke all_reduce passed on all {len(self.nodes)} node(s)"
        parts = []
        if self.bad:
            parts.append(f"bad node(s): {', '.join(self.bad)}")
        if self.suspects:
            parts.append(f"could not tell apart: {', '.join(self.suspects)}")
        if self.flaky:
            groups = "; ".join(", ".join(g) for g in self.unexplained)
            parts.append(f"failed together although each passed with others: {groups} "
                         f"(a fault between them, or intermittent)")
        return (f"smoke all_reduce failed; {'; '.join(parts)} "
                f"({len(self.rounds)} round(s), {self.group_tests} group test(s))")

    def to_dict(self) -> dict[str, object]:
        return {"nodes": self.nodes, "bad": self.bad, "suspects": self.suspects, "good": self.good,
                "flaky": self.flaky, "unexplained": self.unexplained,
                "rounds": [{"groups": r.groups, "passed": r.passed} for r in self.rounds]}


def _halves(group: list[str]) -> list[list[str]]:
    mid = (len(group) + 1) // 2
    return [group[:mid], group[mid:]]


def find_bad_nodes(
    nodes: Sequence[str],
    run_groups: GroupRunner,
    *,
    initial_passed: bool | None = None,
    max_rounds: int = 64,
) -> BisectResult:
    """Classify ``nodes`` good/bad with as few rounds of concurrent group tests as it can.

    ``initial_passed``: the result of the smoke over all nodes when the caller already
    ran it (the pre-launch smoke); None runs it as round one.
    """
    order = list(dict.fromkeys(nodes))
    result = BisectResult(nodes=order)
    good: set[str] = set()
    bad: set[str] = set()
    known: dict[frozenset[str], bool] = {}

    def run(groups: list[list[str]]) -> list[bool]:
        """One round for the groups not tested before; known answers are reused."""
        new = [g for g in groups if frozenset(g) not in known]
        if new:
            passed = [bool(p) for p in run_groups([list(g) for g in new])]
            if len(passed) != len(new):
                raise ValueError(f"runner answered {len(passed)} results for {len(new)} groups")
            result.rounds.append(SmokeRound(groups=[list(g) for g in new], passed=passed))
            known.update(zip((frozenset(g) for g in new), passed, strict=True))
        return [known[frozenset(g)] for g in groups]

    if len(order) < 2:
        result.good = order
        return result
    if initial_passed is None:
        initial_passed = run([order])[0]
    else:
        known[frozenset(order)] = bool(initial_passed)
    if initial_passed:
        result.good = order
        return result

    failing: list[list[str]] = [order]  # undetermined members of failed tests
    pending: list[str] = []  # single suspects waiting for a good partner
    while (failing or pending) and len(result.rounds) < max_rounds:
        tests: list[tuple[list[str], list[str]]] = []  # (group run, its undetermined members)
        for group in failing:
            members = [x for x in group if x not in good and x not in bad]
            if not members:
                result.flaky = True  # it failed, yet everyone in it passed elsewhere
            elif len(members) == 1:
                bad.add(members[0])  # failed with nodes that are all good
            else:
                for half in _halves(members):
                    if len(half) >= 2:
                        tests.append((half, half))
                    else:
                        pending.append(half[0])
        failing = []
        partners = [x for x in order if x in good]
        waiting = []
        for x in dict.fromkeys(pending):
            if x in good or x in bad:
                continue
            if partners:  # the good node first: it hosts the rendezvous, which must work
                tests.append(([partners.pop(0), x], [x]))
            else:
                waiting.append(x)
        pending = waiting
        if not tests:
            # No good node known yet: pair the waiting suspects with each other.
            pairs = [pending[i:i + 2] for i in range(0, len(pending) - 1, 2)]
            pairs = [p for p in pairs if frozenset(p) not in known]
            if not pairs:
                break
            tests = [(p, p) for p in pairs]
            pending = [x for x in pending if not any(x in p for p in pairs)]
        passed = run([g for g, _ in tests])
        for (group, members), ok in zip(tests, passed, strict=True):
            if ok:
                good.update(group)
            else:
                failing.append(members)
    for group in failing:  # rounds ran out: what is left is undetermined
        pending.extend(group)
    failed_good = [sorted(g, key=order.index) for g, ok in known.items() if not ok and g <= good]
    smallest = min((len(g) for g in failed_good), default=0)
    result.unexplained = [g for g in failed_good if len(g) == smallest]
    result.flaky = result.flaky or bool(failed_good)
    result.good = [x for x in order if x in good]
    result.bad = [x for x in order if x in bad]
    result.suspects = [x for x in order if x not in good and x not in bad]
    return result
