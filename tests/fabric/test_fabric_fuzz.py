"""Damaged fabric trees (issue #16 item 6): FIFOs, symlink loops, unreadable files and roots,
huge files, garbage and non-UTF-8 bytes, a directory where a file belongs and the reverse.

Whatever a tree holds, probing it ends within 5 s in a topology (the damage as warnings) or
in one FabricError with a HINT (the CLI: ``aitrain: error:``, a HINT line, exit 2), never a
traceback or a hang; the time grows at most linearly with the size of a garbage file; and
nothing is written except the probe cache.

Hypothesis damages copies of real trees: a synthetic RoCE host (hostbuilder), the
prometheus/procfs sysfs capture and a gcm path map (../shared/fixtures/fabric, SOURCES.md).
Most examples probe in-process; a handful go through the real CLI.

This suite runs as root here, and root reads mode-000 files. To make "unreadable" mean
something, the probe runs without the DAC override capabilities: for in-process calls
this thread drops them from its effective set (capset) and takes them back after; the
CLI runs under ``setpriv --bounding-set -dac_override,-dac_read_search``.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aitrain.errors import FabricError
from aitrain.fabric import check
from aitrain.fabric.cache import FabricCache
from aitrain.fabric.host import HostPaths, check_host
from aitrain.fabric.probe.fs import MAX_ATTR_BYTES, MAX_TABLE_BYTES
from aitrain.fabric.probe.pathmap import load_path_map, materialize
from aitrain.fabric.sources import load_hosts
from aitrain.fabric.tune import TuneOptions, tune

CALL_LIMIT_S = 5.0
RENDEZVOUS = "192.168.1.7"
SECRET = "s3cr3t-outside-the-tree"

# --------------------------------------------------------------------------- unreadable as root

_CAP_DAC = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
_CAP_V3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capset_effective(mask_off: int, restore: int | None = None) -> int | None:
    """Clear ``mask_off`` from this thread's effective capabilities (or set them back to
    ``restore``); returns the previous effective set, None when it cannot be done."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        header, data = _CapHeader(_CAP_V3, 0), (_CapData * 2)()
        if libc.capget(ctypes.byref(header), data) != 0:
            return None
        before = data[0].effective
        data[0].effective = restore if restore is not None else before & ~mask_off
        if libc.capset(ctypes.byref(header), data) != 0:
            return None
        return before
    except (OSError, AttributeError):
        return None


@contextmanager
def as_plain_user() -> Iterator[bool]:
    """File modes apply inside (True), also for root; False when they cannot be made to."""
    if os.geteuid() != 0:
        yield True
        return
    before = _capset_effective(_CAP_DAC)
    try:
        yield before is not None
    finally:
        if before is not None:
            _capset_effective(0, restore=before)


def cli_prefix() -> list[str] | None:
    """The command prefix that makes file modes apply to the CLI; None if there is none."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"] if setpriv else None


def modes_apply() -> bool:
    with as_plain_user() as ok:
        return ok


# --------------------------------------------------------------------------- base trees


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, hosts_dir: Path, shared: Path) -> dict[str, Path]:
    """name -> an undamaged tree (or file) to copy: what a user points --sysfs-root at."""
    out = tmp_path_factory.mktemp("bases")
    shutil.copytree(hosts_dir / "roce01", out / "roce01", symlinks=True)
    shutil.copytree(shared / "procfs-sysfs" / "sys", out / "procfs" / "sys")
    materialize(load_path_map(shared / "gcm" / "learn_good.json"), out / "gcm")
    shutil.copy(shared / "gcm" / "learn_good.json", out / "gcm.json")
    return {"roce01": out / "roce01", "procfs": out / "procfs" / "sys", "gcm": out / "gcm",
            "gcm.json": out / "gcm.json"}


class Entries(dict[str, list[str]]):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"Entries({', '.join(f'{k}: {len(v)} paths' for k, v in self.items())})"


@pytest.fixture(scope="module")
def entries(bases: dict[str, Path]) -> dict[str, list[str]]:
    """name -> every path in the base ("" is the root itself), symlinks not followed."""
    out = Entries()
    for name, root in bases.items():
        found = [""]
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                for n in dirnames + filenames:
                    found.append(os.path.relpath(os.path.join(dirpath, n), root))
        out[name] = sorted(found)
    return out


# --------------------------------------------------------------------------- damage

# Any path in the tree, the root included.
OPS = ("fifo", "self-loop", "pair-loop", "parent-link", "dangling", "device", "outside-file",
       "unreadable", "untraversable", "huge", "garbage", "non-utf8", "empty", "truncated",
       "dir-for-file", "file-for-dir")
# The root itself is what the user names: a FIFO there is read like `cat` would (a pipe
# the user passes on purpose, `--from-json <(...)`), so it is no damage the probe must survive.
ROOT_OPS = tuple(op for op in OPS if op != "fifo")
HUGE = (MAX_ATTR_BYTES + 1, 1 << 20, MAX_TABLE_BYTES + 1)

damage_op = st.tuples(st.sampled_from(OPS), st.binary(max_size=200), st.sampled_from(HUGE))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _within(path: Path, top: Path) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(top) + os.sep)


def damage(path: Path, op: str, payload: bytes, huge: int, *, outside: Path) -> None:
    """Applies ``op`` to ``path`` (skipped when an earlier op removed its directory)."""
    if not os.path.isdir(path.parent) or not os.path.lexists(path):
        return
    top = outside.parent / "tree"
    try:
        _damage(path, op, payload, huge, top, outside)
    except OSError:
        pass  # an earlier op made this one impossible (as a non-root user): the tree stays as it is


def _damage(path: Path, op: str, payload: bytes, huge: int, top: Path, outside: Path) -> None:
    original = path.read_bytes() if path.is_file() and _within(path, top) else b""
    if op in ("unreadable", "untraversable"):
        if not path.is_symlink():
            os.chmod(path, 0 if op == "unreadable" else 0o444)
        return
    _remove(path)
    if op == "fifo":
        os.mkfifo(path)
    elif op == "self-loop":
        os.symlink(path.name, path)
    elif op == "pair-loop":
        os.symlink(path.name + "~", path)
        os.symlink(path.name, path.with_name(path.name + "~"))
    elif op == "parent-link":
        os.symlink("..", path)
    elif op == "dangling":
        os.symlink("no-such-target", path)
    elif op == "device":
        os.symlink("/dev/zero", path)
    elif op == "outside-file":
        os.symlink(outside, path)
    elif op == "huge":
        unit = payload or b"\xff9 x\n"
        chunk = unit * ((1 << 20) // len(unit) + 1)
        with open(path, "wb") as fh:
            for _ in range(huge // len(chunk) + 1):
                fh.write(chunk)
    elif op == "garbage":
        path.write_bytes(payload)
    elif op == "non-utf8":
        path.write_bytes(b"\xff\xfe\xc3" + original + payload)
    elif op == "empty":
        path.write_bytes(b"")
    elif op == "truncated":
        path.write_bytes(original[: len(original) // 2])
    elif op == "dir-for-file":
        path.mkdir()
        (path / "attr").write_bytes(payload)
    elif op == "file-for-dir":
        path.write_bytes(payload)


def manifest(top: Path) -> dict[str, tuple[int, int]]:
    """rel path -> (file type, size) of everything under ``top``, links not followed."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            out[os.path.relpath(p, top)] = (stat.S_IFMT(st_.st_mode), st_.st_size if stat.S_ISREG(st_.st_mode) else 0)
    return out


def make_writable(top: Path) -> None:
    """Give modes back so the tree can be listed and removed (by a non-root user too)."""
    if os.path.isdir(top) and not os.path.islink(top):
        os.chmod(top, 0o700)
        for dirpath, dirnames, filenames in os.walk(top):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                if not os.path.islink(p):
                    os.chmod(p, 0o700 if os.path.isdir(p) else 0o600)
    elif os.path.isfile(top) and not os.path.islink(top):
        os.chmod(top, 0o600)


@contextmanager
def damaged_tree(bases: dict[str, Path], entries: dict[str, list[str]], data: st.DataObject,
                 parent: Path) -> Iterator[tuple[Path, Path]]:
    """(the damaged copy of a base, its example dir) for one example; removed after."""
    base = data.draw(st.sampled_from(sorted(bases)), label="base")
    example = Path(tempfile.mkdtemp(prefix="ex-", dir=parent))
    tree = example / "tree"
    outside = example / "outside.txt"
    outside.write_text(SECRET + "\n")
    if bases[base].is_dir():
        shutil.copytree(bases[base], tree, symlinks=True)
    else:
        shutil.copy(bases[base], tree)
    ops = data.draw(st.lists(st.tuples(st.sampled_from(entries[base]), damage_op), min_size=1, max_size=4),
                    label="damage")
    for rel, (op, payload, huge) in ops:
        if rel == "" and op not in ROOT_OPS:
            continue
        damage(tree / rel if rel else tree, op, payload, huge, outside=outside)
    try:
        yield tree, example
    finally:
        for p in (tree, tree.parent):
            make_writable(p)
        shutil.rmtree(example, ignore_errors=True)


# --------------------------------------------------------------------------- one probe, checked


def probe_check_tune(tree: Path, cache: Path | None = None) -> tuple[list[object] | None, FabricError | None]:
    """What `fabric probe`, `check` and `tune` do with ``--sysfs-root tree``, in-process:
    (JSON of the hosts, None) or (None, the FabricError). Any other exception fails."""
    try:
        if cache is not None:
            hosts = [FabricCache(directory=cache).probe(tree, rendezvous=RENDEZVOUS)[0]]
        else:
            hosts = load_hosts([tree], rendezvous=RENDEZVOUS)
        check(hosts, rendezvous=RENDEZVOUS, expected_rate_gbps=100)
        tune(hosts, rendezvous=RENDEZVOUS, nccl_version="2.21.5", shell_env={},
             options=TuneOptions(nproc_per_node=2))
        return [h.to_dict() for h in hosts], None
    except FabricError as e:
        return None, e


def assert_teaches(e: FabricError) -> None:
    assert e.message and e.hint, f"a FabricError without a HINT: {e!r}"
    assert "Traceback" not in str(e)


# AITRAIN_FUZZ_EXAMPLES=2000 for a long hunt; 50 keeps the file near 30 s on 2 cores.
SLOW_OK = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
TREE_SETTINGS = settings(max_examples=int(os.environ.get("AITRAIN_FUZZ_EXAMPLES", "50")), deadline=None,
                         print_blob=True, suppress_health_check=SLOW_OK)


@TREE_SETTINGS
@given(data=st.data(), use_cache=st.booleans())
def test_any_damage_ends_in_a_topology_or_one_taught_error(bases, entries, tmp_path, monkeypatch, data, use_cache):
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where a path map is materialized
    cache = tmp_path / "cache" if use_cache else None
    with damaged_tree(bases, entries, data, tmp_path) as (tree, example):
        before = manifest(example)
        with as_plain_user():
            t0 = time.monotonic()
            hosts, error = probe_check_tune(tree, cache)
            elapsed = time.monotonic() - t0
        assert elapsed < CALL_LIMIT_S, f"probe + check + tune took {elapsed:.1f} s"
        if error is not None:
            assert_teaches(error)
        else:
            assert SECRET not in json.dumps(hosts)  # a link out of the tree is not a data source
        assert manifest(example) == before, "the probe wrote into the tree it read"
        assert list(scratch.iterdir()) == [], "a temporary path-map tree was left behind"
        if cache is not None and cache.exists():
            assert all(p.name.startswith("probe-") and p.suffix == ".json" for p in cache.iterdir())


# --------------------------------------------------------------------------- the same through the CLI


def run_cli(*args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None,
            timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    cmd = [*(prefix or []), sys.executable, "-m", "aitrain.launcher.cli", *args]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    return out, time.monotonic() - t0


@pytest.fixture(scope="module")
def startup_s() -> float:
    """The interpreter's start-up under the present load: a CLI call gets 5 s on top of it."""
    return min(run_cli("--version")[1] for _ in range(2))


def assert_cli_outcome(out: subprocess.CompletedProcess[str], command: str) -> None:
    assert "Traceback" not in out.stderr, out.stderr
    assert "this is a bug in aitrain" not in out.stderr, out.stderr
    if out.returncode == 2:
        lines = out.stderr.splitlines()
        assert lines and lines[0].startswith("aitrain: error: "), out.stderr
        assert any(line.startswith("HINT: ") for line in lines[1:]), out.stderr
        assert out.stdout == ""
    else:
        assert out.returncode in ((0, 1) if command == "check" else (0,)), (out.returncode, out.stderr)
        json.loads(out.stdout)


CLI_ARGS = {"probe": ["--json"], "check": ["--json", "--expected-rate-gbps", "100"],
            "tune": ["--json", "--nccl-version", "2.21.5", "--profile", "none"]}


@settings(max_examples=6, deadline=None, print_blob=True, suppress_health_check=SLOW_OK)
@given(data=st.data(), command=st.sampled_from(sorted(CLI_ARGS)))
def test_cli_on_any_damage_exits_0_1_or_2_with_one_error_line(bases, entries, tmp_path, startup_s, data, command):
    prefix = cli_prefix()
    env = {"TMPDIR": str(tmp_path / "tmp"), "AITRAIN_CACHE_DIR": str(tmp_path / "cache"),
           "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    with damaged_tree(bases, entries, data, tmp_path) as (tree, example):
        with as_plain_user():
            _, error = probe_check_tune(tree)
        before = manifest(example)
        out, elapsed = run_cli("fabric", command, *CLI_ARGS[command], "--sysfs-root", str(tree),
                               "--rendezvous", RENDEZVOUS, env=env, prefix=prefix)
        assert_cli_outcome(out, command)
        if prefix is not None and modes_apply():  # file modes apply to both: the same verdict
            assert (out.returncode == 2) == (error is not None), (out.stderr, error)
        assert elapsed < startup_s + CALL_LIMIT_S, f"`aitrain fabric {command}` took {elapsed:.1f} s"
        assert manifest(example) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"], "the CLI wrote outside --sysfs-root"
    assert list((tmp_path / "tmp").iterdir()) == []


# --------------------------------------------------------------------------- what was measured (#16 item 6)


@pytest.fixture
def roce_copy(tmp_path: Path, hosts_dir: Path) -> Path:
    tree = tmp_path / "roce01"
    shutil.copytree(hosts_dir / "roce01", tree, symlinks=True)
    yield tree
    make_writable(tree)


@pytest.mark.parametrize("command", sorted(CLI_ARGS))
def test_a_fifo_in_the_tree_is_a_warning_not_a_hang(roce_copy, command):
    (roce_copy / "sys/devices/virtual/net/lo/mtu").unlink()
    os.mkfifo(roce_copy / "sys/devices/virtual/net/lo/mtu")
    mtu = roce_copy / "sys/class/net/lo/mtu"  # the path the probe reads it by
    out, _ = run_cli("fabric", command, *CLI_ARGS[command], "--sysfs-root", str(roce_copy), timeout=30)
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr
    if command == "probe":
        (host,) = json.loads(out.stdout)["hosts"]
        assert {"path": str(mtu), "message": "expected a file, found a FIFO; not read",
                "kind": "unreadable-file"} in host["warnings"]


@pytest.mark.parametrize("command", sorted(CLI_ARGS))
@pytest.mark.parametrize("what", ["root", "sys"])
def test_an_unreadable_root_is_one_error_and_exit_2(roce_copy, command, what):
    prefix = cli_prefix()
    if prefix is None:
        pytest.skip("running as root without setpriv: file modes do not apply")
    os.chmod(roce_copy if what == "root" else roce_copy / "sys", 0)
    out, _ = run_cli("fabric", command, *CLI_ARGS[command], "--sysfs-root", str(roce_copy), prefix=prefix)
    assert out.returncode == 2, out.stderr
    first, hint = out.stderr.splitlines()[:2]
    tree = str(roce_copy if what == "root" else roce_copy / "sys")
    assert first.startswith("aitrain: error: cannot read ") and f"{tree}: Permission denied" in first
    assert hint.startswith("HINT: ") and "chmod" in hint


def test_an_unreadable_root_in_process(roce_copy):
    if not modes_apply():
        pytest.skip("file modes do not apply to this process")
    os.chmod(roce_copy / "proc", 0o111)  # traversable, not listable
    with as_plain_user(), pytest.raises(FabricError) as e:
        load_hosts([roce_copy])
    assert "cannot read the procfs root" in e.value.message and "--proc-root" in (e.value.hint or "")


@pytest.mark.parametrize("kind", ["self-loop", "dangling"])
def test_a_root_symlink_to_nowhere(tmp_path, kind):
    root = tmp_path / "root"
    os.symlink("root" if kind == "self-loop" else "nowhere", root)
    out, _ = run_cli("fabric", "probe", "--sysfs-root", str(root))
    assert out.returncode == 2 and "symlink to nowhere" in out.stderr and "HINT:" in out.stderr


def test_a_pipe_the_user_names_is_read_like_cat(tmp_path, hosts_dir):
    """`--from-json <(ssh node aitrain fabric probe --json)` keeps working."""
    doc = run_cli("fabric", "probe", "--json", "--sysfs-root", str(hosts_dir / "dgx01"))[0].stdout
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f'cat > "{fifo}"'], stdin=subprocess.PIPE, text=True)
    try:
        writer.stdin.write(doc)  # type: ignore[union-attr]
        writer.stdin.close()  # type: ignore[union-attr]
        out, _ = run_cli("fabric", "check", "--from-json", str(fifo), "--json", timeout=30)
    finally:
        writer.wait(timeout=30)
    assert out.returncode == 0, out.stderr


def test_host_check_on_a_tree_with_a_fifo_and_an_unreadable_proc(roce_copy):
    numa = roce_copy / "proc/sys/kernel/numa_balancing"
    numa.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(numa)
    paths = HostPaths(proc=roce_copy / "proc", sys=roce_copy / "sys")
    by_id = {f.id: f for f in check_host(paths, include_ok=True)}
    assert by_id["host-numa-balancing"].data["status"] == "not-available"
    prefix = cli_prefix()
    if prefix is None:
        return
    os.chmod(roce_copy / "proc", 0)
    out, _ = run_cli("host", "check", "--proc-root", str(roce_copy / "proc"), "--sysfs-root",
                     str(roce_copy / "sys"), prefix=prefix)
    assert out.returncode == 2 and out.stderr.startswith("aitrain: error: cannot read host settings")
    assert "\nHINT: " in out.stderr and "Traceback" not in out.stderr


# --------------------------------------------------------------------------- linear in the input


def _routes(n: int) -> bytes:
    """``n`` distinct connected routes: what /proc/net/route holds, many times over."""
    head = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
    rows = [f"eth{i % 7}\t{(i << 8).to_bytes(4, 'big')[::-1].hex().upper()}\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0"
            for i in range(n)]
    return (head + "\n".join(rows) + "\n").encode()


def _fib_trie(n: int) -> bytes:
    """``n`` distinct local addresses, the fib_trie way."""
    return "".join(f"     |-- 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n        /32 host LOCAL\n"
                   for i in range(n)).encode()


GROWING = {
    # file -> content of about n bytes
    "proc/net/route": lambda n: _routes(n // 70),
    "proc/net/fib_trie": lambda n: _fib_trie(n // 45),
    "proc/meminfo": lambda n: b"\n" * n,
    "sys/devices/system/cpu/online": lambda n: b"0-65535," * (n // 8),
    "sys/devices/virtual/net/lo/mtu": lambda n: os.urandom(n),
}


def _best_of(runs: int, tree: Path) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        hosts, error = probe_check_tune(tree)
        times.append(time.perf_counter() - t0)
        assert error is None
    return min(times)


@pytest.mark.parametrize("rel", sorted(GROWING))
def test_time_is_linear_in_a_garbage_file(roce_copy, rel):
    """10x the bytes costs at most ~10x the time (plus noise), below and above the read caps:
    a quadratic parser or an uncapped read fails this long before it hangs a launch."""
    small = 24 << 10 if rel.startswith("sys/") else 256 << 10  # under the caps, 10x over half of them
    times = {}
    for size in (small, 10 * small, 100 * small):
        (roce_copy / rel).write_bytes(GROWING[rel](size))
        times[size] = _best_of(2, roce_copy)
        assert times[size] < CALL_LIMIT_S
    assert times[10 * small] <= 10 * times[small] + 0.3, times
    assert times[100 * small] <= 10 * times[10 * small] + 0.3, times
