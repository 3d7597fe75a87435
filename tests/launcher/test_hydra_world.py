"""The override check knows Hydra's world (issue #15 item 1): the user's own config groups
(`--config-dir`, `hydra.searchpath`), `@package _global_` experiment files, Hydra's `hydra/*`
groups and installed `hydra_plugins`, while a typo still fails before anything starts with
the valid keys and groups listed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from aitrain.errors import ConfigError
from aitrain.launcher.config import hydra_groups, validate_overrides

from aitrain_testing import run_aitrain

FAST = """# @package _global_
defaults:
  - override /strategy: fsdp
train:
  lr: 0.01
  steps: 5
nproc_per_node: 1
"""

BAD = """# @package _global_
train:
  newkey: 1
"""

# A Hydra plugin package as pip installs one: a `hydra_plugins` namespace package whose modules
# Hydra imports when it scans for plugins; this one registers a launcher config and adds a
# config dir with an `experiment` group to the search path.
PLUGIN = '''
from dataclasses import dataclass

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin


@dataclass
class FakeLauncherConf:
    _target_: str = "hydra_plugins.aitrain_fake.FakeLauncher"
    workers: int = 3


ConfigStore.instance().store(group="hydra/launcher", name="fake", node=FakeLauncherConf, provider="fake")


class FakeSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="aitrain-fake", path="file://{conf}")
'''


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """A user's config dir: an experiment group (one good `@package _global_` file, one that
    sets a key the schema lacks) and a group named after a schema node."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "fast.yaml").write_text(FAST)
    (tmp_path / "conf" / "experiment" / "bad.yaml").write_text(BAD)
    (tmp_path / "conf" / "train").mkdir()
    (tmp_path / "conf" / "train" / "short.yaml").write_text("steps: 3\n")
    return tmp_path / "conf"


def test_experiment_from_config_dir_sets_global_keys(conf: Path, tmp_path: Path) -> None:
    r = run_aitrain(["launch", "-cd", str(conf), "+experiment=fast", "--cfg", "job"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "lr: 0.01" in r.stdout and "steps: 5" in r.stdout and "nproc_per_node: 1" in r.stdout
    assert "name: fsdp" in r.stdout  # the file's `override /strategy: fsdp`


def test_experiment_from_hydra_searchpath_and_own_group_of_a_schema_node(conf: Path, tmp_path: Path) -> None:
    r = run_aitrain(["launch", f"hydra.searchpath=[file://{conf}]", "+experiment=fast", "+train=short",
                     "--cfg", "job", "-p", "train"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "steps: 3" in r.stdout and "lr: 0.01" in r.stdout  # +train=short comes after the experiment


def test_hydra_logging_groups(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled", "--cfg", "hydra",
                     "-p", "hydra.job_logging"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "level: ERROR" in r.stdout and "disable_existing_loggers: true" in r.stdout


def test_installed_plugin_groups_and_search_path(tmp_path: Path) -> None:
    plugins = tmp_path / "site" / "hydra_plugins" / "aitrain_fake"
    plugins.mkdir(parents=True)
    extra = tmp_path / "plugin_conf" / "experiment"
    extra.mkdir(parents=True)
    (extra / "from_plugin.yaml").write_text("# @package _global_\ntrain:\n  steps: 11\n")
    (plugins / "__init__.py").write_text(PLUGIN.replace("{conf}", str(extra.parent)))
    env = {"PYTHONPATH": str(tmp_path / "site")}
    r = run_aitrain(["launch", "hydra/launcher=fake", "+experiment=from_plugin", "--cfg", "all", "--resolve"],
                    tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "_target_: hydra_plugins.aitrain_fake.FakeLauncher" in r.stdout and "steps: 11" in r.stdout


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # hydra_plugins itself is missing
        return False


@pytest.mark.skipif(not _installed("hydra_plugins.hydra_joblib_launcher"),
                    reason="hydra-joblib-launcher is not installed")
def test_joblib_launcher_plugin_is_a_group_option(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "--cfg", "hydra",
                     "-p", "hydra.launcher"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "JoblibLauncher" in r.stdout and "n_jobs: 2" in r.stdout


def test_unknown_option_of_a_users_group_is_hydras_list(conf: Path, tmp_path: Path) -> None:
    r = run_aitrain(["launch", "-cd", str(conf), "+experiment=fsat", "train.steps=1"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    first, hint = r.stderr.strip().splitlines()
    assert first.startswith("aitrain: error: ") and "Could not find 'experiment/fsat'" in first
    assert "Available options in 'experiment': bad, fast" in first and hint.startswith("HINT: ")
    assert not (tmp_path / "outputs").exists()  # nothing started, no run dir
    r = run_aitrain(["launch", "hydra/launcher=nope", "train.steps=1"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "Could not find 'hydra/launcher/nope'" in r.stderr and "Available options in 'hydra/launcher'" in r.stderr


def test_experiment_setting_a_key_the_schema_lacks_names_file_and_key(conf: Path, tmp_path: Path) -> None:
    r = run_aitrain(["launch", "-cd", str(conf), "+experiment=bad", "dry_run=true"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'experiment/bad' sets 'train.newkey'" in r.stderr and "schema is closed" in r.stderr
    assert "fabric.env" in r.stderr  # where free-form keys go


def test_own_group_without_global_package_says_so(conf: Path, tmp_path: Path) -> None:
    (conf / "db").mkdir()
    (conf / "db" / "mysql.yaml").write_text("host: localhost\n")
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\ntrain:\n  lr: fast\n")
    r = run_aitrain(["launch", "-cd", str(conf), "+db=mysql", "dry_run=true"], tmp_path)
    assert r.returncode == 2 and "'db/mysql' sets 'db', which is not a key of JobConfig" in r.stderr
    assert "unless its first line is `# @package _global_`" in r.stderr
    r = run_aitrain(["launch", "-cd", str(conf), "+experiment=typo", "--cfg", "job"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "In 'experiment/typo': Value 'fast' of type 'str' could not be converted to Float" in r.stderr


def test_group_without_its_config_dir_is_an_error_naming_groups_and_keys(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "+experiment=fast", "train.steps=1"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'experiment' is neither a config group nor a config key" in r.stderr
    assert "Config groups: backend, fabric, model, strategy, tracking" in r.stderr
    assert "--config-dir" in r.stderr
    assert not (tmp_path / "outputs").exists()


# In-process: the check itself (no Hydra run), as `aitrain launch` calls it.


def test_check_accepts_users_and_hydras_groups(conf: Path) -> None:
    validate_overrides(["+experiment=fast", "+train=short", "train.lr=1", "hydra/job_logging=disabled",
                        "hydra/hydra_logging=none", "hydra/launcher=basic", "hydra/sweeper=basic"],
                       config_dir=str(conf))
    validate_overrides([f"hydra.searchpath=[file://{conf}]", "+experiment=fast"])


def test_hydra_groups_are_what_hydra_sees(conf: Path) -> None:
    groups = hydra_groups(config_dir=str(conf))
    assert groups["experiment"] == ["bad", "fast"] and groups["strategy"][:2] == ["ddp", "fsdp"]
    assert {"disabled", "default"} <= set(groups["hydra/job_logging"]) and "basic" in groups["hydra/launcher"]
    assert "experiment" not in hydra_groups()


def test_misspelt_hydra_group_lists_the_groups() -> None:
    with pytest.raises(ConfigError) as e:
        validate_overrides(["hydra/job_loging=disabled"])
    assert "unknown config group 'hydra/job_loging'" in str(e.value)
    assert "hydra/job_logging" in e.value.message and "did you mean 'hydra/job_logging'" in str(e.value)


def test_adding_a_key_says_the_schema_is_closed_and_where_free_form_keys_go() -> None:
    with pytest.raises(ConfigError) as e:
        validate_overrides(["+train.newkey=1"])
    msg = str(e.value)
    assert "cannot add 'train.newkey': the config schema is closed" in msg
    assert "Valid keys there: global_batch_size" in msg and "fabric.env, backend.resources_per_worker" in msg
    validate_overrides(["+fabric.env.MY_VAR=1", "++backend.runtime_env.x=1"], config_dir=None)


def test_typo_still_names_the_valid_keys_and_the_groups() -> None:
    with pytest.raises(ConfigError) as e:
        validate_overrides(["nproc_per_nod=1"])
    assert "Valid keys there:" in str(e.value) and "did you mean 'nproc_per_node'" in str(e.value)
    assert "Config groups: backend, fabric, model, strategy, tracking." in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        validate_overrides(["train.lrr=1"])


def test_missing_config_dir_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config-dir .*no such directory"):
        validate_overrides(["+experiment=fast"], config_dir=str(tmp_path / "nope"))
