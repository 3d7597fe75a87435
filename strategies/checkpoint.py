"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), resharded on load.

Layout under a checkpoint root (``checkpoint.dir``)::

    step-00000010/
        __0_0.distcp ...   tensor data, one file per writing rank (DCP)
        .metadata          DCP's index: every tensor's global shape and where its shards are
        COMPLETE           JSON {step, strategy, world_size, plan, time}; written last

Model and optimizer state are saved under their unsharded parameter names
(``layers.0.attention.wq.weight``, ``state.layers.0.attention.wq.weight.exp_avg``),
whatever the strategy, so a checkpoint written by FSDP on 2 ranks loads into DDP
on 4 (and back): DCP reads each rank's shard of each tensor from the files.

A directory is a checkpoint only once ``COMPLETE`` exists. It is written by rank
0 after every rank's data and the metadata are on disk, to a temporary name that
is fsynced and atomically renamed; a save killed at any point before leaves no
marker and ``latest()`` skips it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from aitrain.errors import ConfigError

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(root: str | os.PathLike[str], step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def is_complete(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and is_complete(d):
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root`` (half-written ones are skipped)."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(resume: str, root: str | os.PathLike[str]) -> Path | None:
    """``none`` -> None; ``auto`` -> latest complete under ``root`` (None when there is none);
    a path -> that checkpoint (or the latest complete one under it). A path that holds no
    complete checkpoint is an error."""
    if resume in ("", "none", "None", None):
        return None
    if resume == "auto":
        return latest(root)
    p = Path(resume).expanduser()
    if is_complete(p):
        return p
    if p.is_dir():
        found = latest(p)
        if found is not None:
            return found
    why = "does not exist" if not p.exists() else ("is an incomplete checkpoint (no COMPLETE marker: the save was "
                                                   "interrupted)" if _STEP_DIR.match(p.name)
                                                   else "holds no complete checkpoint")
    raise ConfigError(f"resume={resume}: {p} {why}",
                      "give a step-NNNNNNNN checkpoint directory or a checkpoint.dir holding one, "
                      "or resume=auto to start fresh when there is none")


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    state: dict[str, Any] = {"model": get_model_state_dict(model, options=opts)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=opts)
    return state


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every save/load without a process group that it assumes one process; it is."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: str | os.PathLike[str], step: int, model: nn.Module,
         optimizer: torch.optim.Optimizer | None = None, *, keep: int = 0,
         info: dict[str, Any] | None = None) -> Path:
    """Save model (and optimizer) state after ``step`` optimizer steps. Collective.

    ``keep`` > 0 removes the oldest complete checkpoints beyond that many (and stale
    incomplete ones older than this step); ``info`` goes into the COMPLETE marker.
    """
    import torch.distributed.checkpoint as dcp

    path = step_dir(root, step)
    if _rank() == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        if path.exists():  # a stale or interrupted save of the same step: never mix two saves
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path)
    _barrier()
    with _single_process_quiet():
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(path), no_dist=not dist.is_initialized())
    # dcp.save returns on every rank only after the coordinator wrote .metadata.
    _barrier()
    if _rank() == 0:
        marker = {"step": step, "time": time.time(),
                  "world_size": dist.get_world_size() if dist.is_initialized() else 1, **(info or {})}
        tmp = path / (MARKER + ".tmp")
        with open(tmp, "w") as f:
            json.dump(marker, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / MARKER)
        _fsync_dir(path)
        if keep > 0:
            _prune(Path(root), keep, step)
    _barrier()
    return path


def _prune(root: Path, keep: int, newest: int) -> None:
    complete = complete_checkpoints(root)
    for _, d in complete[:-keep]:
        (d / MARKER).unlink(missing_ok=True)  # un-complete first: a crash mid-delete leaves no "checkpoint"
        shutil.rmtree(d, ignore_errors=True)
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and int(m.group(1)) < newest and not is_complete(d):
            shutil.rmtree(d, ignore_errors=True)


def read_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The COMPLETE marker's content (step, strategy, world size, ...)."""
    return json.loads((Path(path) / MARKER).read_text())


def load(path: str | os.PathLike[str], model: nn.Module,
         optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a complete checkpoint into ``model`` (and ``optimizer``), resharding to this job's
    layout. Collective. Returns the marker's info (``step`` is the steps already taken)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    if not is_complete(path):
        raise ConfigError(f"{path} is not a complete checkpoint (no {MARKER} marker)",
                          "resume from a checkpoint whose save finished (resume=auto picks the latest one)")
    info = read_info(path)
    state = _state_dicts(model, optimizer)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    set_model_state_dict(model, state["model"], options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=opts)
    return info
