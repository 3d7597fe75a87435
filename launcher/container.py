"""Ranks inside a container image: Podman, Pyxis/Enroot, Apptainer, Ray's ``image_uri``.

``container.image=IMAGE`` runs every rank inside the image. Where the container starts
depends on the runtime, and follows what each runtime's users already do:

- **podman** (local, and per node under Slurm): the node agent stays on the host and
  starts each rank as ``podman run --rm --init --network=host --ipc=host ... IMAGE PROGRAM``
  (:meth:`ContainerPlan.rank_argv`). The agent keeps doing what it does without a
  container: the rank streams, the exit clock, the teardown; ``podman run`` proxies the
  agent's SIGTERM to the rank through the init process, and the agent removes whatever is
  left of its containers by label when its ranks are gone (:func:`remove_containers`).
  The rank's trampoline runs on the host before ``podman run``: it joins the job's cgroup
  (the container's cgroup is made under it, ``--cgroup-parent``) and sets the CPU
  affinity, which the container inherits.
- **pyxis** (Slurm sites with Pyxis/Enroot): the container flags go on the ``srun`` that
  starts the node agents (:meth:`ContainerPlan.srun_flags`); agents and ranks run inside,
  so the image needs aitrain and torch (or mount a venv that has them, ``python=host``).
- **apptainer**: each rank as ``apptainer exec [--nv] --bind ... --pwd DIR IMAGE PROGRAM``.
- **ray**: the rank actors get ``runtime_env={"image_uri": IMAGE}`` (Ray runs them under
  Podman; the image needs the cluster's Ray and Python versions).

The fabric probe, check and tune run on the host, before any container: the probe reads
the host's ``/sys`` (RDMA devices, link states, NUMA) and its network, which ranks in a
``--network=host`` container share, and the image need not carry aitrain. The tuned env
reaches the ranks through ``--env NAME`` (Podman), the srun environment (Pyxis) or the
host environment (Apptainer's default).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aitrain.errors import ConfigError

RUNTIMES = ("auto", "podman", "pyxis", "apptainer")
LABEL = "aitrain.job"  # podman label on every rank container: <job id>.<node rank>
CONTAINER_ENV = "AITRAIN_CONTAINER"  # tells the rank trampoline its program is `podman run` (supervise.py)
# What torch's elastic agent gives every rank (local_elastic_agent.py), passed into the container by name.
TORCH_RANK_ENV = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
                  "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                  "TORCHELASTIC_*", "AITRAIN_*")
CHECK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Mount:
    src: str
    dst: str
    ro: bool = False

    @classmethod
    def parse(cls, text: str, base: Path) -> Mount:
        """``src:dst[:ro|rw]`` or ``path`` (the same path inside); a relative src is under ``base``."""
        parts = str(text).split(":")
        if len(parts) == 1:
            parts = [parts[0], parts[0]]
        ro = False
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            ro = parts[2] == "ro"
            parts = parts[:2]
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ConfigError(f"container.mounts: {text!r} is not SRC:DST[:ro]",
                              "e.g. container.mounts='[/data:/data:ro,/scratch]'")
        src = str((base / parts[0]).resolve()) if not os.path.isabs(parts[0]) else parts[0]
        if not os.path.isabs(parts[1]):
            raise ConfigError(f"container.mounts: {text!r}: the path inside the container must be absolute",
                              f"e.g. {src}:/data")
        if not os.path.exists(src):
            raise ConfigError(f"container.mounts: {src} does not exist on this host", "create it, or fix the path")
        return cls(src, parts[1], ro)

    def spec(self) -> str:
        return f"{self.src}:{self.dst}" + (":ro" if self.ro else "")


@dataclass
class ContainerPlan:
    """How the ranks of one job run in the image (see the module docstring)."""

    runtime: str  # podman | pyxis | apptainer | ray
    image: str
    python: str  # the interpreter inside the image that runs Python programs
    mounts: list[Mount] = field(default_factory=list)
    workdir: str = ""
    env: list[str] = field(default_factory=list)  # names (or PREFIX*) passed from the host
    job: str = ""  # label value of this job's containers
    gpus: bool = False  # NVIDIA GPUs here: CDI devices (podman), --nv (apptainer)
    rdma: bool = False  # /dev/infiniband here: the devices and an unlimited memlock (podman)
    reason: str = ""  # why this runtime (auto)

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "image": self.image, "python": self.python,
                "mounts": [m.spec() for m in self.mounts], "workdir": self.workdir, "env": list(self.env),
                "job": self.job, "gpus": self.gpus, "rdma": self.rdma}

    @property
    def wraps_ranks(self) -> bool:
        """Each rank's command is wrapped (podman, apptainer); pyxis and ray wrap elsewhere."""
        return self.runtime in ("podman", "apptainer")

    def program(self, argv: Sequence[str]) -> list[str]:
        """The rank program with this host's interpreter replaced by the image's."""
        argv = list(argv)
        if argv and argv[0] == sys.executable:
            argv[0] = self.python
        return argv

    def label(self, node_rank: int) -> str:
        return f"{LABEL}={self.job}.{node_rank}"

    def rank_argv(self, argv: Sequence[str], env_names: Iterable[str] = (), node_rank: int = 0) -> list[str]:
        """What each rank of node ``node_rank`` runs: the container command around ``argv``
        (already :meth:`program`). ``env_names``: the rank env set on the host (tuned env)."""
        if self.runtime == "podman":
            cmd = ["podman", "run", "--rm", "--init", "--network=host", "--ipc=host",
                   f"--label={self.label(node_rank)}"]
            if self.gpus:
                cmd.append("--device=nvidia.com/gpu=all")
            if self.rdma:
                cmd += ["--device=/dev/infiniband", "--ulimit=memlock=-1:-1"]
            cmd += [f"--volume={m.spec()}" for m in self.mounts]
            if self.workdir:
                cmd.append(f"--workdir={self.workdir}")
            names = list(dict.fromkeys([*TORCH_RANK_ENV, *sorted(env_names), *self.env]))
            globs = tuple(n[:-1] for n in names if n.endswith("*"))
            cmd += [f"--env={n}" for n in names if n.endswith("*") or not n.startswith(globs)]
            return [*cmd, self.image, *argv]
        if self.runtime == "apptainer":
            cmd = ["apptainer", "exec"] + (["--nv"] if self.gpus else [])
            if self.mounts:
                cmd.append("--bind=" + ",".join(m.spec() for m in self.mounts))
            if self.workdir:
                cmd.append(f"--pwd={self.workdir}")
            return [*cmd, self.image, *argv]  # the host environment passes through (Apptainer's default)
        return list(argv)

    def srun_flags(self) -> list[str]:
        """Pyxis's flags on the srun that starts the node agents."""
        if self.runtime != "pyxis":
            return []
        flags = [f"--container-image={self.image}"]
        if self.mounts:
            flags.append("--container-mounts=" + ",".join(
                f"{m.src}:{m.dst}" + (":ro" if m.ro else "") for m in self.mounts))
        if self.workdir:
            flags.append(f"--container-workdir={self.workdir}")
        flags.append("--no-container-mount-home")
        if self.env:
            flags.append("--container-env=" + ",".join(self.env))
        return flags

    def ray_runtime_env(self, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The rank actors' runtime_env: the job's, plus the image."""
        env = dict(base or {})
        if self.runtime == "ray":
            env["image_uri"] = self.image
        return env

    def describe(self) -> list[str]:
        lines = [f"container: {self.image} ({self.runtime}{'; ' + self.reason if self.reason else ''})"]
        if self.runtime == "pyxis":
            lines.append(f"    srun flags: {shlex.join(self.srun_flags())}")
        elif self.runtime == "ray":
            lines.append(f"    rank actors: runtime_env image_uri={self.image}")
        return lines


# -- planning ----------------------------------------------------------------------------


def _has_gpus() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def _cdi_nvidia() -> bool:
    """A CDI spec for NVIDIA GPUs (``nvidia-ctk cdi generate``), which ``--device nvidia.com/gpu=all`` needs."""
    for d in ("/etc/cdi", "/var/run/cdi"):
        try:
            if any(p.startswith("nvidia") for p in os.listdir(d)):
                return True
        except OSError:
            continue
    return False


def _host_python_mounts() -> list[Mount]:
    """``python=host``: this interpreter, its venv and aitrain's source (editable installs), read-only."""
    import aitrain

    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), sys.prefix, sys.base_prefix}
    src = Path(aitrain.__file__).resolve().parent.parent
    if not any(str(src).startswith(p + os.sep) for p in paths):
        paths.add(str(src))
    return [Mount(p, p, True) for p in sorted(paths)]


def _auto_runtime(backend: str) -> tuple[str, str]:
    if backend == "ray":
        return "ray", "the rank actors' runtime_env image_uri"
    if backend == "slurm" and _srun_has_pyxis():
        return "pyxis", "srun has --container-image"
    for name in ("podman", "apptainer"):
        if shutil.which(name):
            return name, f"{name} is installed"
    raise ConfigError(f"container.image is set, but no container runtime was found for backend={backend} "
                      "(podman, apptainer" + (", or srun with Pyxis" if backend == "slurm" else "") + ")",
                      "install podman (or apptainer), or set container.runtime=")


def _srun_has_pyxis() -> bool:
    if not shutil.which("srun"):
        return False
    try:
        out = subprocess.run(["srun", "--help"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--container-image" in out.stdout


def plan_container(cfg: Any, *, backend: str, run_dir: Path, launch_dir: Path, cwd: Path,
                   job: str, checkpoint_dir: str | None = None) -> ContainerPlan | None:
    """The container plan of a job, or None without ``container.image``. Checks the config
    only; :func:`check_ready` checks the runtime and the image where the ranks will run."""
    image = str(cfg.image or "").strip()
    if not image:
        return None
    runtime = str(cfg.runtime or "auto")
    if runtime not in RUNTIMES:
        raise ConfigError(f"container.runtime={runtime!r} is not one of {', '.join(RUNTIMES)}",
                          "container.runtime=auto picks Pyxis under Slurm where srun has it, else podman")
    reason = ""
    if backend == "ray":
        if runtime not in ("auto", "podman"):
            raise ConfigError(f"container.runtime={runtime} does not apply to backend=ray",
                              "Ray runs rank actors in an image with runtime_env image_uri (Podman underneath): "
                              "leave container.runtime=auto")
        runtime, reason = "ray", "the rank actors' runtime_env image_uri"
    elif runtime == "auto":
        runtime, reason = _auto_runtime(backend)
    elif runtime == "pyxis" and backend != "slurm":
        raise ConfigError(f"container.runtime=pyxis needs backend=slurm (it is srun's --container-image), "
                          f"not backend={backend}", "use container.runtime=podman or apptainer")
    python = str(cfg.python or "python3")
    mounts = [Mount(str(run_dir), str(run_dir)), Mount(str(launch_dir), str(launch_dir))]
    if checkpoint_dir:
        ckpt = Path(checkpoint_dir).expanduser()
        ckpt = ckpt if ckpt.is_absolute() else launch_dir / ckpt
        mounts.append(Mount(str(ckpt), str(ckpt)))  # made by the agent before the ranks start
    if python == "host":
        python = sys.executable
        mounts += _host_python_mounts()
    mounts += [Mount.parse(m, launch_dir) for m in (cfg.mounts or [])]
    seen: dict[str, Mount] = {}
    for m in mounts:  # one mount per destination: the user's own wins
        seen[m.dst] = m
    env = [str(n) for n in (cfg.env or [])]
    for n in env:
        if not n.rstrip("*").replace("_", "a").isalnum():
            raise ConfigError(f"container.env: {n!r} is not an environment variable name (or a PREFIX*)",
                              "container.env='[HF_TOKEN,WANDB_*]' passes these from the host")
    return ContainerPlan(runtime=runtime, image=image, python=python, mounts=list(seen.values()),
                         workdir=str(cfg.workdir or cwd), env=env, job=job,
                         gpus=_has_gpus() and (runtime != "podman" or _cdi_nvidia()),
                         rdma=os.path.isdir("/dev/infiniband"), reason=reason)


def job_label(name: str, run_dir: Path) -> str:
    return f"{name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"


# -- checks where the ranks will run --------------------------------------------------------


def _cache_file() -> Path:
    from aitrain.launcher.backends.api import state_dir

    return state_dir() / "container-checks.json"


def check_ready(plan: ContainerPlan, *, needs_aitrain: bool) -> None:
    """The runtime is installed, the image is there and its Python can run the job (imports
    torch, and aitrain for the built-in job); one ``aitrain: error:`` line otherwise. The
    image check is remembered per image id, interpreter and mounts (a second launch skips it).
    Pyxis and Ray images are fetched on the nodes: nothing to check here."""
    if plan.runtime not in ("podman", "apptainer"):
        return
    tool = plan.runtime
    if not shutil.which(tool):
        raise ConfigError(f"container.runtime={tool}: `{tool}` is not installed or not on PATH",
                          f"install {tool}, or choose another container.runtime")
    if tool == "podman":
        ident = _podman_image_id(plan.image)
    else:
        if "://" not in plan.image and not os.path.exists(plan.image):
            raise ConfigError(f"container.image={plan.image}: no such image file",
                              "give the path of a .sif file, or docker://IMAGE")
        ident = plan.image + (f"@{os.stat(plan.image).st_mtime_ns}" if os.path.exists(plan.image) else "")
    code = "import sys, torch" + (", aitrain.launcher.train" if needs_aitrain else "") + \
        "; print(sys.version.split()[0], torch.__version__)"
    key = json.dumps([tool, ident, plan.python, [m.spec() for m in plan.mounts], needs_aitrain])
    cache = _read_cache()
    if key in cache:
        return
    probe = ContainerPlan(runtime=tool, image=plan.image, python=plan.python, workdir="/", job="check",
                          mounts=[m for m in plan.mounts if os.path.exists(m.src)])  # the run dir is made later
    argv = probe.rank_argv([plan.python, "-c", code])
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"container.image={plan.image}: checking its Python took over {CHECK_TIMEOUT_S:.0f}s",
                          f"try it by hand: {shlex.join(argv)}") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or out.stdout.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        what = "torch, aitrain" if needs_aitrain else "torch"
        if "failed to exec" in out.stderr or "executable file not found" in out.stderr or out.returncode == 127:
            raise ConfigError(f"container.image={plan.image}: there is no {plan.python} in the image ({last})",
                              "set container.python= to the image's interpreter (e.g. python3.11, /opt/conda/bin/"
                              "python), or mount this host's environment with container.python=host")
        raise ConfigError(f"container.image={plan.image}: its Python cannot run the job: "
                          f"`{plan.python} -c 'import {what}'` failed: {last}",
                          f"use an image whose {plan.python} can import {what}, set container.python= to one "
                          "that can, or mount this host's environment with container.python=host")
    cache[key] = {"checked": time.time(), "versions": out.stdout.strip()}
    _write_cache(cache)


def _podman_image_id(image: str) -> str:
    try:
        out = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", image], capture_output=True,
                             text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError("`podman image inspect` did not answer in 60s", "check podman (podman info)") from None
    if out.returncode != 0:
        raise ConfigError(f"container.image={image}: no such image in podman's storage on this host",
                          f"pull or load it first (podman pull {image}; podman load/import for a file)")
    return out.stdout.strip()


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict[str, Any]) -> None:
    from aitrain.launcher.util import write_atomic

    try:
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        write_atomic(_cache_file(), json.dumps(cache))
    except OSError:
        pass  # only a cache


# -- what the node agents get ----------------------------------------------------------------


def agent_argv(spec: Any, env_names: Iterable[str], node_rank: int = 0) -> list[str]:
    """What the node agent of ``node_rank`` starts as each rank: the trampoline (on the host),
    the container command, the program."""
    from aitrain.launcher.supervise import trampoline_argv

    argv = list(spec.argv)
    plan: ContainerPlan | None = spec.container
    if plan is not None and plan.wraps_ranks:
        argv = plan.rank_argv(argv, env_names, node_rank)
    return trampoline_argv(argv) if spec.needs_trampoline else argv


def agent_container(spec: Any, node_rank: int = 0) -> dict[str, Any]:
    """The container facts the node agent acts on (AgentRequest.container)."""
    plan: ContainerPlan | None = spec.container
    if plan is None or not plan.wraps_ranks:
        return {}
    return {"runtime": plan.runtime, "label": plan.label(node_rank),
            "mkdirs": [m.src for m in plan.mounts if not m.ro]}


# -- on the node ---------------------------------------------------------------------------


def remove_containers(label: str, timeout: float = 30.0) -> list[str]:
    """Remove (kill first) every podman container carrying ``label``; their ids."""
    try:
        out = subprocess.run(["podman", "ps", "-aq", "--filter", f"label={label}"], capture_output=True,
                             text=True, timeout=timeout, check=False)
        ids = out.stdout.split()
        if ids:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *ids], capture_output=True, timeout=timeout,
                           check=False)
        return ids
    except (OSError, subprocess.TimeoutExpired):
        return []


def insert_cgroup_parent(args: list[str], proc_cgroup: str) -> list[str]:
    """``podman run`` of a rank that joined the job's cgroup: its container's cgroup is made
    under it (``--cgroup-parent``), so the job's limits and teardown cover the rank."""
    path = ""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1] == "memory":  # v1
            path = parts[2]
            break
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":  # v2
            path = parts[2]
    if not path or path == "/" or "run" not in args:
        return args
    i = args.index("run") + 1
    return [*args[:i], f"--cgroup-parent={path}", *args[i:]]
