"""Keep ranks from outliving their launcher.

torch's elastic agent starts each rank in its own session and kills the whole
process group on teardown. If the launcher itself is SIGKILLed (OOM killer,
``kill -9``), nothing would stop the ranks; so each rank is started through
this trampoline, which asks the kernel to SIGKILL it when its parent dies
(PR_SET_PDEATHSIG survives exec) and then execs the real program.

With ``binding``, ``resources.cgroup`` or ``profile`` set, it first applies the
rank's part of the node's plan (``AITRAIN_RANK_PLAN``, see ``resources.py``):
joins the job's cgroup, sets its CPU affinity and ``OMP_NUM_THREADS``, and runs
the program under ``perf stat``/``py-spy`` (``profiling.py``).

    python -m aitrain.launcher.supervise -- <program> [args...]
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def die_with_parent() -> None:
    """Arm PR_SET_PDEATHSIG in this process (a rank); exit if the parent is already gone."""
    parent = os.getppid()
    set_parent_death_signal()
    # In a rank's container (podman run --init) the parent is the container's init, pid 1.
    orphaned = parent == 1 and os.environ.get("AITRAIN_CONTAINER") != "podman"
    if orphaned or os.getppid() != parent:
        sys.exit(1)


def trampoline_argv(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "aitrain.launcher.supervise", "--", *argv]


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print("usage: python -m aitrain.launcher.supervise -- PROGRAM [ARGS...]", file=sys.stderr)
        sys.exit(2)
    parent = os.getppid()
    set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    umask = os.environ.pop("AITRAIN_USER_UMASK", "")  # util.USER_UMASK_ENV
    if umask.isdigit():  # the user's program creates files as under torchrun, not 077 like aitrain's
        os.umask(int(umask, 8))
    if "AITRAIN_RANK_PLAN" in os.environ:  # binding, cgroup, profiler: see launcher/resources.py
        from aitrain.launcher.resources import apply_rank_plan

        try:
            profile = apply_rank_plan()
        except OSError as e:
            print(f"aitrain: rank {os.environ.get('RANK', '?')}: cannot apply its resource plan: {e}",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        if profile is not None:
            from aitrain.launcher.profiling import run_profiled

            run_profiled(args, profile, int(os.environ.get("RANK", "0")))
    if os.environ.get("AITRAIN_CONTAINER") == "podman":  # container.CONTAINER_ENV: args is `podman run ...`
        args = _podman_rank(args)
    # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec: the
    # program gets them back at their defaults, as subprocess (and so torchrun) gives them.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    os.execvp(args[0], args)


def _podman_rank(args: list[str]) -> list[str]:
    """A rank's ``podman run``: on its parent's death it gets SIGTERM, which podman passes to the
    rank (a SIGKILLed podman would leave its container running); in the job's cgroup, its
    container's cgroup is made under it."""
    from aitrain.launcher.container import insert_cgroup_parent

    set_parent_death_signal(signal.SIGTERM)
    try:
        with open("/proc/self/cgroup") as f:
            own = f.read()
    except OSError:
        return args
    return insert_cgroup_parent(args, own) if "/aitrain/" in own else args


if __name__ == "__main__":
    main()
