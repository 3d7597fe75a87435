"""Captured hosts stored as JSON maps of sysfs path -> file content.

Health-check tools (facebookresearch/gcm, for one) record a host as
``{"/sys/bus/pci/devices/0000:0c:00.0/infiniband/mlx5_0/ports/1/rate": "200 Gb/sec (4X HDR)\\n", ...}``.
:func:`materialize` writes such a map out as a directory tree and adds what the map
leaves implicit, so the ordinary readers can walk it:

- ``class/infiniband/<dev>`` and ``class/net/<if>`` links to the device directories;
- ``device`` links from those directories to their PCI function;
- ``/sys/class/pci_bus/<bus>/device/<bdf>/<attr>`` is the same PCI function as
  ``/sys/bus/pci/devices/<bdf>``, so it is written there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TypeGuard

from aitrain.errors import FabricError

_PCI_BUS_ATTR = re.compile(r"^/?sys/class/pci_bus/[^/]+/device/([0-9a-fA-F:.]+)/(.+)$")
_CLASS_ENTRY = re.compile(r"^(sys/bus/pci/devices/[^/]+)/(infiniband|net)/([^/]+)/")
_PROC_PREFIX = "proc/"


def looks_like_path_map(data: object) -> TypeGuard[dict[str, object]]:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(k, str) and k.startswith(("/sys/", "/proc/", "sys/", "proc/")) for k in data
    )


def load_path_map(path: str | os.PathLike[str]) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise FabricError(f"cannot read path map {path}: {e}",
                          "pass a JSON object mapping /sys/... paths to file contents") from e
    return path_map_contents(data, path)


def path_map_contents(data: object, path: str | os.PathLike[str]) -> dict[str, str]:
    """The parsed JSON ``data`` of ``path`` as path -> file content (non-string values as JSON)."""
    if not looks_like_path_map(data):
        raise FabricError(
            f"{path} is not a path map: expected a JSON object whose keys are /sys/... paths",
            "pass a sysfs tree directory, a path-map JSON or `aitrain fabric probe --json` output",
        )
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}


def materialize(paths: dict[str, str], dest: str | os.PathLike[str]) -> Path:
    """Writes the map under ``dest`` (``dest/sys/...``, ``dest/proc/...``); returns dest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    entries: set[tuple[str, str, str]] = set()
    for key, content in paths.items():
        rel = key.lstrip("/")
        m = _PCI_BUS_ATTR.match(key)
        if m:
            rel = f"sys/bus/pci/devices/{m.group(1)}/{m.group(2)}"
        parts = Path(rel).parts
        if ".." in parts or not parts or parts[0] not in ("sys", "proc"):
            continue  # never write outside dest
        target = dest.joinpath(*parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        except (OSError, ValueError):
            # a path that is both a file and a directory in the map; a NUL byte or a
            # lone surrogate in a name or content (ValueError): not in any real sysfs
            continue
        cm = _CLASS_ENTRY.match(rel)
        if cm:
            entries.add((cm.group(1), cm.group(2), cm.group(3)))
    for function_dir, cls, name in sorted(entries):
        _link(dest / "sys" / "class" / cls / name, dest / function_dir / cls / name)
        _link(dest / function_dir / cls / name / "device", dest / function_dir)
    return dest


def _link(link: Path, target: Path) -> None:
    """Adds a link the map left implicit, unless the map already put something there."""
    try:
        if link.exists() or link.is_symlink():
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent))
    except (OSError, ValueError):
        pass  # a path component is a file in the map: keep the map's content
