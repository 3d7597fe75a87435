"""Tab completion through Hydra's mechanism (issue #15 item 2): `aitrain launch -sc install=SHELL`
prints a script that calls back `aitrain launch -sc query=SHELL` with the typed line in
COMP_LINE, and Hydra's completion plugin answers with groups, options and keys."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from aitrain_testing import run_aitrain

BIN = Path(sys.executable).parent  # where the `aitrain` console script is installed


def query(line: str, cwd: Path, shell: str = "bash") -> list[str]:
    """What the installed script gets back for `line` (the cursor at its end)."""
    r = run_aitrain(["launch", "-sc", f"query={shell}"], cwd, env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "fast.yaml").write_text("# @package _global_\ntrain:\n  steps: 5\n")
    return tmp_path / "conf"


def test_query_completes_groups_options_and_keys(tmp_path: Path) -> None:
    assert "strategy=" in query("aitrain launch strat", tmp_path)
    options = query("aitrain launch strategy=", tmp_path)
    assert {"strategy=ddp", "strategy=fsdp", "strategy=fsdp_tp", "strategy=hsdp"} <= set(options)
    keys = query("aitrain launch train.", tmp_path)
    assert {"train.lr=", "train.steps=", "train.global_batch_size="} <= set(keys)
    assert query("aitrain launch train.l", tmp_path) == ["train.log_every=", "train.lr="]
    assert "hydra/job_logging=" in query("aitrain launch hydra/job_", tmp_path)
    assert "hydra/job_logging=disabled" in query("aitrain launch hydra/job_logging=", tmp_path)


def test_query_after_aitrains_own_override_forms(tmp_path: Path) -> None:
    # `+strategy=fsdp` is rewritten as for a launch (plain Hydra would fail to compose and complete no keys)
    assert "train.lr=" in query("aitrain launch +strategy=fsdp  train.l", tmp_path)
    assert "strategy.name=" in query("aitrain launch -m +strategy=fsdp strategy.na", tmp_path)


def test_query_knows_the_config_dir_on_the_line(conf: Path, tmp_path: Path) -> None:
    assert query(f"aitrain launch -cd {conf} +exp", tmp_path) == ["+experiment="]
    assert query(f"aitrain launch -cd {conf} +experiment=", tmp_path) == ["+experiment=fast"]
    assert query("aitrain launch +exp", tmp_path) == []


def test_query_stops_at_the_program(tmp_path: Path) -> None:
    assert query("aitrain launch nproc_per_node=2 -- train.py --l", tmp_path) == []


def test_hydra_help_install_line_works(tmp_path: Path) -> None:
    help_ = run_aitrain(["launch", "--hydra-help"], tmp_path)
    assert 'eval "$(aitrain launch -sc install=bash)"' in help_.stdout
    for shell in ("bash", "zsh"):
        r = run_aitrain(["launch", "-sc", f"install={shell}"], tmp_path)
        assert r.returncode == 0, r.stderr
        assert "complete -o nospace -o default -F _aitrain_completion aitrain" in r.stdout
        assert "launch -sc query=bash" in r.stdout
    r = run_aitrain(["launch", "-sc", "uninstall=bash"], tmp_path)
    assert r.returncode == 0 and "complete -r aitrain" in r.stdout
    r = run_aitrain(["launch", "-sc", "install=tcsh"], tmp_path)
    assert r.returncode == 2 and "no shell completion for 'tcsh'" in r.stderr and "Traceback" not in r.stderr


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.mark.skipif(not (BIN / "aitrain").exists(), reason="no aitrain console script next to this python")
def test_bash_completes_through_the_installed_script(tmp_path: Path) -> None:
    # What bash does on Tab: COMP_LINE/COMP_CWORD set, the registered function called, COMPREPLY read.
    script = """
eval "$(aitrain launch -sc install=bash)"
complete -p aitrain
tab() { COMP_LINE="$1"; COMP_POINT=${#1}; COMP_CWORD=$2; _aitrain_completion; echo "${COMPREPLY[*]}"; }
tab "aitrain la" 1
tab "aitrain launch strat" 2
tab "aitrain launch strategy=f" 2
tab "aitrain launch dry_run=true train." 3
"""
    r = subprocess.run(["bash", "--norc", "-c", script], cwd=tmp_path, env=_env(), text=True,
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("-F _aitrain_completion aitrain")
    assert lines[1] == "launch"
    assert "strategy=" in lines[2].split()
    assert lines[3].split() == ["strategy=fsdp", "strategy=fsdp_tp", "strategy=fsdp_tp_pp"]
    assert "train.lr=" in lines[4].split()


@pytest.mark.skipif(shutil.which("zsh") is None or shutil.which("tmux") is None, reason="needs zsh and tmux")
@pytest.mark.skipif(not (BIN / "aitrain").exists(), reason="no aitrain console script next to this python")
def test_zsh_completes_on_tab(tmp_path: Path) -> None:
    # zsh completes only in an interactive line editor: a real zsh in tmux, a real Tab.
    session = f"aitrain-zsh-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", session]  # a server of its own: nobody else's sessions are touched
    (tmp_path / "home").mkdir()
    env = _env()
    env["HOME"] = str(tmp_path / "home")
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "200", "-y", "20", "zsh -f"],
                   cwd=tmp_path, env=env, check=True)
    try:
        def keys(*k: str) -> None:
            subprocess.run([*tmux, "send-keys", "-t", session, *k], check=True)

        def screen() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True,
                                  text=True, check=True).stdout

        # --hydra-help's line for zsh is `install=bash`: the one script works in both shells.
        keys('eval "$(aitrain launch -sc install=bash)" && clear', "Enter")
        def wait_for(text: str) -> str:
            deadline = time.monotonic() + 30
            while text not in screen() and time.monotonic() < deadline:
                time.sleep(0.3)
            return screen()

        keys("aitrain launch train.l", "Tab")  # the first Tab lists both keys
        text = wait_for("train.log_every=")
        assert "train.lr=" in text and "train.log_every=" in text, text
        keys("C-u", "aitrain launch strategy=fsdp_t", "Tab")  # the common part, then the choices
        wait_for("strategy=fsdp_tp\n")
        keys("Tab")
        text = wait_for("strategy=fsdp_tp_pp")
        assert "strategy=fsdp_tp " in text and "strategy=fsdp_tp_pp" in text, text
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


@pytest.mark.skipif(shutil.which("fish") is None, reason="needs fish")
@pytest.mark.skipif(not (BIN / "aitrain").exists(), reason="no aitrain console script next to this python")
def test_fish_completes_through_the_installed_script(tmp_path: Path) -> None:
    script = ('aitrain launch -sc install=fish | source; complete -C"aitrain la"; echo ---; '
              'complete -C"aitrain launch strategy=fsdp_"; echo ---; complete -C"aitrain launch train.l"')
    env = _env()
    env["HOME"] = str(tmp_path)
    r = subprocess.run(["fish", "--no-config", "-c", script], cwd=tmp_path, env=env, text=True,
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    commands, options, keys = (part.split() for part in r.stdout.split("---"))
    assert commands == ["launch"]
    assert options == ["strategy=fsdp_tp", "strategy=fsdp_tp_pp"]
    assert keys == ["train.log_every=", "train.lr="]
