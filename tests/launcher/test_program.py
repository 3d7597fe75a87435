"""The user's program as they would hand it to torchrun: command shape, arguments byte for
byte, ``nproc_per_node=auto|gpu|cpu``, torchrun's rank environment, ``hydra.job.chdir`` and
MLflow logging from the user's code into the launch's run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aitrain_testing import run_aitrain

# Arguments Hydra's grammar would re-type or refuse, and ones a shell user really passes.
ODD_ARGS = ["--lr", "1e-3", "--flag", "true", "--count", "1_000", "null", "--lr=0.1", "a,b", "[x]",
            "it's", "back\\", "${oc.env:HOME}", "x=y", " sp ", "", "{a: 1}", "é", 'a"b', "$", "\\${x}",
            "~", "+x", "-m", "--", "a\nb"]

ARGV_SCRIPT = """\
import json, os, sys
out = os.environ["ARGV_OUT"]
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}, f)
"""


def _compose_script_args(overrides: list[str]) -> tuple[str | None, str | None, list[str]]:
    from aitrain.launcher.cli.launch import compose_job
    from aitrain.launcher.config import to_job_config

    job = to_job_config(compose_job(overrides))
    return job.script, job.module, job.script_args


@pytest.fixture(scope="module")
def composing():
    from aitrain.launcher.cli.launch import composing as ctx

    with ctx():
        yield


def test_program_after_double_dash_composes_byte_for_byte(composing) -> None:
    from aitrain.launcher.program import program_overrides

    assert _compose_script_args(program_overrides(["train.py", *ODD_ARGS])) == ("train.py", None, ODD_ARGS)
    script, module, args = _compose_script_args(program_overrides(["-m", "pkg.train", "--x", "1"]))
    assert (script, module, args) == (None, "pkg.train", ["--x", "1"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
                max_size=4))
def test_any_argument_survives_hydra(composing, args: list[str]) -> None:
    from aitrain.launcher.program import program_overrides

    assert _compose_script_args(program_overrides(["t.py", *args])) == ("t.py", None, args)


def test_script_args_values_stay_as_typed(composing) -> None:
    from aitrain.launcher.program import quote_script_args

    typed = "script_args=[--lr,1e-3,--flag,true,--count,1_000,null,--lr=0.1, spaced ,'q,r']"
    _, _, args = _compose_script_args([quote_script_args(typed)])
    assert args == ["--lr", "1e-3", "--flag", "true", "--count", "1_000", "null", "--lr=0.1", "spaced", "q,r"]


@pytest.mark.parametrize("argv, message", [
    (["--"], "nothing follows `--`"),
    (["--", "-m"], "needs a module name"),
    (["--", "--lr", "1"], "after `--` comes the script"),
    (["--", "nowhere.py"], "script=nowhere.py does not exist"),
    (["--", "-m", "no_such_module_xyz"], "no module named 'no_such_module_xyz'"),
    (["script=a.py", "module=b", "--", "-m", "b"], "both script="),
    (["nproc_per_node=gpu"], "nproc_per_node=gpu, but no CUDA device"),
    (["nproc_per_node=lots"], "nproc_per_node='lots' is not a number"),
])
def test_bad_program_is_one_error_line(tmp_path: Path, argv: list[str], message: str) -> None:
    (tmp_path / "a.py").write_text("")
    env = {"CUDA_VISIBLE_DEVICES": ""} if "gpu" in " ".join(argv) else None
    r = run_aitrain(["launch", "dry_run=true", "fabric=off", *argv], tmp_path, env=env)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("aitrain: error:") == 1, r.stderr


def test_nproc_per_node_auto_and_cpu_as_torchrun(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    for value in ("auto", "cpu"):
        r = run_aitrain(["launch", "dry_run=true", "fabric=off", f"nproc_per_node={value}", "--json"], tmp_path,
                        env={"CUDA_VISIBLE_DEVICES": ""})
        assert r.returncode == 0, r.stderr
        plan = json.loads(r.stdout.strip().splitlines()[-1])["plan"]
        assert f"ranks:   {cpus} (1 node x {cpus} per node)" in plan


@pytest.mark.slow
def test_double_dash_reaches_the_ranks_byte_for_byte(tmp_path: Path) -> None:
    script = tmp_path / "show_argv.py"
    script.write_text(ARGV_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    args = ["--lr", "1e-3", "--flag", "true", "--count", "1_000", "null", "--lr=0.1", "it's", "${x}", "", "a b"]
    dry = run_aitrain(["launch", "tracking=none", "fabric=off", "nproc_per_node=1", "dry_run=true", "--",
                       "show_argv.py", *args], tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert f"command: {shlex.join([sys.executable, '-u', 'show_argv.py', *args])}" in dry.stdout

    r = run_aitrain(["launch", "tracking=none", "fabric=off", "nproc_per_node=2", "--", "show_argv.py", *args],
                    tmp_path, env={"ARGV_OUT": str(out)})
    assert r.returncode == 0, r.stderr + r.stdout
    for rank in (0, 1):
        seen = json.loads((out / f"rank{rank}.json").read_text())
        assert seen["argv"] == ["show_argv.py", *args]
        assert seen["cwd"] == str(tmp_path)


@pytest.mark.slow
def test_dash_m_runs_a_module_as_python_would(tmp_path: Path) -> None:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(ARGV_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    r = run_aitrain(["launch", "tracking=none", "fabric=off", "nproc_per_node=1", "--", "-m", "mypkg.train",
                     "--x", "1"], tmp_path, env={"ARGV_OUT": str(out)})
    assert r.returncode == 0, r.stderr + r.stdout
    seen = json.loads((out / "rank0.json").read_text())
    assert seen["argv"] == [str(pkg / "train.py"), "--x", "1"]  # what `python -m` puts in argv[0]


# Variables whose values differ from one launch to the next under torchrun too.
PER_LAUNCH = {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE", "_", "OLDPWD", "ARGV_OUT"}


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_ranks_see_torchruns_environment(tmp_path: Path, nproc: int) -> None:
    """Variable by variable: what a rank sees under `torchrun --standalone` and under aitrain.
    aitrain may add its own (AITRAIN_*) and tuned values, each with its reason in the dry run."""
    script = tmp_path / "show_env.py"
    script.write_text(ARGV_SCRIPT)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MLFLOW_"))}
    runs = {}
    for who in ("torchrun", "aitrain"):
        out = tmp_path / f"env-{who}"  # not ./aitrain: python -m would import it as the package
        out.mkdir()
        env = dict(base, ARGV_OUT=str(out))
        if who == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   str(script)]
            r = subprocess.run(cmd, cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120)
        else:
            r = run_aitrain(["launch", "tracking=none", f"nproc_per_node={nproc}", "--", str(script)], tmp_path,
                            env=env)
        assert r.returncode == 0, r.stderr
        runs[who] = [json.loads((out / f"rank{i}.json").read_text())["env"] for i in range(nproc)]
    dry = run_aitrain(["launch", "tracking=none", f"nproc_per_node={nproc}", "dry_run=true", "--", str(script)],
                      tmp_path, env=base)
    explained = {line.split("=", 1)[0].strip() for line in dry.stdout.splitlines()
                 if line.startswith("    ") and "=" in line and "    # " in line}
    for rank in range(nproc):
        t, a = runs["torchrun"][rank], runs["aitrain"][rank]
        for k in sorted(set(t) | set(a)):
            if k in PER_LAUNCH or k.startswith("AITRAIN_") or t.get(k) == a.get(k):
                continue
            assert k in explained, f"rank {rank}: {k} is {t.get(k)!r} under torchrun, {a.get(k)!r} under aitrain"
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "ROLE_NAME", "GROUP_RANK"):
            assert a[k] == t[k], k
        assert "MLFLOW_RUN_ID" not in a  # tracking=none


@pytest.mark.slow
def test_hydra_chdir_runs_ranks_in_the_run_dir(tmp_path: Path) -> None:
    (tmp_path / "show.py").write_text(ARGV_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    r = run_aitrain(["launch", "tracking=none", "fabric=off", "nproc_per_node=1", "hydra.job.chdir=true",
                     "run_root=runs", "--json", "--", "show.py", "--data", "x"], tmp_path,
                    env={"ARGV_OUT": str(out)})
    assert r.returncode == 0, r.stderr + r.stdout
    run_dir = json.loads(r.stdout.strip().splitlines()[-1])["run_dir"]
    assert Path(run_dir).is_relative_to(tmp_path / "runs")  # run_root is the launch dir's, not nested
    seen = json.loads((out / "rank0.json").read_text())
    assert seen["cwd"] == run_dir
    assert seen["argv"] == [str(tmp_path / "show.py"), "--data", "x"]


MLFLOW_SCRIPT = """\
import os, sys, mlflow
rank = int(os.environ["RANK"])
run = mlflow.start_run()
mlflow.log_metric(f"user/loss_rank{rank}", 0.5, step=1)
if rank == 0:
    mlflow.log_param("user_param", "x")
    mlflow.end_run(status=os.environ.get("END_AS", "FINISHED"))  # as a framework that ends the run itself
    sys.exit(int(os.environ.get("EXIT_WITH", "0")))
mlflow.end_run()
"""


def _runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aitrain")
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
@pytest.mark.parametrize("end_as, exit_with, status", [("KILLED", "0", "FINISHED"), ("FINISHED", "3", "FAILED")])
def test_user_mlflow_logging_joins_the_launch_run(tmp_path: Path, end_as: str, exit_with: str, status: str) -> None:
    (tmp_path / "log_mlflow.py").write_text(MLFLOW_SCRIPT)
    r = run_aitrain(["launch", f"run_root={tmp_path / 'store'}", "fabric=off", "nproc_per_node=2", "--json", "--",
                     "log_mlflow.py"], tmp_path, env={"END_AS": end_as, "EXIT_WITH": exit_with})
    assert (r.returncode == 0) == (exit_with == "0"), r.stderr + r.stdout
    result = json.loads(r.stdout.strip().splitlines()[-1])
    runs = _runs(tmp_path / "store")
    assert [x.info.run_id for x in runs] == [result["mlflow_run_id"]]  # one run per launch, not two
    run = runs[0]
    assert {"user/loss_rank0", "user/loss_rank1"} <= set(run.data.metrics)
    assert run.data.params["user_param"] == "x" and run.data.params["nproc_per_node"] == "2"
    assert run.info.status == status  # aitrain ends the run last, with the job's status
    assert run.data.tags["aitrain.tracked"] == "true"


@pytest.mark.slow
def test_the_program_gets_the_users_umask_back(tmp_path: Path) -> None:
    """aitrain's own files are private (umask 077); the user's program creates files as it
    would under torchrun."""
    (tmp_path / "umask.py").write_text("import os\nu = os.umask(0)\nprint(f'umask={u:03o}', flush=True)\n")
    cmd = " ".join([sys.executable, "-m", "aitrain.launcher.cli", "launch", "tracking=none", "fabric=off",
                    "nproc_per_node=1", "--", "umask.py"])
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    r = subprocess.run(["bash", "-c", f"umask 022; exec {cmd}"], cwd=tmp_path, env=env, text=True,
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "[rank0]:umask=022" in r.stdout, r.stdout
    run_dir = next((tmp_path / "outputs").glob("*/*"))
    assert run_dir.stat().st_mode & 0o777 == 0o700
