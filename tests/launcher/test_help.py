"""`aitrain launch --help` is rendered by aitrain (Hydra's own rendering lists every Hydra group
twice and took a second); it must say exactly what Hydra's would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# A plain @hydra.main app over the same configs: what a Hydra user compares aitrain with.
PLAIN_APP = """
import hydra

from aitrain.launcher.config import register_configs

register_configs()


@hydra.main(config_path="pkg://aitrain.configs", config_name="config", version_base="1.3")
def main(cfg):
    pass


main()
"""


def _without_times(text: str) -> str:
    """Run dirs are named after the second they were composed in."""
    return re.sub(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d+", "<now>", text)


@pytest.mark.parametrize("args", [
    ["--cfg", "job"], ["--cfg", "job", "--resolve"], ["--cfg", "hydra"], ["--cfg", "all"],
    ["--cfg", "all", "--resolve"], ["--cfg", "job", "-p", "train", "train.steps=7", "+strategy=fsdp"],
    ["--cfg", "job", "-p", "strategy", "strategy=tp"], ["--cfg", "hydra", "-p", "hydra.job_logging",
                                                         "hydra/job_logging=disabled"],
    ["--info", "defaults-tree", "strategy=fsdp"], ["--info", "config"], ["--info", "searchpath", "-cd", "CONF"],
    ["--cfg", "job", "-cd", "CONF", "+experiment=fast"], ["--cfg", "job", "-p", "nope"],
])
def test_cfg_info_and_package_print_what_plain_hydra_prints(args: list[str], tmp_path: Path) -> None:
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "fast.yaml").write_text("# @package _global_\ndefaults:\n  - override /strategy: hsdp\n"
                                    "train:\n  lr: 0.01\n")
    (tmp_path / "app.py").write_text(PLAIN_APP)
    args = [str(conf.parent) if a == "CONF" else a for a in args]
    plain = subprocess.run([sys.executable, "app.py", *[a.replace("+strategy=", "strategy=") for a in args]],
                           cwd=tmp_path, text=True, capture_output=True, timeout=120)
    ours = run_aitrain(["launch", *args], tmp_path)
    assert (ours.returncode, _without_times(ours.stdout)) == (plain.returncode, _without_times(plain.stdout)), \
        ours.stderr + plain.stderr
    assert "Traceback" not in ours.stderr


def test_cfg_hydra_resolve_resolves_the_run_dir(tmp_path: Path) -> None:
    # Plain Hydra fails here on these configs (hydra.run.dir is ${run_root}/..., a job key it has
    # already removed when it resolves); aitrain resolves before it removes.
    r = run_aitrain(["launch", "--cfg", "hydra", "--resolve", "-p", "hydra.run", "run_root=/data/runs"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"# @package hydra.run\ndir: /data/runs/\d{4}-\d\d-\d\d/[\d-]+\n", r.stdout), r.stdout


def test_conflicting_modes_are_one_error(tmp_path: Path) -> None:
    for args, expect in ((["-m", "--cfg", "job"], "only one of --run, --multirun, --cfg"),
                         (["--resolve"], "--resolve works only with --cfg")):
        r = run_aitrain(["launch", *args], tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"aitrain: error: {expect}") and "\nHINT: " in r.stderr
