"""``aitrain launch``: Hydra composes the job, a backend plans and runs it.

Everything after ``launch`` is Hydra's command line (overrides, ``-m``, ``--cfg job``,
``--help``), plus ``--json``. Two things happen before Hydra sees it:

* ``+group=option`` for a group that is already in the defaults list
  (``+strategy=fsdp``, what users type) becomes ``group=option``; Hydra alone
  would fail with "Multiple values for strategy".
* every ``key=value`` is checked against the typed schema, so a misspelt key
  fails at once with the valid keys listed.

Then, for each job: :func:`~aitrain.launcher.job.plan_job` (the frozen spec), the backend's
``dryrun`` (the request), and either the plan printed (``dry_run=true``; composed without
a Hydra run, so nothing is written anywhere), the job handed to a scheduler (``submit``:
sbatch, the Ray Jobs API), or the job run here (:func:`~aitrain.launcher.driver.run_job`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aitrain.errors import AitrainError, ConfigError
from aitrain.launcher.config import (
    CONFIG_MODULE,
    DEFAULT_GROUPS,
    FREE_FORM,
    register_configs,
    to_job_config,
    validate_overrides,
)
from aitrain.launcher.redact import redact_text

if TYPE_CHECKING:
    from aitrain.launcher.backends.api import Backend, Request
    from aitrain.launcher.job import JobSpec

_ADD_GROUP = re.compile(r"^\+({})=".format("|".join(DEFAULT_GROUPS)))
_FREE_FORM_KEY = re.compile(r"^({})\.[^=]+=".format("|".join(re.escape(p) for p in FREE_FORM)))

_options = {"json": False}  # `--json`: the launch's result as one JSON object (last line of stdout)


def normalize_overrides(argv: list[str]) -> list[str]:
    """``+strategy=fsdp`` -> ``strategy=fsdp`` for groups in the defaults list, and
    ``fabric.env.X=v`` -> ``++fabric.env.X=v`` (free-form maps: add or override)."""
    out = []
    for a in argv:
        a = _ADD_GROUP.sub(r"\1=", a)
        if _FREE_FORM_KEY.match(a):
            a = "++" + a
        out.append(a)
    return out


def _quote_rank_list(arg: str) -> str:
    """``log.ranks=0,3`` -> ``log.ranks='0,3'`` (Hydra would read the comma as a sweep)."""
    key, sep, value = arg.partition("=")
    if sep and key.lstrip("+~") == "log.ranks" and "," in value and value[:1] not in "'\"[":
        return f"{key}='{value}'"
    return arg


_NO_AGENT_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "--info", "--resolve", "-i"}


def _will_start_local_ranks(argv: list[str]) -> bool:
    """Cheap guess, before any parsing, whether this launch will run ranks locally."""
    if any(a in _NO_AGENT_FLAGS or a.startswith(("--cfg=", "--info=")) for a in argv):
        return False
    for a in argv:
        key, _, value = a.lstrip("+~").partition("=")
        if key == "dry_run" and value.lower() in ("true", "1", "yes"):
            return False
        if key == "backend" and value != "local":
            return False
    return True


def run_launch(argv: list[str]) -> int:
    from aitrain.launcher import agent
    from aitrain.launcher.program import program_overrides, quote_script_args, split_program
    from aitrain.launcher.redact import restore_secrets
    from aitrain.launcher.util import private_umask

    # The run dir and all in it, the user's only: before Hydra makes it and the node agent starts.
    private_umask()
    argv = restore_secrets(argv)  # a re-run's secret arguments, passed in its environment (redact.py)
    argv, program = split_program(argv)  # torchrun's shape: `-- train.py ARGS` / `-- -m pkg.mod ARGS`
    _options["json"] = "--json" in argv
    argv = [quote_script_args(_quote_rank_list(a)) for a in normalize_overrides([a for a in argv if a != "--json"])]
    if program is not None:
        argv += program_overrides(program)
    if _will_start_local_ranks(argv):
        # Let the node agent import torch on the other core while Hydra composes.
        agent.prespawn()
    try:
        return _run_launch(argv)
    finally:
        agent.discard_prespawned()


def _run_launch(argv: list[str]) -> int:
    from hydra._internal.utils import get_args_parser

    ns = get_args_parser().parse_args(argv)
    if ns.shell_completion:
        return _shell_completion(ns)
    if not (ns.help or ns.hydra_help):
        _check_modes(ns)
        validate_overrides(list(ns.overrides), config_dir=ns.config_dir, config_name=ns.config_name)
    register_configs()
    if ns.help and not (ns.hydra_help or ns.config_path or ns.config_name or ns.config_dir or ns.multirun):
        print(app_help(list(ns.overrides)), end="")
        return 0
    if _plain(ns) and _dry_run_requested(ns.overrides):
        return _dry_run(list(ns.overrides), multirun=bool(ns.multirun))
    with _resolving_before_sanitizing(bool(ns.cfg and ns.resolve)):
        _hydra_main(argv)
    return 0


def _check_modes(ns: Any) -> None:
    """Hydra's own checks of its flags, which it raises outside its error report (a traceback)."""
    if ns.resolve and ns.cfg is None:
        raise ConfigError("--resolve works only with --cfg or --help", "aitrain launch --cfg job --resolve")
    modes = [flag for flag, on in (("--run", ns.run), ("--multirun", ns.multirun), ("--cfg", ns.cfg is not None),
                                   ("--info", ns.info is not None)) if on]
    if len(modes) > 1:
        raise ConfigError(f"only one of --run, --multirun, --cfg, --info and --shell-completion can be given, "
                          f"got {' and '.join(modes)}",
                          "--cfg job prints one job's config; `aitrain launch -m ... dry_run=true` prints each "
                          "job of a sweep")


@contextmanager
def _resolving_before_sanitizing(on: bool) -> Iterator[None]:
    """``--cfg hydra --resolve``: resolve the whole config before Hydra strips the job's keys from
    it; aitrain's ``hydra.run.dir`` is ``${run_root}/...``, which plain Hydra would then fail to
    resolve (InterpolationKeyError on ``run_root``). ``--cfg job|all`` print the same either way."""
    if not on:
        yield
        return
    from hydra._internal.hydra import Hydra
    from omegaconf import OmegaConf, flag_override

    sanitize = Hydra.get_sanitized_cfg

    def resolved_then_sanitized(self: Any, cfg: Any, cfg_type: str) -> Any:
        with flag_override(cfg, ["struct", "readonly"], [False, False]):
            OmegaConf.resolve(cfg)
        return sanitize(self, cfg, cfg_type)

    Hydra.get_sanitized_cfg = resolved_then_sanitized  # type: ignore[method-assign]
    try:
        yield
    finally:
        Hydra.get_sanitized_cfg = sanitize  # type: ignore[method-assign]


# `aitrain launch -sc install=bash|zsh|fish`: Hydra's completion scripts, calling back
# `aitrain launch -sc query=SHELL` (Hydra's own would call back `aitrain -sc ...`, which is not
# the launch command, and register themselves for a program named after sys.argv[0]).
_BASH_SCRIPT = """_aitrain_completion()
{
    local words=($COMP_LINE)
    local word=${words[$COMP_CWORD]}
    if (( COMP_CWORD == 1 )); then
        COMPREPLY=($(compgen -W "%(commands)s" -- "$word"))
        return
    fi
    if [ "${words[1]}" != "launch" ]; then
        COMPREPLY=()
        return
    fi
    local choices
    choices=$(COMP_POINT=$COMP_POINT COMP_LINE=$COMP_LINE ${words[0]} launch -sc query=bash 2>/dev/null)
    if [ "$HYDRA_COMP_DEBUG" == "1" ]; then
        printf "\\nCOMP_LINE='$COMP_LINE'\\nWord='$word'\\nOutput suggestions:\\n"
        printf "\\t%%s\\n" ${choices[@]}
    fi
    COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "$word"))
}

COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _aitrain_completion aitrain
"""
# zsh: the bash script through bashcompinit (so --hydra-help's `install=bash` line works there too).
_ZSH_PREAMBLE = """if [ -n "${ZSH_VERSION:-}" ]; then
    (( $+functions[compdef] )) || { autoload -U +X compinit && compinit; }
    autoload -U +X bashcompinit && bashcompinit
fi
"""
_FISH_SCRIPT = """function _aitrain_completion
    set -lx COMP_LINE (commandline -cp)
    set -l parts (commandline -cpo)
    $parts[1] launch -sc query=fish 2>/dev/null
end
complete -c aitrain -e
complete -c aitrain -n __fish_use_subcommand -x -a '%(commands)s'
complete -c aitrain -n '__fish_seen_subcommand_from launch' -x -a '(_aitrain_completion)'
"""
_UNINSTALL = {"bash": "complete -r aitrain 2>/dev/null\nunset -f _aitrain_completion",
              "fish": "complete -c aitrain -e\nfunctions -e _aitrain_completion"}
_UNINSTALL["zsh"] = _UNINSTALL["bash"]


def _shell_completion(ns: Any) -> int:
    """``-sc install=SHELL`` / ``uninstall=SHELL`` print a script; ``-sc query=SHELL`` answers the
    installed script with Hydra's own completion plugin, for the line after ``aitrain launch``."""
    from aitrain.launcher.cli import SUBCOMMANDS

    command = dict(o.partition("=")[::2] for o in ns.overrides if "=" in o)
    for action in ("install", "uninstall", "query"):
        shell = command.get(action)
        if shell is None:
            continue
        if shell not in _UNINSTALL:
            raise ConfigError(f"no shell completion for '{shell}' (aitrain completes in bash, zsh and fish)",
                              'eval "$(aitrain launch -sc install=bash)"')
        commands = " ".join(SUBCOMMANDS)
        if action == "install" and shell == "fish":
            print(_FISH_SCRIPT % {"commands": commands}, end="")
        elif action == "install":
            print(_ZSH_PREAMBLE + _BASH_SCRIPT % {"commands": commands}, end="")
        elif action == "uninstall":
            print(_UNINSTALL[shell])
        else:
            return _completion_query(shell)
        return 0
    raise ConfigError(f"-sc/--shell-completion expects install=SHELL, uninstall=SHELL or query=SHELL, "
                      f"got {' '.join(ns.overrides) or 'nothing'}", 'eval "$(aitrain launch -sc install=bash)"')


def _completion_query(shell: str) -> int:
    """Hydra's answer for ``COMP_LINE`` (``aitrain launch [ARGS] WORD``): the line without
    ``launch``, aitrain's ``+strategy=``-style overrides rewritten as for a launch, and Hydra
    run with the line's ``--config-dir``/``--config-name`` so the user's groups complete too."""
    from hydra._internal.utils import get_args_parser

    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    current = "" if not words or line[-1:].isspace() else words.pop()  # the word being completed
    typed = words[2:]  # after `aitrain launch`
    if "--" in typed:  # the user's program and its arguments: nothing of Hydra's
        return 0
    os.environ["COMP_LINE"] = " ".join(["aitrain", *normalize_overrides(typed), current])
    hydra_args = ["-sc", f"query={shell}"]
    try:
        line_ns = get_args_parser().parse_args(typed)
        if line_ns.config_dir:
            hydra_args = ["--config-dir", line_ns.config_dir, *hydra_args]
        if line_ns.config_name:
            hydra_args = ["--config-name", line_ns.config_name, *hydra_args]
    except SystemExit:  # not yet a valid command line: complete against aitrain's configs
        pass
    register_configs()
    _hydra_main(hydra_args)
    return 0


def app_help(overrides: list[str]) -> str:
    """``aitrain launch --help``, as Hydra renders it (the help template, the app's config groups,
    the composed config), without Hydra listing every one of its own groups and options twice
    (two thirds of a second-long help)."""
    import string

    from hydra import compose
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf, open_dict

    with composing():
        try:
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        except Exception as e:
            raise usage_error(e) from e
        template = str(cfg.hydra.help.template)
        with open_dict(cfg):
            del cfg["hydra"]
    groups: dict[str, set[str]] = {}
    from importlib.resources import files

    root = files(CONFIG_MODULE)
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith(("_", ".")):
            options = {f.name[:-5] for f in d.iterdir() if f.name.endswith(".yaml")}
            if options:
                groups.setdefault(d.name, set()).update(options)
    for group, node in ConfigStore.instance().repo.items():
        if isinstance(node, dict) and not group.startswith("hydra") and group not in ("_dummy_empty_config_",):
            groups.setdefault(group, set()).update(n[:-5] for n in node if n.endswith(".yaml"))
    listing = "".join(f"{g}: {', '.join(sorted(o))}\n" for g, o in sorted(groups.items()))
    return string.Template(template).safe_substitute(APP_CONFIG_GROUPS=listing, CONFIG=OmegaConf.to_yaml(cfg)) + "\n"


def _plain(ns: Any) -> bool:
    """A launch of jobs (not --help, --cfg, --info or shell completion)."""
    return not (ns.help or ns.hydra_help or ns.cfg or ns.info or ns.shell_completion or ns.config_path
                or ns.config_name or ns.config_dir or ns.experimental_rerun)


def _dry_run_requested(overrides: Sequence[str]) -> bool:
    value = None
    for o in overrides:
        key, sep, v = o.lstrip("+~").partition("=")
        if sep and key == "dry_run":
            value = v.strip().lower()
    return value in ("true", "1", "yes", "on")


def _hydra_main(argv: list[str]) -> None:
    import hydra
    import hydra._internal.utils as hydra_utils

    started = []

    @hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")
    def _task(cfg: Any) -> float | None:
        from aitrain.launcher.redact import redact_hydra_output

        started.append(True)
        redact_hydra_output()  # Hydra saved the overrides and config as given, secrets too
        try:
            from aitrain.launcher.sweep import current_sweep

            sweep = current_sweep()  # read once: the job's name and parent run, then its result
            code = launch(cfg, sweep=sweep)
            value = sweep_value(cfg, code, sweep)
        except AitrainError as e:
            print(f"aitrain: error: {redact_text(str(e))}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code) from None
        if code:
            raise SystemExit(code)
        return value

    # Hydra reports what fails before the job starts (a wrong type, an unknown option of a
    # group, a run dir it cannot create) in its own format with exit code 1; aitrain's usage
    # errors are one `aitrain: error:` line, a HINT and exit code 2, whoever found them.
    hydra_report = hydra_utils.run_and_report

    def report(func: Any) -> Any:
        try:
            return func()
        except Exception as e:
            failure = e
            if started or os.environ.get("HYDRA_FULL_ERROR") == "1":  # the job's own errors: Hydra's report
                return hydra_report(lambda: _raise(failure))
            error = usage_error(failure)
            print(f"aitrain: error: {redact_text(str(error))}", file=sys.stderr, flush=True)
            raise SystemExit(error.exit_code) from None

    saved = sys.argv
    sys.argv = ["aitrain launch", *argv]
    hydra_utils.run_and_report = report
    try:
        _task()
    finally:
        sys.argv = saved
        hydra_utils.run_and_report = hydra_report


_submitted: dict[str, Any] = {}  # the job launch() last handed to a scheduler (a sweep's trial waits for it)


def sweep_value(cfg: Any, code: int, sweep: dict[str, Any] | None) -> float | None:
    """In a sweep (``sweep``: :func:`~aitrain.launcher.sweep.current_sweep`), this job's
    ``sweep.objective`` (what Hydra's sweeper optimises), recorded for the sweep's parent run;
    None outside a sweep or for a dry run. A job handed to a
    scheduler is waited for only under an optimising sweeper (which needs its value); under
    Hydra's basic sweeper the sweep submits every job without waiting."""
    from hydra.core.hydra_config import HydraConfig

    from aitrain.launcher.sweep import objective, record_result, record_submitted, wait_for_job
    from aitrain.launcher.tracking import resolve_tracking_uri

    submitted, run_dir = dict(_submitted), Path(str(cfg.run_dir))
    _submitted.clear()
    if sweep is None or cfg.dry_run:
        return None
    if submitted:
        if "BasicSweeper" in str(HydraConfig.get().sweeper.get("_target_", "")):
            record_submitted(sweep["dir"], int(HydraConfig.get().job.num), _task_overrides(),
                             Path(submitted["run_dir"]), submitted["handle"])
            return None
        code, run_dir = wait_for_job(submitted["backend"], submitted["handle"], Path(submitted["run_dir"]))
        if code:  # a failed trial (Hydra records it as this job's failure; the sweeper goes on)
            record_result(sweep["dir"], int(HydraConfig.get().job.num), _task_overrides(), None, run_dir,
                          submitted["handle"])
            raise RuntimeError(f"{submitted['handle']} failed (exit {code}); see aitrain logs {submitted['handle']}")
    if not (run_dir / "outcome.json").exists():
        return None
    uri = resolve_tracking_uri(cfg.tracking.uri, Path(str(cfg.run_root))) if cfg.tracking.enabled else None
    num = int(HydraConfig.get().job.num)
    if code:
        record_result(sweep["dir"], num, _task_overrides(), None, run_dir)
        return None
    value = objective(run_dir, str(cfg.sweep.objective), str(cfg.sweep.objective_mode), uri)
    record_result(sweep["dir"], num, _task_overrides(), value, run_dir, submitted.get("handle"))
    return value


def _raise(e: BaseException) -> Any:
    raise e


def usage_error(e: BaseException) -> AitrainError:
    """What Hydra or OmegaConf refused before the job started, as aitrain's one-line error."""
    from hydra.errors import HydraException

    if isinstance(e, AitrainError):
        return e
    if isinstance(e, OSError) and not isinstance(e, HydraException):
        import errno

        from aitrain.launcher.util import os_error_text

        where = f" {e.filename}" if e.filename else ""
        what = f"cannot create the run directory{where}: {os_error_text(e)}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return ConfigError(what, f"free space there (df -h {e.filename or '.'}), or set run_root= to "
                                     "a directory on another filesystem")
        return ConfigError(what, "set run_root= (or hydra.run.dir=) to a directory you can write")
    text = str(e).split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 2 and lines[1].startswith("Available options"):  # a group's options, one per line
        lines = [lines[0], f"{lines[1]} {', '.join(lines[2:])}"]
    cause = e.__cause__
    if cause is not None and str(cause).strip() and not any(str(cause).strip().splitlines()[0] in x for x in lines):
        lines.append(str(cause).strip().splitlines()[0])
    text = "; ".join(lines[:3]) or type(e).__name__
    unknown = re.search(r"In '([^']+)': ConfigKeyError.*Key '[^']+' not in '(\w+)'.*full_key: (\S+)", text)
    if unknown:  # a user's config file (an `@package _global_` experiment) sets a key the schema lacks
        where, schema, key = unknown.groups()
        package = (f"a file in {where.split('/')[0]}/ sets keys under '{key}' unless its first line is "
                   "`# @package _global_`; " if key == where.split("/")[0] else "")
        return ConfigError(f"cannot compose the job: '{where}' sets '{key}', which is not a key of {schema}: "
                           "the config schema is closed (every key is typed in JobConfig)",
                           f"{package}remove '{key}' from {where}.yaml or fix its spelling (`aitrain launch --cfg "
                           f"job` prints every key); free-form keys go under {', '.join(FREE_FORM)}")
    text = re.sub(r"\w+ raised while composing config:;? ?", "", text)
    return ConfigError(f"cannot compose the job: {text}",
                       "`aitrain launch --help` lists the groups, their options and every key with its type")


# -- composing without a Hydra run (dry runs, aitrain.submit) ---------------------------------


@contextmanager
def composing() -> Iterator[None]:
    """Hydra's compose API over aitrain's configs (no run dir, no logging set up)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3", job_name="aitrain"):
        yield


def compose_job(overrides: Sequence[str], *, sweep_num: int | None = None) -> Any:
    """One job's config, as ``aitrain launch`` composes it, with ``run_dir`` resolved to where
    Hydra would put it (``hydra.run.dir``, or the sweep's ``dir/subdir`` for job ``sweep_num``).
    Call inside :func:`composing`."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    try:
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    except AitrainError:
        raise
    except Exception as e:  # hydra's ConfigCompositionException, MissingConfigException ...
        raise usage_error(e) from e
    with open_dict(cfg):
        if sweep_num is not None:
            cfg.hydra.job.num = sweep_num
            out = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        else:
            out = Path(str(cfg.hydra.run.dir))
        cfg.hydra.runtime.output_dir = str(out.absolute())
        cfg.hydra.overrides.task = list(overrides)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def sweep_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs of a ``-m`` sweep as Hydra's basic sweeper makes them (one override list each)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    try:
        return [list(job) for job in BasicSweeper.split_arguments(parsed, None)[0]]
    except Exception as e:  # a sweep only its own sweeper can expand (interval(), tag(), ...)
        raise ConfigError(f"cannot expand this sweep for a dry run: {e}",
                          "dry-run one job of it without -m, with the values spelled out") from e


def _dry_run(overrides: list[str], *, multirun: bool) -> int:
    from aitrain.launcher.sweep import current_sweep

    jobs = sweep_jobs(overrides) if multirun else [overrides]
    with composing():
        for num, job_overrides in enumerate(jobs):
            try:
                cfg = compose_job(job_overrides, sweep_num=num if multirun else None)
                code = launch(cfg, overrides=job_overrides, sweep=current_sweep())
            except AitrainError as e:
                print(f"aitrain: error: {redact_text(str(e))}", file=sys.stderr, flush=True)
                return e.exit_code
            if code:
                return code
    return 0


# -- one job ------------------------------------------------------------------------------------


def _task_overrides() -> list[str]:
    """This job's overrides as the user gave them (one job of a multirun: its own values)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra run (tests calling launch directly)
        return []


def _launch_dir() -> tuple[Path, bool]:
    """(the directory ``aitrain launch`` ran in, whether Hydra changes into the run dir)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        hc = HydraConfig.get()
        return Path(str(hc.runtime.cwd or Path.cwd())), bool(hc.job.chdir)
    except ValueError:  # not inside a Hydra run or compose (tests calling launch directly)
        return Path.cwd(), False


# Paths the user types relative to where they launch; with hydra.job.chdir=true they are made
# absolute, so the launcher (now in the run dir) and the ranks read what the user meant.
_LAUNCH_RELATIVE = ("run_root", "checkpoint.dir", "resume", "script")


def _anchor_paths(cfg: Any, launch_dir: Path) -> None:
    from omegaconf import OmegaConf

    for key in _LAUNCH_RELATIVE:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, str) or not value or value in ("none", "auto") or Path(value).is_absolute():
            continue
        if key != "script" or (launch_dir / value).exists():
            OmegaConf.update(cfg, key, str(launch_dir / Path(value).expanduser()))


def plan(cfg: Any, overrides: Sequence[str] | None = None) -> tuple[Backend, Request]:
    """(backend, request) for one composed job: planned once, dry-run by its backend."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from aitrain.launcher.backends import get_backend
    from aitrain.launcher.job import plan_job

    launch_dir, chdir = _launch_dir()
    try:
        if chdir:
            _anchor_paths(cfg, launch_dir)
        job = to_job_config(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:  # an interpolation that resolves to the wrong type, ...
        raise usage_error(e) from e
    backend = get_backend(job.backend)
    assert isinstance(resolved, dict)
    spec = plan_job(job, resolved={str(k): v for k, v in resolved.items()},
                    config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
                    overrides=_task_overrides() if overrides is None else overrides, backend=backend,
                    launch_dir=launch_dir, chdir=chdir)
    return backend, backend.dryrun(spec)


def launch(cfg: Any, *, overrides: Sequence[str] | None = None, sweep: dict[str, Any] | None = None) -> int:
    """Plan one composed job and print it, submit it, or run it here (a multirun calls this per
    job, with the ``sweep`` it belongs to: :func:`~aitrain.launcher.sweep.current_sweep`)."""
    from aitrain.launcher.program import hydra_quote
    from aitrain.launcher.sweep import child_run_name

    if sweep is not None:
        # A sweep's job: named after its overrides (unique across sweeps), under the sweep's run.
        # Set as overrides too, so a job submitted to a cluster (sbatch, the Jobs API) gets them.
        overrides = list(_task_overrides() if overrides is None else overrides)
        if not cfg.tracking.run_name:
            cfg.tracking.run_name = child_run_name(overrides, sweep)
            overrides.append(f"tracking.run_name={hydra_quote(cfg.tracking.run_name)}")
        if sweep.get("parent_run_id") and not cfg.tracking.parent_run_id:
            cfg.tracking.parent_run_id = sweep["parent_run_id"]
            overrides.append(f"tracking.parent_run_id={sweep['parent_run_id']}")
    backend, request = plan(cfg, overrides)
    spec = request.spec
    if spec.config.dry_run:
        _print_plan(spec, request)
        return 0
    if request.remote:
        # From a login node / outside the cluster: hand the job to the scheduler; it runs
        # `aitrain launch` again where it starts, which does the tracking.
        handle = backend.submit(request)
        _submitted.update(backend=backend, handle=handle, run_dir=spec.run_dir)
        if _options["json"]:
            print(json.dumps({"handle": handle, "backend": backend.name, "run_dir": str(spec.run_dir),
                              "state": "PENDING", "mlflow_run_id": None}), flush=True)
        else:
            print(f"aitrain: submitted {handle}\n"
                  f"  aitrain status {handle}\n  aitrain logs {handle} --follow\n  aitrain cancel {handle}",
                  flush=True)
        return 0
    from aitrain.launcher.driver import run_job
    from aitrain.launcher.redact import redact_uri

    result = run_job(backend, request)
    outcome = result.outcome
    if outcome.state.value == "SUCCEEDED":
        print(f"aitrain: job finished in {result.seconds:.1f}s; run dir {spec.run_dir}"
              + (f"; MLflow run {result.mlflow_run_id} at {redact_uri(result.mlflow_uri or '')}"
                 if result.mlflow_run_id else ""), flush=True)
    elif outcome.state.value != "PREEMPTED":  # a preempted job was requeued: the next attempt goes on
        hint = f"\nHINT: {outcome.hint}" if outcome.hint else ""
        print(redact_text(f"aitrain: error: {outcome.message}{hint}"), file=sys.stderr, flush=True)
    if _options["json"]:  # the last line of stdout
        print(json.dumps({"handle": result.handle, "backend": backend.name, "run_dir": str(spec.run_dir),
                          "state": outcome.state.value, "exit_code": outcome.exit_code,
                          "mlflow_run_id": result.mlflow_run_id,
                          "failures": [f.to_dict() for f in outcome.failures]}), flush=True)
    if outcome.state.value in ("SUCCEEDED", "PREEMPTED"):
        return 0
    return outcome.exit_code or 1


def _print_plan(spec: JobSpec, request: Request) -> None:
    from omegaconf import OmegaConf

    from aitrain.launcher.redact import known_secrets, redact_argv, redact_obj, scrub

    # Each part redacts itself; the values seen in the command and env are scrubbed from the
    # whole text too, so a part that shows one some other way still does not print it.
    secrets = known_secrets([*spec.relaunch, *spec.argv], spec.env, dict(spec.resolved))
    if _options["json"]:
        print(json.dumps({"dry_run": True, "run_dir": str(spec.run_dir), "backend": spec.config.backend.name,
                          "plan": scrub(str(request), secrets),
                          "relaunch": [scrub(a, secrets) for a in redact_argv(list(spec.relaunch))]}), flush=True)
        return
    print("# resolved config")
    print(scrub(OmegaConf.to_yaml(OmegaConf.create(redact_obj(dict(spec.resolved)))).rstrip(), secrets))
    print("\n# plan (dry run: nothing was started or written)")
    print(scrub(str(request), secrets), flush=True)
