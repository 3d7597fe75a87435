"""``aitrain host check`` / ``aitrain host tune`` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aitrain.fabric.host import rule_ids
from aitrain.launcher.cli import host as cli_host
from aitrain.launcher.cli import main

from hosttree import snapshot, write_tree


def roots(paths) -> list[str]:
    return ["--proc-root", str(paths.proc), "--sysfs-root", str(paths.sys)]


def test_check_json_on_the_live_machine_in_a_subprocess() -> None:
    proc = subprocess.run([sys.executable, "-m", "aitrain.launcher.cli", "host", "check", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    findings = json.loads(proc.stdout)["findings"]
    assert [f["id"] for f in findings] == rule_ids()
    for f in findings:
        assert f["severity"] in ("error", "warning", "info")
        assert f["data"]["status"] in ("ok", "change", "not-available")
        assert {"current", "recommended", "why", "fix"} <= set(f["data"])


def test_check_table_on_a_tree(make_host, capsys) -> None:
    assert main(["host", "check", *roots(make_host(drop=["proc/sys/vm/zone_reclaim_mode"]))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("host check on gpu-node-07")
    header = out.splitlines()[1].split()
    assert header == ["SETTING", "CURRENT", "RECOMMENDED", "STATUS", "FIX"]
    numa = next(line for line in out.splitlines() if line.startswith("kernel.numa_balancing"))
    assert numa.split()[1:4] == ["1", "0", "warning"] and "sysctl -w kernel.numa_balancing=0" in numa
    zone = next(line for line in out.splitlines() if line.startswith("vm.zone_reclaim_mode"))
    assert " n/a" in zone
    assert "why:" in out and "[warning] host-numa-balancing" in out


def test_check_exit_codes(make_host, tmp_path: Path, capsys) -> None:
    paths = make_host()
    assert main(["host", "check", "--json", "--rdma", *roots(paths)]) == 1  # memlock error
    errors = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["severity"] == "error"]
    assert [f["id"] for f in errors] == ["host-memlock"]
    assert main(["host", "check", "--proc-root", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "HINT:" in err


def test_tune_dry_run_prints_and_writes_nothing(make_host, tmp_path: Path, capsys) -> None:
    paths = make_host()
    before = snapshot(paths.proc.parent)
    state = tmp_path / "state.json"
    assert main(["host", "tune", "--state-file", str(state), *roots(paths)]) == 0
    out = capsys.readouterr().out
    assert "dry run, nothing written" in out and "kernel.numa_balancing" in out
    assert "left to the admin" in out and "/dev/shm" in out
    assert snapshot(paths.proc.parent) == before and not state.exists()


def test_tune_apply_and_revert_round_trip_through_the_cli(make_host, tmp_path: Path, capsys) -> None:
    paths = make_host()
    root = paths.proc.parent
    state = tmp_path / "state.json"
    sysctls = {rel: data for rel, data in snapshot(root).items() if rel.startswith("proc/")}
    assert main(["host", "tune", "--apply", "--json", "--state-file", str(state), *roots(paths)]) == 0
    applied = json.loads(capsys.readouterr().out)
    assert applied["mode"] == "apply" and applied["state_file"] == str(state)
    assert {c["id"] for c in applied["applied"]} >= {"host-numa-balancing", "host-thp-defrag"}
    assert (paths.proc / "sys/kernel/numa_balancing").read_text() == "0\n"
    assert main(["host", "tune", "--revert", "--state-file", str(state)]) == 0
    out = capsys.readouterr().out
    assert "restored kernel.numa_balancing = 1" in out
    assert {rel: data for rel, data in snapshot(root).items() if rel.startswith("proc/")} == sysctls
    assert main(["host", "tune", "--revert", "--state-file", str(state)]) == 0
    assert "nothing to revert" in capsys.readouterr().out


def test_apply_on_the_live_host_needs_root(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(cli_host.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert cli_host.default_state_file() == tmp_path / "aitrain/host-tune.json"
    plan_has_changes = main(["host", "tune", "--json"]) == 0 and json.loads(
        capsys.readouterr().out)["changes"]
    if not plan_has_changes:
        pytest.skip("this host already matches every tunable recommendation")
    assert main(["host", "tune", "--apply"]) == 2
    err = capsys.readouterr().err
    assert "needs root" in err and "nothing was changed" in err and "HINT: run 'sudo" in err
    assert not (tmp_path / "aitrain/host-tune.json").exists()


def test_unknown_id_is_a_usage_error(make_host, capsys) -> None:
    assert main(["host", "tune", "--only", "host-nope", *roots(make_host())]) == 2
    assert "valid ids: host-thp-enabled" in capsys.readouterr().err


def test_bare_tree_reports_everything_not_available(tmp_path: Path, capsys) -> None:
    paths = write_tree(tmp_path / "bare", {})
    assert main(["host", "check", "--json", *roots(paths)]) == 0
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert {f["data"]["status"] for f in findings} == {"not-available"}


def test_host_cli_module_does_not_import_torch() -> None:
    code = ("import sys, aitrain.launcher.cli.host, aitrain.fabric.host; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
