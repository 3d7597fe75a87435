"""Other frameworks' training programs under aitrain, 2 CPU ranks on gloo, launched as a user
would launch them with torchrun:

    aitrain launch nproc_per_node=2 -- tests/frameworks/scripts/hf_trainer.py
    aitrain launch nproc_per_node=2 -- -m aitrain_fwdemo.train --steps 3 ...

What a user would notice: the job SUCCEEDED, the framework saw 2 ranks (its own idea of the
global rank and world size), and what it logged to MLflow is in the launch's own run: the
experiment has exactly one run, the one ``--json`` names, FINISHED. The programs are in
scripts/ (the GPU tier reuses hf_trainer.py and lightning_train.py with ``--accelerator cuda``).
A framework that is not installed skips its test, saying how to install it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from aitrain_testing import run_aitrain

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE / "scripts"
INSTALL_HINT = "pip install -c constraints.txt -e '.[test]'"
# Frameworks' own chatter off (the scripts set these too; a user's shell would).
QUIET = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_HUB_OFFLINE": "1",
         "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def needs(module: str, dist: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{dist} is not installed ({INSTALL_HINT})")


def launch(tmp_path: Path, program: list[str], *overrides: str, python: str | None = None,
           timeout: float = 240) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """``aitrain launch run_root=<tmp>/runs nproc_per_node=2 --json [overrides] -- PROGRAM``; the
    ``--json`` result. ``python``: the interpreter of another environment to run aitrain with."""
    args = ["launch", f"run_root={tmp_path / 'runs'}", "nproc_per_node=2", *overrides, "--json", "--", *program]
    env = dict(QUIET, XDG_STATE_HOME=str(tmp_path / "state"))  # the job registry: this test's own
    if python is None:
        r = run_aitrain(args, tmp_path, env=env, timeout=timeout)
    else:
        full = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        r = subprocess.run([python, "-m", "aitrain.launcher.cli", *args], cwd=tmp_path, env={**full, **env},
                           text=True, capture_output=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["state"] == "SUCCEEDED", result
    return result, r


def the_run(tmp_path: Path, result: dict[str, Any], empty_experiments_ok: frozenset[str] = frozenset()
            ) -> tuple[Any, Any]:
    """(client, run): the experiment's one and only run, which is the launch's. No other run
    anywhere in the store; ``empty_experiments_ok``: experiments a framework may have made
    (without runs)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aitrain")
    assert exp is not None, "no aitrain experiment in the launch's store"
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]], "one MLflow run per launch, not two"
    others = [e for e in client.search_experiments() if e.name != "aitrain"]
    assert not client.search_runs([e.experiment_id for e in others]), "a run outside the launch's"
    strays = {e.name for e in others} - {"Default"} - empty_experiments_ok
    assert not strays, f"the framework made experiments of its own: {strays}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("world_size") == "2", run.data.tags
    return client, run


def rank_reports(folder: Path) -> list[dict[str, Any]]:
    return [json.loads((folder / f"rank{i}.json").read_text()) for i in (0, 1)]


def test_hugging_face_trainer_logs_into_the_launch_run(tmp_path: Path) -> None:
    needs("transformers", "transformers")
    report = tmp_path / "report"
    report.mkdir()
    result, r = launch(tmp_path, [str(SCRIPTS / "hf_trainer.py"), "--steps", "20", "--report-dir", str(report)])
    seen = rank_reports(report)
    assert [(s["process_index"], s["world_size"]) for s in seen] == [(0, 2), (1, 2)]
    assert "hf_trainer: 20 steps" in r.stdout
    client, run = the_run(tmp_path, result)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [5, 10, 15, 20]  # logging_steps=5, as the Trainer logged them
    assert [m.value for m in losses] == pytest.approx(seen[0]["losses"])
    assert losses[-1].value < losses[0].value
    assert run.data.metrics["train_loss"] == pytest.approx(seen[0]["train_loss"])
    # The Trainer's own params sit beside aitrain's in the same run.
    assert run.data.params["max_steps"] == "20" and run.data.params["nproc_per_node"] == "2"


def test_lightning_ddp_sees_aitrains_ranks_and_logs_into_the_launch_run(tmp_path: Path) -> None:
    needs("lightning", "lightning")
    report = tmp_path / "report"
    report.mkdir()
    result, r = launch(tmp_path, [str(SCRIPTS / "lightning_train.py"), "--report-dir", str(report)])
    seen = rank_reports(report)
    assert [(s["global_rank"], s["local_rank"], s["world_size"], s["num_nodes"]) for s in seen] == \
        [(0, 0, 2, 1), (1, 1, 2, 1)]
    assert {s["environment"] for s in seen} == {"TorchElasticEnvironment"}  # found as torchrun's ranks
    assert {s["mlflow_run_id"] for s in seen} == {result["mlflow_run_id"]}
    assert "lightning_train: 40 steps" in r.stdout
    client, run = the_run(tmp_path, result)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) == 8  # log_every_n_steps=5 over 40 steps
    assert history[-1].value < history[0].value / 2
    assert run.data.params["hidden"] == "32"  # save_hyperparameters() through the logger


def test_accelerate_gathers_every_ranks_result(tmp_path: Path) -> None:
    needs("accelerate", "accelerate")
    out = tmp_path / "gathered.json"
    result, _ = launch(tmp_path, [str(SCRIPTS / "accelerate_gather.py"), "--out", str(out)])
    written = json.loads(out.read_text())
    rows = written["gathered"]
    assert [(row["rank"], row["world_size"]) for row in rows] == [(0, 2), (1, 2)]
    assert [row["samples"] for row in rows] == [256, 256]  # 2 epochs over half of 256 samples each
    assert rows[0]["weight_sum"] == rows[1]["weight_sum"]  # DDP kept the replicas equal
    assert written["env_rank"] == "0" and written["distributed_type"].endswith("MULTI_CPU")
    # Accelerate's MLflow tracker creates the experiment init_trackers() names (left empty: it logs
    # into MLFLOW_RUN_ID's run) unless MLFLOW_EXPERIMENT_NAME names the launch's experiment.
    client, run = the_run(tmp_path, result, empty_experiments_ok=frozenset({"accelerate_gather"}))
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [0, 1] and losses[1].value < losses[0].value
    assert run.data.params["lr"] == "0.02"  # init_trackers(config=...)


def test_dash_m_runs_a_module_of_an_installed_package(tmp_path: Path) -> None:
    """`-- -m pkg.module` of a package pip-installed into the user's environment: a scratch venv
    (aitrain and torch visible from the suite's venv through a .pth) with the package under
    tests/frameworks/installable/ installed as a wheel would be. The ranks run in the run dir
    (hydra.job.chdir=true), so only site-packages can provide the module."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    suite_site = sysconfig.get_path("purelib")
    # `import site` lines in a .pth run: addsitedir also reads the suite's .pth (aitrain's editable hook).
    (site / "suite_venv.pth").write_text(f"import site; site.addsitedir({suite_site!r})\n")
    src = tmp_path / "src"
    shutil.copytree(HERE / "installable", src)  # pip builds in the source tree: not in the repo's
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                          "--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check", "-q",
                          str(src)], text=True, capture_output=True, timeout=120)
    assert pip.returncode == 0, pip.stderr
    assert (site / "aitrain_fwdemo" / "train.py").is_file()

    report = tmp_path / "report"
    report.mkdir()
    args = ["--steps", "3", "--report-dir", str(report)]
    result, _ = launch(tmp_path, ["-m", "aitrain_fwdemo.train", *args], "hydra.job.chdir=true",
                       python=str(venv / "bin" / "python"))
    installed = str(site / "aitrain_fwdemo" / "train.py")
    for s in rank_reports(report):
        assert s["file"] == installed and s["version"] == "0.3.1"
        assert s["argv"] == [installed, *args]  # what `python -m` puts in argv, the rest byte for byte
        assert s["cwd"] == result["run_dir"] and s["world_size"] == 2
    the_run(tmp_path, result)
