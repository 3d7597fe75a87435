"""Running a rank program in an interpreter that has already imported torch.

Two places start ranks that way: Ray's warm rank interpreter (``backends/ray/worker.py``:
started while the driver probes and tunes, it gets the program on stdin) and the node
agent's zygote (``zygote.py``: a fork server). Both run ``python [-u] -m MODULE ARGS`` or
``python [-u] SCRIPT ARGS`` as the fresh interpreter would, with the rank's env and working
directory, unless the rank's env changes what Python or torch read when they start
(:data:`STARTUP_VARS`): such a rank is started fresh.
"""

from __future__ import annotations

import os
import re
import sys

# What DDP/FSDP import on first use, in import order (torch._dynamo: about 1.5 s).
WARM_IMPORTS = ("torch", "torch.distributed", "torch._dynamo")

# Variables a Python or torch process reads when it starts (or imports torch): if the rank's
# final env changes one of them, the rank is started fresh instead of from the warm one.
STARTUP_VARS = re.compile(r"^(PYTHON\w*|LD_\w+|TORCH_CPP_LOG_LEVEL|TORCH_SHOW_CPP_STACKTRACES|TORCH_LOGS|"
                          r"MKL_\w+|KMP_\w+|GOMP_\w+|OMP_(?!NUM_THREADS$)\w+|MALLOC_\w+|PATH)$")


def warm_compatible(argv: list[str], before: dict[str, str], after: dict[str, str]) -> bool:
    """Whether ``argv`` can run in a warm interpreter started with env ``before``."""
    if len(argv) < 2 or argv[0] != sys.executable or not program_of(argv):
        return False
    # Both warm interpreters run programs unbuffered (Ray's is started with -u, the zygote's
    # children get unbuffered stdio): PYTHONUNBUFFERED is no start-up change for them.
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k) and k != "PYTHONUNBUFFERED"}
    return not any(STARTUP_VARS.match(k) for k in changed)


def program_of(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """(kind, target, args) of ``python [-u] (-m module | script) args...``, or None for anything else."""
    i = 1
    while i < len(argv) and argv[i] in ("-u",):
        i += 1
    if i >= len(argv):
        return None
    if argv[i] == "-m" and i + 1 < len(argv):
        return "module", argv[i + 1], argv[i + 2:]
    if argv[i].startswith("-"):
        return None
    return "script", argv[i], argv[i + 1:]


def run_here(argv: list[str], env: dict[str, str], cwd: str) -> int:
    """Become the rank ``argv`` would start (its env, cwd, ``sys.argv``) and run it in this
    interpreter; its exit code (a traceback from the program on, as ``python`` prints it).
    Anything but a Python program is exec'd."""
    import runpy
    import warnings

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if env.get("OMP_NUM_THREADS", "").isdigit() and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))  # torch read it at import
    prog = program_of(argv)
    if prog is None:
        os.execve(argv[0], argv, env)
    kind, target, args = prog
    sys.argv = [target, *args]
    sys.path[0] = os.getcwd() if kind == "module" else os.path.dirname(os.path.abspath(target))
    # The warm-up imported the module: runpy's "found in sys.modules" warning is expected here.
    warnings.filterwarnings("ignore", message=r".*found in sys\.modules after import of package",
                            category=RuntimeWarning)
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:  # what `python prog` prints: the traceback from the program on
        import traceback

        tb = e.__traceback__
        skip = {__file__, runpy.__file__, "<frozen runpy>"}
        while tb is not None and tb.tb_frame.f_code.co_filename in skip:
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb or e.__traceback__)
        return 1
    return 0
