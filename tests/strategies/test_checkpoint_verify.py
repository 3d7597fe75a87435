"""Verified resume (#16 item 2): the COMPLETE marker records every file's size and CRC-32;
resume=auto passes over a damaged checkpoint (truncated file, missing .metadata, empty
marker, flipped bytes) to the newest intact one and names what is wrong; resume=<path> to a
damaged checkpoint is an error; markers written before checksums still resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from aitrain.errors import ConfigError
from aitrain.launcher.config import JobConfig, job_config_from_dict
from aitrain.strategies import checkpoint as ckpt

from aitrain_testing import run_aitrain
from losses_reference import run_losses, tiny_overrides


def _model_and_opt(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _data_file(path: Path) -> Path:
    return next(path.glob("__0_*.distcp"))


def _truncate(path: Path) -> str:
    f = _data_file(path)
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    return f"rank0 file {f.name} truncated: {size // 2} of {size} bytes"


def _delete_metadata(path: Path) -> str:
    (path / ".metadata").unlink()
    return ".metadata is missing"


def _empty_marker(path: Path) -> str:
    (path / "COMPLETE").write_text("")
    return "its COMPLETE marker is empty"


def _flip_bytes(path: Path) -> str:
    f = _data_file(path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return f"rank0 file {f.name} fails its checksum"


DAMAGE: dict[str, Callable[[Path], str]] = {"truncated": _truncate, "no_metadata": _delete_metadata,
                                            "empty_marker": _empty_marker, "flipped_bytes": _flip_bytes}


def test_marker_records_every_files_size_and_crc32(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    path = ckpt.save(tmp_path, 3, model, opt)
    files = json.loads((path / "COMPLETE").read_text())["files"]
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "COMPLETE")
    assert sorted(files) == on_disk and ".metadata" in files
    for name, rec in files.items():
        assert (rec["size"], rec["crc32"]) == ckpt.file_crc32(path / name)
    assert files[_data_file(path).name]["rank"] == 0
    assert ckpt.verify(path) == []


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_auto_passes_over_a_damaged_newest_checkpoint(tmp_path: Path, damage: str) -> None:
    model, opt = _model_and_opt()
    older = ckpt.save(tmp_path, 3, model, opt)
    newest = ckpt.save(tmp_path, 4, model, opt)
    why = DAMAGE[damage](newest)
    problems = ckpt.verify(newest)
    assert problems and problems[0].startswith(why)
    point = ckpt.resume_point("auto", tmp_path)
    assert point.path == older and point.skipped == ((newest, problems[0]),)
    with pytest.raises(ConfigError, match=f"checkpoint {newest} is damaged") as e:
        ckpt.resume_point(str(newest), tmp_path)
    assert e.value.hint and "resume=auto" in e.value.hint and "\n" not in e.value.message
    assert ckpt.resume_point(str(tmp_path), tmp_path).path == older  # a root: its newest intact one


def test_markers_without_checksums_still_resume(tmp_path: Path) -> None:
    """Markers written before they held checksums: what can be checked is."""
    model, opt = _model_and_opt()
    older, newest = ckpt.save(tmp_path, 1, model, opt), ckpt.save(tmp_path, 2, model, opt)
    for path in (older, newest):
        info = json.loads((path / "COMPLETE").read_text())
        del info["files"]
        (path / "COMPLETE").write_text(json.dumps(info))
    assert ckpt.verify(newest) == [] and ckpt.resolve_resume("auto", tmp_path) == newest
    other, other_opt = _model_and_opt(1)
    assert ckpt.load(newest, other, other_opt)["step"] == 2
    f = _data_file(newest)
    f.write_bytes(f.read_bytes()[:100])  # shorter than .metadata says its tensors reach
    assert ckpt.verify(newest)[0].startswith(f"rank0 file {f.name} truncated: 100 of at least ")
    (older / ".metadata").write_bytes(b"\x80\x04garbage")
    assert ckpt.verify(older)[0].startswith(".metadata is unreadable")
    point = ckpt.resume_point("auto", tmp_path)
    assert point.path is None and [p for p, _ in point.skipped] == [newest, older]


def test_nothing_intact_auto_starts_fresh_a_root_path_is_an_error(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    _empty_marker(ckpt.save(tmp_path, 5, model, opt))
    assert ckpt.resume_point("auto", tmp_path).path is None
    with pytest.raises(ConfigError, match="every checkpoint under .* is damaged"):
        ckpt.resume_point(str(tmp_path), tmp_path)
    with pytest.raises(ConfigError, match="its COMPLETE marker is empty"):
        ckpt.read_info(tmp_path / "step-00000005")


def test_checksum_shares_split_the_files_between_ranks() -> None:
    sizes = {f"__{r}_0.distcp": 1000 + r for r in range(5)} | {".metadata": 10}
    shares = [ckpt._share(sizes, i, 3) for i in range(3)]
    assert set().union(*shares) == set(sizes) and sum(len(s) for s in shares) == len(sizes)
    assert max(len(s) for s in shares) <= 2


def test_slurm_requeue_and_ray_restart_take_the_same_verified_resume_path(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A requeued Slurm attempt and a restarted Ray group run the job with resume=auto, which
    the built-in job handles in one place: launcher.train.resume (also what a typed resume=auto
    runs, tested through real launches below)."""
    from aitrain.launcher import train
    from aitrain.launcher.backends.ray.group import job_config_for_attempt
    from aitrain.launcher.backends.slurm import SlurmBackend

    assert SlurmBackend().relaunch_settings(JobConfig())[1] == {"resume": "auto"}
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(yaml.safe_dump({"resume": "none", "train": {"steps": 9}}))
    _, text = job_config_for_attempt(job_yaml, 1, "none")
    cfg = job_config_from_dict(yaml.safe_load(text))
    assert cfg.resume == "auto"

    root = tmp_path / "ckpt"
    model, opt = _model_and_opt()
    ckpt.save(root, 3, model, opt, info={"strategy": "ddp"})
    _truncate(ckpt.save(root, 6, model, opt))
    assert train.resume(cfg, root, *_model_and_opt(1)) == 3
    out = capsys.readouterr().out
    assert "aitrain: checkpoint step-00000006 is damaged (rank0 file __0_0.distcp truncated: " in out
    assert "; resuming from step-00000003\n" in out and f"resumed from {root / 'step-00000003'} (step 3," in out


# ---------------------------------------------------------------------------
# Through `aitrain launch`: save, damage, resume=auto.


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_launch_resumes_past_every_kind_of_damage(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"

    def launch(name: str, *extra: str) -> str:
        r = run_aitrain(["launch", "+strategy=ddp", "nproc_per_node=2", *tiny_overrides(), f"checkpoint.dir={root}",
                         "checkpoint.every_n_steps=2", "checkpoint.keep=0", *extra,
                         f"hydra.run.dir={tmp_path / name}"], tmp_path, timeout=180)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    launch("first")
    full = run_losses(tmp_path / "first")
    assert sorted(p.name for p in root.iterdir()) == [f"step-{s:08d}" for s in (2, 4, 6, 8, 10)]
    # The four newest checkpoints damaged, one way each; step 2 stays intact.
    whys = {s: DAMAGE[d](root / f"step-{s:08d}") for s, d in
            zip((10, 8, 6, 4), ("truncated", "no_metadata", "empty_marker", "flipped_bytes"), strict=True)}
    out = launch("resumed", "resume=auto")
    for s, then in ((10, "trying step-00000008"), (8, "trying step-00000006"), (6, "trying step-00000004"),
                    (4, "resuming from step-00000002")):
        line = next(x for x in out.splitlines() if f"checkpoint step-{s:08d} is damaged (" in x)
        assert line.startswith(f"[rank0]:aitrain: checkpoint step-{s:08d} is damaged ({whys[s]}")
        assert line.endswith(then)
    assert f"resumed from {root / 'step-00000002'} (step 2, saved by ddp on 2 rank(s))" in out
    assert run_losses(tmp_path / "resumed") == pytest.approx(full[2:], rel=1e-5, abs=1e-6)  # steps 3..10, as before
    assert all(ckpt.verify(p) == [] for p in root.iterdir())  # re-saved by the resumed run
