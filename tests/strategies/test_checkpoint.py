"""Checkpoints (torch.distributed.checkpoint): the COMPLETE marker, resume semantics, and resuming
under another strategy and world size with the loss curve continuing where it stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aitrain.errors import ConfigError
from aitrain.strategies import checkpoint as ckpt

from aitrain_testing import run_aitrain
from losses_reference import reference_losses, run_losses, tiny_overrides

HERE = Path(__file__).parent


def _model_and_opt(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_save_load_round_trip_restores_model_and_optimizer(tmp_path: Path) -> None:
    model, opt = _model_and_opt(0)
    path = ckpt.save(tmp_path, 7, model, opt, info={"strategy": "none"})
    assert path.name == "step-00000007" and ckpt.is_complete(path)
    assert json.loads((path / "COMPLETE").read_text())["step"] == 7
    other, other_opt = _model_and_opt(1)
    info = ckpt.load(path, other, other_opt)
    assert info["step"] == 7 and info["strategy"] == "none"
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) and torch.equal(sa[k]["step"], sb[k]["step"])


def test_latest_skips_directories_without_the_marker(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    ckpt.save(tmp_path, 5, model, opt)
    ckpt.save(tmp_path, 10, model, opt)
    assert ckpt.latest(tmp_path) == tmp_path / "step-00000010"
    (tmp_path / "step-00000010" / "COMPLETE").unlink()  # as if the save of step 10 had been cut short
    (tmp_path / "step-00000015").mkdir()  # a save that had only just started
    assert ckpt.latest(tmp_path) == tmp_path / "step-00000005"
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step-00000005"


def test_process_killed_mid_save_leaves_no_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, str(HERE / "scripts" / "killed_mid_save.py"), str(root)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    half = root / "step-00000002"
    assert (half / ".metadata").is_file() and not ckpt.is_complete(half)  # DCP finished, aitrain did not
    assert ckpt.latest(root) == root / "step-00000001"
    with pytest.raises(ConfigError, match="incomplete checkpoint"):
        ckpt.resolve_resume(str(half), root)


def test_resume_semantics(tmp_path: Path) -> None:
    assert ckpt.resolve_resume("none", tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path / "nothing-here") is None  # auto: start fresh
    with pytest.raises(ConfigError, match="does not exist"):
        ckpt.resolve_resume(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path), tmp_path)
    model, opt = _model_and_opt()
    p = ckpt.save(tmp_path / "c", 3, model, opt)
    assert ckpt.resolve_resume(str(p), tmp_path) == p  # a checkpoint
    assert ckpt.resolve_resume(str(tmp_path / "c"), tmp_path) == p  # a root: its latest


def test_keep_removes_the_oldest_complete_checkpoints(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    (tmp_path / "step-00000002").mkdir(parents=True)  # stale half-written save from an earlier run
    for step in (1, 3, 4, 5):
        ckpt.save(tmp_path, step, model, opt, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def test_saving_a_step_again_replaces_the_old_directory(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    p = ckpt.save(tmp_path, 4, model, opt)
    (p / "stray").write_text("from an interrupted save")
    ckpt.save(tmp_path, 4, model, opt)
    assert not (p / "stray").exists() and ckpt.is_complete(p)


# ---------------------------------------------------------------------------
# Through `aitrain launch`: save under one strategy and world size, resume under another.


def _launch(tmp_path: Path, name: str, strategy: str, nproc: int, *extra: str) -> tuple[str, list[float]]:
    run_dir = tmp_path / name
    r = run_aitrain(["launch", f"+strategy={strategy}", f"nproc_per_node={nproc}", *tiny_overrides(),
                     f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every_n_steps=5", *extra,
                     f"hydra.run.dir={run_dir}"], tmp_path, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, run_losses(run_dir)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("first,then", [(("fsdp", 2), ("ddp", 4)), (("ddp", 4), ("fsdp", 2))],
                         ids=["fsdp2_to_ddp4", "ddp4_to_fsdp2"])
def test_resume_under_another_strategy_and_world_size(tmp_path: Path, first: tuple, then: tuple) -> None:
    # An uninterrupted 10-step run that checkpoints at steps 5 and 10...
    _, full = _launch(tmp_path, "first", *first)
    assert full == pytest.approx(list(reference_losses()), rel=1e-4, abs=1e-5)
    root = tmp_path / "ckpt"
    assert [p.name for p in sorted(root.iterdir())] == ["step-00000005", "step-00000010"]
    # ...whose last save is then treated as cut short: without its marker resume=auto must skip it.
    (root / "step-00000010" / "COMPLETE").unlink()
    out, resumed = _launch(tmp_path, "then", *then, "resume=auto")
    assert f"resumed from {root / 'step-00000005'} (step 5, saved by {first[0]} on {first[1]} rank(s))" in out
    assert "[rank0]:step 6/10" in out and "step 5/10" not in out
    assert len(resumed) == 5  # steps 6..10 only
    assert resumed == pytest.approx(full[5:], rel=1e-4, abs=1e-5)
    assert ckpt.is_complete(root / "step-00000010")  # re-saved by the resumed run
