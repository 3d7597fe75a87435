"""plan/apply/revert on temporary roots, and on the real kernel inside a disposable netns."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aitrain.errors import FabricError
from aitrain.fabric.host import apply_tune, check_host, plan_tune, revert
from aitrain.fabric.host import tune as tune_module
from aitrain.fabric.host.tune import load_state

from hosttree import snapshot

SELECTOR_FILES = {"sys/kernel/mm/transparent_hugepage/enabled",
                  "sys/kernel/mm/transparent_hugepage/defrag"}


def settings(paths) -> dict[str, object]:
    """What ``host check`` reports for every setting: the values a revert must bring back."""
    return {f.id: (f.data["status"], f.data["current"]) for f in check_host(paths, include_ok=True)}


def test_plan_lists_writes_and_leaves_limits_to_the_admin(make_host) -> None:
    paths = make_host()
    plan = plan_tune(paths)
    changes = {c.subject: (c.current, c.value) for c in plan.changes}
    assert changes["kernel.numa_balancing"] == ("1", "0")
    assert changes["transparent_hugepage/defrag"] == ("always", "madvise")
    assert changes["net.ipv4.tcp_rmem"] == ("4096 131072 6291456", "4096 131072 16777216")
    assert changes["kernel.sched_migration_cost_ns"] == ("500000", "5000000")
    governors = [c for c in plan.changes if c.id == "host-cpu-governor"]
    assert len(governors) == 8 and {c.value for c in governors} == {"performance"}
    assert {f.id for f in plan.manual} >= {"host-shm-size", "host-nofile", "host-memlock"}
    assert "transparent_hugepage/enabled" not in changes  # [always] is accepted


def test_plan_writes_nothing(make_host) -> None:
    paths = make_host()
    before = snapshot(paths.proc.parent)
    plan_tune(paths)
    assert snapshot(paths.proc.parent) == before


def test_only_and_skip_select_by_finding_id(make_host) -> None:
    paths = make_host()
    assert {c.id for c in plan_tune(paths, only=["host-swappiness"]).changes} == {"host-swappiness"}
    assert "host-cpu-governor" not in {c.id for c in plan_tune(paths, skip=["host-cpu-governor"]).changes}
    with pytest.raises(FabricError, match="unknown host setting id.*host-swapiness") as e:
        plan_tune(paths, only=["host-swapiness"])
    assert "host-swappiness" in str(e.value)  # the hint lists the valid ids


def test_apply_then_revert_restores_exactly(make_host, tmp_path: Path) -> None:
    paths = make_host()
    root = paths.proc.parent
    before_files, before_settings = snapshot(root), settings(paths)
    state_file = tmp_path / "state/host-tune.json"

    plan = plan_tune(paths)
    result = apply_tune(plan, state_file)
    assert not result.refused and len(result.applied) == len(plan.changes)
    assert plan_tune(paths).changes == []  # everything tunable is now at its recommendation
    assert (root / "proc/sys/kernel/numa_balancing").read_text() == "0\n"
    saved = {e.path: e.previous for e in load_state(state_file)}
    assert saved[str(root / "proc/sys/net/ipv4/tcp_rmem")] == "4096\t131072\t6291456\n"
    assert saved[str(root / "sys/kernel/mm/transparent_hugepage/defrag")] == "always"

    back = revert(state_file)
    assert not back.failed and not back.drifted and len(back.restored) == len(plan.changes)
    assert not state_file.exists()
    assert settings(paths) == before_settings
    after_files = snapshot(root)
    for rel, data in before_files.items():
        if rel not in SELECTOR_FILES:  # a real [choice] file re-renders itself; a temp file cannot
            assert after_files[rel] == data, rel


def test_state_is_saved_before_the_first_write(make_host, tmp_path: Path, monkeypatch) -> None:
    paths = make_host()
    state_file = tmp_path / "host-tune.json"
    seen: list[bool] = []
    real_write = tune_module._write

    def spy(path: str, text: str) -> None:
        seen.append(state_file.exists())
        real_write(path, text)

    monkeypatch.setattr(tune_module, "_write", spy)
    apply_tune(plan_tune(paths, only=["host-numa-balancing", "host-swappiness"]), state_file)
    assert seen == [True, True]


def test_refused_writes_are_reported_and_not_saved(make_host, tmp_path: Path, monkeypatch) -> None:
    paths = make_host()
    state_file = tmp_path / "host-tune.json"
    real_write = tune_module._write

    def read_only_vm(path: str, text: str) -> None:
        if "/proc/sys/vm/" in path:
            raise OSError(errno.EROFS, "Read-only file system")
        real_write(path, text)

    monkeypatch.setattr(tune_module, "_write", read_only_vm)
    result = apply_tune(plan_tune(paths, only=["host-swappiness", "host-numa-balancing"]), state_file)
    assert [c.id for c in result.applied] == ["host-numa-balancing"]
    assert [(c.id, "Read-only" in why) for c, why in result.refused] == [("host-swappiness", True)]
    assert [e.id for e in load_state(state_file)] == ["host-numa-balancing"]
    monkeypatch.undo()
    assert revert(state_file).restored and (paths.proc / "sys/kernel/numa_balancing").read_text() == "1\n"


def test_applying_twice_keeps_the_values_from_before_the_first_apply(make_host, tmp_path: Path) -> None:
    paths = make_host()
    state_file = tmp_path / "host-tune.json"
    apply_tune(plan_tune(paths, only=["host-swappiness"]), state_file)
    (paths.proc / "sys/vm/swappiness").write_text("30\n")  # someone changes it again
    second = apply_tune(plan_tune(paths, only=["host-swappiness", "host-numa-balancing"]), state_file)
    assert {c.id for c in second.applied} == {"host-swappiness", "host-numa-balancing"}
    back = revert(state_file)
    assert (paths.proc / "sys/vm/swappiness").read_text() == "60\n"
    assert (paths.proc / "sys/kernel/numa_balancing").read_text() == "1\n"
    assert not back.failed


def test_nothing_to_apply_writes_no_state(make_host, tmp_path: Path) -> None:
    paths = make_host(**{"proc/sys/vm/swappiness": "10\n"})
    result = apply_tune(plan_tune(paths, only=["host-swappiness"]), tmp_path / "s.json")
    assert result.applied == [] and result.state_file is None and not (tmp_path / "s.json").exists()


def test_revert_reports_values_changed_since_apply(make_host, tmp_path: Path) -> None:
    paths = make_host()
    state_file = tmp_path / "host-tune.json"
    apply_tune(plan_tune(paths, only=["host-swappiness"]), state_file)
    (paths.proc / "sys/vm/swappiness").write_text("5\n")
    back = revert(state_file)
    assert [(e.id, now) for e, now in back.drifted] == [("host-swappiness", "5")]
    assert (paths.proc / "sys/vm/swappiness").read_text() == "60\n"


def test_failed_restores_stay_in_the_state_file(make_host, tmp_path: Path) -> None:
    paths = make_host()
    state_file = tmp_path / "host-tune.json"
    apply_tune(plan_tune(paths, only=["host-swappiness", "host-numa-balancing"]), state_file)
    shutil.rmtree(paths.proc / "sys/vm")  # the file is gone: the restore cannot happen
    back = revert(state_file)
    assert [e.id for e, _ in back.failed] == ["host-swappiness"]
    assert [e.id for e in load_state(state_file)] == ["host-swappiness"]


def test_revert_without_state_is_a_no_op_and_corrupt_state_teaches(tmp_path: Path) -> None:
    assert revert(tmp_path / "none.json").state_file is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FabricError, match="cannot read the saved host settings") as e:
        revert(bad)
    assert "HINT:" in str(e.value)


NETNS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from aitrain.fabric.host import apply_tune, plan_tune, revert
    sysctl = Path("/proc/sys/net/ipv4")
    (sysctl / "ip_local_port_range").write_text("1024 65535\\n")
    (sysctl / "ip_local_reserved_ports").write_text("\\n")
    state = sys.argv[1]
    plan = plan_tune(only=["host-ip-local-port-range", "host-rmem-max"])
    result = apply_tune(plan, state)
    during = (sysctl / "ip_local_reserved_ports").read_text()
    back = revert(state)
    print(json.dumps({
        "planned": sorted(c.id for c in plan.changes),
        "applied": [c.id for c in result.applied],
        "refused": [c.id for c, _ in result.refused],
        "during": during,
        "after": (sysctl / "ip_local_reserved_ports").read_text(),
        "range_after": (sysctl / "ip_local_port_range").read_text(),
        "restored": [e.id for e in back.restored],
        "state_left": Path(state).exists(),
    }))
""")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a disposable network namespace")
def test_apply_and_revert_on_the_real_kernel_in_a_network_namespace(tmp_path: Path) -> None:
    """Per-netns sysctls take real writes; rmem_max is init-netns only, so the kernel refuses it."""
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", NETNS_SCRIPT,
                           str(tmp_path / "state.json")], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(f"cannot create a network namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["applied"] == ["host-ip-local-port-range"]
    assert out["during"] == "29400,29500\n"
    assert out["after"] == "\n" and out["range_after"] == "1024\t65535\n"
    assert out["restored"] == ["host-ip-local-port-range"] and not out["state_left"]
    if "host-rmem-max" in out["planned"]:
        assert out["refused"] == ["host-rmem-max"]
