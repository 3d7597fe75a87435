"""`aitrain launch --help` is rendered by aitrain (Hydra's own rendering lists every Hydra group
twice and took a second); it must say exactly what Hydra's would."""

from __future__ import annotations

from pathlib import Path

from aitrain_testing import run_aitrain


def test_launch_help_is_what_hydra_renders(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    fast = run_aitrain(["launch", "--help", "strategy=fsdp", "train.steps=5"], tmp_path)
    # With a config dir Hydra renders the help itself; an empty one adds no groups.
    hydra = run_aitrain(["launch", "--help", "-cd", str(empty), "strategy=fsdp", "train.steps=5"], tmp_path)
    assert fast.returncode == 0 and hydra.returncode == 0, fast.stderr + hydra.stderr
    assert fast.stdout == hydra.stdout
    assert "strategy: ddp, fsdp, fsdp_tp" in fast.stdout and "backend: local, ray, slurm" in fast.stdout
    assert "  steps: 5" in fast.stdout


def test_launch_help_with_a_bad_override_is_one_error(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "--help", "strategy=nope"], tmp_path)
    assert r.returncode == 2 and "Available options in 'strategy'" in r.stderr and "Traceback" not in r.stderr


def test_cfg_info_and_package_as_in_plain_hydra(tmp_path: Path) -> None:
    for args, expect in ((["--cfg", "job", "--resolve"], "run_dir: null"),  # no run yet: Hydra sets it
                         (["--cfg", "job"], "run_dir: ${hydra:runtime.output_dir}"),
                         (["--cfg", "hydra"], "output_subdir:"),
                         (["--cfg", "all", "--resolve"], "hydra:"),
                         (["--cfg", "job", "-p", "train", "train.steps=7"], "steps: 7"),
                         (["--info"], "Hydra 1.3")):
        r = run_aitrain(["launch", *args], tmp_path)
        assert r.returncode == 0 and expect in r.stdout, (args, r.stdout[-500:], r.stderr[-500:])
        assert "Traceback" not in r.stderr
