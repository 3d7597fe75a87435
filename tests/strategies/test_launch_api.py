"""`aitrain launch` end to end: bad input fails before any process starts, and user scripts get
the strategy the launcher was asked for through the public API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aitrain.strategies import checkpoint as ckpt

from aitrain_testing import run_aitrain
from losses_reference import tiny_overrides

HERE = Path(__file__).parent
pytestmark = pytest.mark.timeout(300)


def _fails_before_start(tmp_path: Path, *args: str) -> str:
    r = run_aitrain(["launch", *args, *tiny_overrides(), f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert not (tmp_path / "run" / "logs").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert "HINT:" in r.stderr
    return r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", [
    (["+strategy=fsdp", "nproc_per_node=4", "parallel.dp_shard=3"],
     r"parallel degrees dp_replicate=1, dp_shard=3, tp=1, pp=1 multiply to 3, but the world size is 4"),
    (["+strategy=ddp", "nproc_per_node=2", "parallel.tp=2", "parallel.dp_replicate=1"],
     r"strategy ddp needs parallel.tp=1, but the job has parallel.tp=2"),
    (["strategy.name=nope"],
     r"unknown strategy 'nope'. Known strategies: ddp, fsdp, fsdp_tp, fsdp_tp_pp, hsdp, pp, tp"),
    (["+strategy=tp", "nproc_per_node=3"],
     r"tensor parallelism cannot shard module 'layers.0.attention': its 4 heads do not split evenly over tp=3"),
    (["+strategy=pp", "nproc_per_node=4"],
     r"4 stages \(parallel.pp=4\) were asked for and the model has 2 layer\(s\)"),
    (["+strategy=pp", "nproc_per_node=2", "pp.microbatches=3"], r"does not split into pp.microbatches=3"),
    (["+strategy=pp", "pp.schedule=Fancy"], r"pp.schedule='Fancy' is not a known pipeline schedule"),
], ids=["wrong_product", "ddp_with_tp", "unknown_strategy", "tp_heads", "pp_stages", "pp_microbatches",
        "pp_schedule"])
def test_bad_input_fails_before_any_process_starts(tmp_path: Path, args: list[str], expected: str) -> None:
    assert re.search(expected, _fails_before_start(tmp_path, *args))


@pytest.mark.slow
def test_user_script_gets_the_launched_strategy(tmp_path: Path) -> None:
    losses = {}
    expected_plan = {"pp": "(dp_replicate=1, dp_shard=1, tp=1, pp=2)",
                     "fsdp_tp": "(dp_replicate=1, dp_shard=1, tp=2, pp=1)"}
    for strategy, extra in [("pp", ["pp.microbatches=2"]), ("fsdp_tp", [])]:
        out_dir = tmp_path / strategy
        r = run_aitrain(["launch", f"+strategy={strategy}", "nproc_per_node=2", "tracking=none", "fabric=off",
                         *extra, f"script={HERE / 'scripts' / 'user_train.py'}", f"script_args=[{out_dir}]"],
                        tmp_path, timeout=240)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        lines = [line for line in r.stdout.splitlines() if line.startswith(f"[rank0]:strategy {strategy} (")]
        assert len(lines) == 3 and expected_plan[strategy] in lines[0], r.stdout
        losses[strategy] = [float(line.rsplit(" ", 1)[1]) for line in lines]
        assert ckpt.read_info(ckpt.latest(out_dir))["strategy"] == strategy
    # Same model, same data, different layouts: the same losses.
    assert losses["pp"] == pytest.approx(losses["fsdp_tp"], rel=1e-4)
