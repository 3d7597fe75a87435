"""Table rendering and the colour policy."""

from __future__ import annotations

import io

import pytest

from aitrain.fabric.findings import Finding, Severity
from aitrain.launcher.cli.render import Style, render_findings, render_topology, table, use_color


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("env, stream, mode, expected", [
    ({}, Tty(), "auto", True),
    ({}, io.StringIO(), "auto", False),
    ({"NO_COLOR": "1"}, Tty(), "auto", False),
    ({"FORCE_COLOR": "1"}, io.StringIO(), "auto", True),
    ({"TERM": "dumb"}, Tty(), "auto", False),
    ({}, io.StringIO(), "always", True),
    ({}, Tty(), "never", False),
])
def test_use_color(monkeypatch, env, stream, mode, expected):
    for k in ("NO_COLOR", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert use_color(stream, mode) is expected


def test_table_aligns_coloured_cells():
    style = Style(True)
    text = table(["A", "B"], [[style("x", "red"), "long value"], ["yyyy", "z"]], style)
    plain = [line.replace("\033[31m", "").replace("\033[0m", "").replace("\033[1m", "") for line in text.splitlines()]
    assert plain[1].index("long") == plain[2].index("z") == plain[0].index("B")


def test_render_findings_and_summary():
    findings = [Finding(id="rdma-port-not-active", severity=Severity.ERROR, host="n1", subject="mlx5_0/1",
                        message="down", hint="plug it"),
                Finding(id="rdma-none", severity=Severity.INFO, host="n2", subject="rdma", message="none")]
    text = render_findings(findings, 2, Style(False))
    assert "ERROR" in text and "hint: plug it" in text and \
        text.endswith("1 error(s), 0 warning(s), 1 info on 2 host(s)")
    assert "\033[31mERROR" in render_findings(findings, 2, Style(True))


def test_render_no_findings():
    assert "looks good" in render_findings([], 3, Style(False))


def test_render_topology_of_every_kind_of_host(dgx, roce, broken_dir):
    from aitrain.fabric import probe

    for topo in (dgx, roce, probe(broken_dir / "garbage-files"), probe()):
        text = render_topology(topo, Style(False))
        assert text.startswith(f"host {topo.hostname}")
    assert "probe warnings" in render_topology(probe(broken_dir / "garbage-files"), Style(False))
