"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), resharded on load.

Layout under a checkpoint root (``checkpoint.dir``)::

    step-00000010/
        __0_0.distcp ...   tensor data, one file per writing rank (DCP)
        .metadata          DCP's index: every tensor's global shape and where its shards are
        COMPLETE           JSON {step, strategy, world_size, plan, time, files}; written last

Model and optimizer state are saved under their unsharded parameter names
(``layers.0.attention.wq.weight``, ``state.layers.0.attention.wq.weight.exp_avg``),
whatever the strategy, so a checkpoint written by FSDP on 2 ranks loads into DDP
on 4 (and back): DCP reads each rank's shard of each tensor from the files.

A directory is a checkpoint only once ``COMPLETE`` exists. It is written by rank
0 after every rank's data and the metadata are on disk, to a temporary name that
is fsynced and atomically renamed; a save killed at any point before leaves no
marker and ``latest()`` skips it.

The marker also records every file's size and CRC-32 (``files``: name -> {size, crc32,
rank}). Each rank checksums the files it wrote right after writing them (they are still
in its page cache) and rank 0 gathers the results, so a save costs one extra read of each
rank's own data at memory speed (zlib's CRC-32 runs at about 4 GB/s on one core).
:func:`verify` checks a checkpoint against its marker, and :func:`resume_point` uses it:
``resume=auto`` passes over a damaged checkpoint (a truncated or altered file, a missing
``.metadata``, an empty marker) to the newest intact one and says why; a damaged checkpoint
named by path is an error. Markers written before they held checksums are checked for
what they can be: ``.metadata`` readable, every file it references there and long enough.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from aitrain.errors import ConfigError

MARKER = "COMPLETE"
METADATA = ".metadata"  # DCP's index (torch.distributed.checkpoint.filesystem)
_STEP_DIR = re.compile(r"^step-(\d+)$")
_WRITER = re.compile(r"^__(\d+)_")  # DCP's FileSystemWriter names rank r's files __<r>_<n>.distcp
_CHUNK = 8 << 20


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
    """The newest complete checkpoint under ``root`` (half-written ones are skipped; damaged
    ones are not: :func:`resume_point` verifies)."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


# -- verification ---------------------------------------------------------------------------


def file_crc32(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(bytes read, CRC-32 as 8 hex digits) of a file."""
    crc, size = 0, 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, f"{crc:08x}"


def _writer(name: str) -> int | None:
    m = _WRITER.match(name)
    return int(m.group(1)) if m else None


def _owner(name: str, world: int) -> int:
    """The rank that checksums a file at save time: its writer, else rank 0."""
    rank = _writer(name)
    return rank if rank is not None and rank < world else 0


def _what(name: str) -> str:
    """How a problem names a file: ``rank1 file __1_0.distcp``, ``.metadata``."""
    rank = _writer(name)
    return name if rank is None else f"rank{rank} file {name}"


def _read_marker(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(the marker's content, "") or (None, what is wrong with it)."""
    try:
        text = (path / MARKER).read_text()
    except FileNotFoundError:
        return None, f"no {MARKER} marker: the save was interrupted"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"its {MARKER} marker is unreadable: {type(e).__name__}: {e}"
    if not text.strip():
        return None, f"its {MARKER} marker is empty"
    try:
        info = json.loads(text)
    except ValueError as e:
        return None, f"its {MARKER} marker is not valid JSON: {e}"
    if not isinstance(info, dict) or not isinstance(info.get("step"), int):
        return None, f"its {MARKER} marker has no step"
    return info, ""


def _share(sizes: dict[str, int], index: int, count: int) -> set[str]:
    """The files process ``index`` of ``count`` checksums: largest first to the least loaded."""
    if count <= 1:
        return set(sizes)
    load = [0] * count
    mine = set()
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        k = min(range(count), key=lambda j: (load[j], j))
        load[k] += sizes[name]
        if k == index:
            mine.add(name)
    return mine


def _problems(path: Path, share: tuple[int, int] = (0, 1)) -> list[tuple[int, str]]:
    """(order, problem) for each thing wrong with the checkpoint at ``path``; checksums only
    for this process's ``share`` of the files (sizes for all of them)."""
    info, why = _read_marker(path)
    if info is None:
        return [(0, why)]
    files = info.get("files")
    if not isinstance(files, dict):
        return _problems_without_checksums(path)
    found: list[tuple[int, str]] = []
    if METADATA not in files and not (path / METADATA).is_file():
        found.append((1, f"{METADATA} is missing"))
    sizes = {name: int(rec.get("size", 0)) for name, rec in files.items()}
    mine = _share(sizes, *share)
    for order, name in enumerate(sorted(files), start=2):
        rec, what, want = files[name], _what(name), sizes[name]
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            found.append((order, f"{what} is missing"))
            continue
        if size < want:
            found.append((order, f"{what} truncated: {size} of {want} bytes"))
        elif size > want:
            found.append((order, f"{what} has {size} bytes, {want} expected"))
        elif name in mine and rec.get("crc32"):
            _, crc = file_crc32(path / name)
            if crc != rec["crc32"]:
                found.append((order, f"{what} fails its checksum: crc32 {crc}, {rec['crc32']} when saved"))
    return found


def _problems_without_checksums(path: Path) -> list[tuple[int, str]]:
    """A marker from before checksums: .metadata readable, every file it references long enough."""
    if not (path / METADATA).is_file():
        return [(1, f"{METADATA} is missing")]
    from torch.distributed.checkpoint import FileSystemReader

    ends: dict[str, int] = {}
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
        for item in storage.values():
            name = str(item.relative_path)
            ends[name] = max(ends.get(name, 0), int(item.offset) + int(item.length))
    except Exception as e:  # whatever unpickling a damaged file raises
        return [(1, f"{METADATA} is unreadable: {type(e).__name__}: {e}")]
    found = []
    for order, name in enumerate(sorted(ends), start=2):
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            found.append((order, f"{_what(name)} is missing"))
            continue
        if size < ends[name]:
            found.append((order, f"{_what(name)} truncated: {size} of at least {ends[name]} bytes"))
    return found


def verify(path: str | os.PathLike[str], *, collective: bool = False) -> list[str]:
    """What is wrong with the checkpoint at ``path`` ([] when it is intact), in file order.

    The marker, ``.metadata`` and every file's presence and size are checked by every
    process; with ``collective=True`` (all ranks call it) each rank checksums only its share
    of the files, by size, and the ranks exchange what they found (one ``all_gather_object``).
    """
    path = Path(path)
    if not (collective and dist.is_initialized()):
        return [text for _, text in sorted(_problems(path))]
    mine = _problems(path, (dist.get_rank(), dist.get_world_size()))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged = sorted({(int(order), str(text)) for part in everyone for order, text in part})
    return [text for _, text in merged]


@dataclass(frozen=True)
class ResumePoint:
    """Where a run resumes: ``path`` (None: from scratch) and the damaged checkpoints passed
    over to get there, newest first, each with the first thing wrong with it."""

    path: Path | None
    skipped: tuple[tuple[Path, str], ...] = ()


def _newest_intact(root: Path, collective: bool) -> ResumePoint:
    skipped: list[tuple[Path, str]] = []
    for _, d in reversed(complete_checkpoints(root)):
        problems = verify(d, collective=collective)
        if not problems:
            return ResumePoint(d, tuple(skipped))
        skipped.append((d, problems[0]))
    return ResumePoint(None, tuple(skipped))


def resume_point(resume: str | None, root: str | os.PathLike[str], *, collective: bool = False) -> ResumePoint:
    """``none`` -> from scratch; ``auto`` -> the newest intact checkpoint under ``root``, passing
    over damaged ones (from scratch when there is none); a path -> that checkpoint, or the
    newest intact one under it. A path that holds no intact checkpoint is an error.
    ``collective``: every rank calls this and they split the checksum reading (:func:`verify`)."""
    if resume in ("", "none", "None", None):
        return ResumePoint(None)
    if resume == "auto":
        return _newest_intact(Path(root), collective)
    p = Path(resume).expanduser()
    hint = ("resume=auto passes over damaged checkpoints to the newest intact one; or give an older "
            "step-NNNNNNNN directory")
    if is_complete(p):
        problems = verify(p, collective=collective)
        if problems:
            more = f"; {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
            raise ConfigError(f"resume={resume}: checkpoint {p} is damaged ({problems[0]}{more})", hint)
        return ResumePoint(p)
    if p.is_dir():
        point = _newest_intact(p, collective)
        if point.path is not None:
            return point
        if point.skipped:
            newest, why = point.skipped[0]
            raise ConfigError(f"resume={resume}: every checkpoint under {p} is damaged ({newest.name}: {why})", hint)
    why = "does not exist" if not p.exists() else ("is an incomplete checkpoint (no COMPLETE marker: the save was "
                                                   "interrupted)" if _STEP_DIR.match(p.name)
                                                   else "holds no complete checkpoint")
    raise ConfigError(f"resume={resume}: {p} {why}",
                      "give a step-NNNNNNNN checkpoint directory or a checkpoint.dir holding one, "
                      "or resume=auto to start fresh when there is none")


def resolve_resume(resume: str | None, root: str | os.PathLike[str]) -> Path | None:
    """The checkpoint :func:`resume_point` picks, verified by this process alone."""
    return resume_point(resume, root).path


# -- save and load ----------------------------------------------------------------------------


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


def _saved_files(path: Path, metadata: Any) -> list[str]:
    """The data files of a save just finished: those DCP's metadata references, else the directory's."""
    storage = getattr(metadata, "storage_data", None)
    if isinstance(storage, dict) and storage:
        return sorted({str(getattr(item, "relative_path", "")) for item in storage.values()} - {""})
    return sorted(p.name for p in path.iterdir() if p.is_file() and p.name not in (METADATA, MARKER))


def _checksums(path: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in names:
        size, crc = file_crc32(path / name)
        out[name] = {"size": size, "crc32": crc, "rank": _writer(name)}
    return out


def save(root: str | os.PathLike[str], step: int, model: nn.Module,
         optimizer: torch.optim.Optimizer | None = None, *, keep: int = 0,
         info: dict[str, Any] | None = None) -> Path:
    """Save model (and optimizer) state after ``step`` optimizer steps. Collective.

    ``keep`` > 0 removes the oldest complete checkpoints beyond that many (and stale
    incomplete ones older than this step); ``info`` goes into the COMPLETE marker.
    """
    import torch.distributed.checkpoint as dcp

    path = step_dir(root, step)
    rank = _rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        if path.exists():  # a stale or interrupted save of the same step: never mix two saves
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path)
    _barrier()
    with _single_process_quiet():
        metadata = dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(path),
                            no_dist=not dist.is_initialized())
    # dcp.save returns on every rank only after the coordinator wrote .metadata. Each rank
    # checksums the files it wrote (rank 0 also .metadata and any file of no rank's).
    names = _saved_files(path, metadata)
    mine = [n for n in names if _owner(n, world) == rank]
    if rank == 0:
        mine.append(METADATA)
    sums = _checksums(path, mine)
    gathered: list[Any] = [sums]
    if dist.is_initialized():
        gathered = [None] * world if rank == 0 else []
        dist.gather_object(sums, gathered if rank == 0 else None, dst=0)
    if rank == 0:
        files = {name: rec for part in gathered for name, rec in part.items()}
        marker = {"step": step, "time": time.time(), "world_size": world, **(info or {}),
                  "files": dict(sorted(files.items()))}
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
    """The COMPLETE marker's content (step, strategy, world size, files, ...)."""
    info, why = _read_marker(Path(path))
    if info is None:
        raise ConfigError(f"{path} is not a usable checkpoint: {why}",
                          "resume=auto passes over damaged checkpoints to the newest intact one")
    return info


def load(path: str | os.PathLike[str], model: nn.Module,
         optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a complete checkpoint into ``model`` (and ``optimizer``), resharding to this job's
    layout. Collective. Returns the marker's info (``step`` is the steps already taken).
    It does not verify the files: :func:`resume_point` and :func:`verify` do."""
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
