"""nccl-tests' bandwidth formulas, size sweeps, result tables and plots (no ranks)."""

from __future__ import annotations

import json
import sys

import pytest

from aitrain.errors import FabricError
from aitrain.fabric.bench import (
    COLLECTIVES,
    BenchResult,
    BenchRow,
    algbw_gbps,
    busbw_factor,
    busbw_gbps,
    default_iters,
    element_count,
    fmt_size,
    parse_size,
    plot_busbw,
    render_table,
    size_sweep,
)


@pytest.mark.parametrize("coll,n,factor", [
    ("all_reduce", 2, 1.0), ("all_reduce", 8, 1.75), ("all_reduce", 1, 0.0),
    ("all_gather", 4, 0.75), ("reduce_scatter", 8, 0.875), ("all_to_all", 2, 0.5),
    ("broadcast", 16, 1.0), ("sendrecv", 2, 1.0),
])
def test_busbw_factors_match_nccl_tests(coll, n, factor):
    assert busbw_factor(coll, n) == pytest.approx(factor)


def test_bandwidths():
    assert algbw_gbps(64 << 20, 0.1) == pytest.approx(0.6710886)
    assert busbw_gbps("all_reduce", 1_000_000_000, 1.0, 4) == pytest.approx(1.5)
    assert algbw_gbps(1, 0.0) == 0.0
    with pytest.raises(ValueError):
        busbw_factor("allreduce", 2)


def test_sizes():
    assert parse_size("8K") == 8192 and parse_size("256M") == 256 << 20 and parse_size("1G") == 1 << 30
    assert parse_size("64MiB") == 64 << 20 and parse_size("4096") == 4096 and parse_size(7) == 7
    with pytest.raises(ValueError):
        parse_size("lots")
    assert size_sweep("8K:256M", 4) == [8 << 10, 32 << 10, 128 << 10, 512 << 10, 2 << 20, 8 << 20, 32 << 20,
                                        128 << 20, 256 << 20]
    assert size_sweep("1M,64M") == [1 << 20, 64 << 20]
    assert size_sweep("4K:4K") == [4096]
    with pytest.raises(ValueError):
        size_sweep("8M:1M")
    assert fmt_size(64 << 20) == "64M" and fmt_size(8192) == "8K" and fmt_size(100) == "100B"


def test_element_counts_split_evenly():
    assert element_count("all_reduce", 1000, 3) == 250
    assert element_count("all_gather", 1000, 3) == 249  # multiple of 3
    assert element_count("all_to_all", 4, 8) == 8  # at least one element per rank
    assert default_iters(8 << 10) == 50 and default_iters(64 << 20) == 4 and default_iters(1 << 30) == 2


def sample_result() -> BenchResult:
    rows = [BenchRow("all_reduce", s, s // 4, 100.0, 1.0, 1.0, True, 5) for s in (8192, 1 << 20)]
    rows.append(BenchRow("sendrecv", 8192, 2048, error="needs 2 or more ranks"))
    return BenchResult(world_size=2, backend="gloo", device="cpu", rows=rows,
                       env={"GLOO_SOCKET_IFNAME": "fab0"}, nodes=["a", "b"])


def test_table_and_json_round_trip():
    res = sample_result()
    text = render_table(res)
    assert "## all_reduce" in text and "busbw(GB/s)" in text and "GLOO_SOCKET_IFNAME=fab0" in text
    assert "error: needs 2 or more ranks" in text
    back = BenchResult.from_dict(json.loads(res.to_json()))
    assert back == res
    assert not back.correct  # the error row
    assert back.row("all_reduce", 8192).correct


def test_plot_writes_a_png(tmp_path):
    path = plot_busbw([sample_result()], str(tmp_path / "busbw.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(FabricError) as info:
        plot_busbw([sample_result()], str(tmp_path / "busbw.png"))
    assert info.value.message == "--plot needs matplotlib, which is not installed"
    assert info.value.hint == "pip install 'aitrain[plot]' (or matplotlib) into aitrain's environment"
    assert not (tmp_path / "busbw.png").exists()


def test_every_collective_has_a_factor():
    for coll in COLLECTIVES:
        assert busbw_factor(coll, 4) > 0
