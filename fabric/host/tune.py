"""``aitrain host tune``: plan the writes, apply them after saving what was there, revert exactly.

The state file holds, for every file written, the exact text to write back
(the raw sysctl text, or the selected word of a ``[choice]`` file). It is
written before the first change and kept until a revert has restored every
entry, so an interrupted apply can always be reverted. Applying twice keeps
the values from before the first apply.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aitrain.errors import FabricError
from aitrain.fabric.findings import Finding
from aitrain.fabric.host.check import (
    DEFAULT_RENDEZVOUS_PORTS,
    evaluate_rules,
    host_context,
    select_rule_ids,
    to_finding,
)
from aitrain.fabric.host.model import Status, WriteKind
from aitrain.fabric.host.readers import HostPaths, normalize, parse_selector, read_hostname, read_text

STATE_VERSION = 1


@dataclass(frozen=True)
class PlannedChange:
    """One file to write: ``current`` is what it holds now, ``value`` what tune writes."""

    id: str
    subject: str
    path: str
    current: str | None
    value: str
    kind: WriteKind = WriteKind.VALUE


@dataclass(frozen=True)
class TunePlan:
    """What ``host tune --apply`` would write, and what it leaves to the admin."""

    host: str
    changes: list[PlannedChange]
    manual: list[Finding]  # differs from the recommendation, no file tune may write


def as_value(raw: str, kind: WriteKind) -> str:
    """File text as it compares: normalized text, or the selected ``[choice]``."""
    return parse_selector(raw) if kind is WriteKind.SELECTOR else normalize(raw)


def read_value(path: str | Path, kind: WriteKind) -> str | None:
    raw = read_text(Path(path))
    return None if raw is None else as_value(raw, kind)


def plan_tune(
    paths: HostPaths | None = None,
    *,
    rdma: bool | None = None,
    rendezvous_ports: Iterable[int] = DEFAULT_RENDEZVOUS_PORTS,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
) -> TunePlan:
    """The writes that bring tunable settings to their recommendation; nothing is written.

    ``only``/``skip`` take finding ids (``host-numa-balancing``, ...).
    """
    paths = paths or HostPaths()
    ctx = host_context(paths, rdma=rdma, rendezvous_ports=rendezvous_ports)
    skipped = select_rule_ids(skip) or set()
    host = read_hostname(paths)
    changes: list[PlannedChange] = []
    manual: list[Finding] = []
    for item in evaluate_rules(ctx, only):
        if item.rule.id in skipped or item.verdict.status is not Status.CHANGE:
            continue
        if not item.verdict.writes:
            manual.append(to_finding(item, host))
        for w in item.verdict.writes:
            changes.append(PlannedChange(item.rule.id, item.rule.subject, w.path,
                                         read_value(w.path, w.kind), w.value, w.kind))
    return TunePlan(host, changes, manual)


@dataclass(frozen=True)
class StateEntry:
    """One saved value: writing ``previous`` to ``path`` restores it."""

    id: str
    subject: str
    path: str
    kind: WriteKind
    previous: str
    value: str

    def previous_value(self) -> str:
        return as_value(self.previous, self.kind)


@dataclass
class TuneResult:
    applied: list[PlannedChange] = field(default_factory=list)
    unchanged: list[PlannedChange] = field(default_factory=list)  # already at the value
    refused: list[tuple[PlannedChange, str]] = field(default_factory=list)
    state_file: Path | None = None  # None: nothing saved (nothing applied, now or before)


@dataclass
class RevertResult:
    restored: list[StateEntry] = field(default_factory=list)
    failed: list[tuple[StateEntry, str]] = field(default_factory=list)
    drifted: list[tuple[StateEntry, str | None]] = field(default_factory=list)  # changed since apply
    state_file: Path | None = None


def _write(path: str, text: str) -> None:
    """One write(2) of ``text``, as ``echo value > file`` does; never creates the file."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _write_checked(path: str, text: str, expect: str, kind: WriteKind) -> str | None:
    """Write and read back; the reason it did not take, or None."""
    try:
        _write(path, text)
    except OSError as e:
        return f"{e.strerror or e} ({path})"
    got = read_value(path, kind)
    if got != expect:
        return f"the kernel kept {got!r} after writing {expect!r} ({path})"
    return None


def apply_tune(plan: TunePlan, state_file: str | Path) -> TuneResult:
    """Save every current value to ``state_file``, then write the plan.

    A write the kernel refuses (read-only /proc/sys in a container, a value out of
    range) is reported in ``refused`` and the rest still apply.
    """
    state_file = Path(state_file)
    entries = load_state(state_file) if state_file.exists() else []
    saved = {e.path for e in entries}
    result = TuneResult()
    pending: list[tuple[PlannedChange, StateEntry]] = []
    for change in plan.changes:
        raw = read_text(Path(change.path))
        if raw is None:
            result.refused.append((change, f"{change.path} cannot be read"))
            continue
        if as_value(raw, change.kind) == change.value:
            result.unchanged.append(change)
            continue
        # a sysctl takes back the exact text it printed; a [choice] file takes the word
        previous = as_value(raw, change.kind) if change.kind is WriteKind.SELECTOR else raw
        pending.append((change, StateEntry(change.id, change.subject, change.path, change.kind,
                                           previous, change.value)))
    if not pending:
        result.state_file = state_file if entries else None
        return result
    new = [e for _, e in pending if e.path not in saved]
    save_state(state_file, entries + new)
    kept_new: list[StateEntry] = []
    for change, entry in pending:
        text = change.value if change.value.endswith("\n") else change.value + "\n"
        reason = _write_checked(change.path, text, change.value, change.kind)
        if reason:
            result.refused.append((change, reason))
        else:
            result.applied.append(change)
            if entry.path not in saved:
                kept_new.append(entry)
    remaining = entries + kept_new
    if remaining:
        save_state(state_file, remaining)
        result.state_file = state_file
    else:
        state_file.unlink(missing_ok=True)
    return result


def revert(state_file: str | Path) -> RevertResult:
    """Write back every saved value, newest first; the state file goes when all are restored.

    Entries that could not be restored stay in the state file, so ``--revert`` can
    be run again. No state file means nothing to revert (an empty result).
    """
    state_file = Path(state_file)
    result = RevertResult(state_file=state_file)
    if not state_file.exists():
        result.state_file = None
        return result
    entries = load_state(state_file)
    for entry in reversed(entries):
        now = read_value(entry.path, entry.kind)
        if now != entry.value:
            result.drifted.append((entry, now))
        reason = _write_checked(entry.path, entry.previous, entry.previous_value(), entry.kind)
        if reason:
            result.failed.append((entry, reason))
        else:
            result.restored.append(entry)
    failed = {e.path for e, _ in result.failed}
    left = [e for e in entries if e.path in failed]
    if left:
        save_state(state_file, left)
    else:
        state_file.unlink()
    return result


def save_state(state_file: Path, entries: list[StateEntry]) -> None:
    """Write the state file atomically (temp file, fsync, rename)."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "version": STATE_VERSION,
        "tool": "aitrain host tune",
        "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "entries": [{**asdict(e), "kind": e.kind.value} for e in entries],
    }
    fd, tmp = tempfile.mkstemp(prefix=".host-tune.", dir=state_file.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(state_file: Path) -> list[StateEntry]:
    try:
        doc = json.loads(state_file.read_text())
        if doc.get("version") != STATE_VERSION:
            raise ValueError(f"version {doc.get('version')!r}, expected {STATE_VERSION}")
        return [StateEntry(e["id"], e["subject"], e["path"], WriteKind(e["kind"]),
                           e["previous"], e["value"]) for e in doc["entries"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FabricError(
            f"cannot read the saved host settings in {state_file}: {e}",
            "it is written by 'aitrain host tune --apply'; if it was edited or truncated, "
            "restore the listed settings by hand and delete the file",
        ) from e
