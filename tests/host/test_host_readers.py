"""Readers on temporary trees: each setting as the kernel prints it, or None when missing."""

from __future__ import annotations

from pathlib import Path

from aitrain.fabric.host.readers import (
    HostPaths,
    Limit,
    parse_selector,
    parse_tmpfs_size,
    process_names,
    read_cgroup,
    read_governors,
    read_hostname,
    read_limit,
    read_meminfo,
    read_shm_size,
    read_sysctl,
    read_thp,
)

from hosttree import GiB, write_tree


def test_selector_files_read_the_bracketed_choice() -> None:
    assert parse_selector("always [madvise] never\n") == "madvise"
    assert parse_selector("[always] defer defer+madvise madvise never") == "always"
    assert parse_selector("madvise\n") == "madvise"


def test_thp_and_sysctls_from_a_tree(make_host) -> None:
    paths = make_host()
    assert read_thp(paths, "enabled") == ("always", ["always", "madvise", "never"])
    assert read_sysctl(paths, "net.ipv4.ip_local_port_range") == "32768 60999"
    assert read_sysctl(paths, "kernel.numa_balancing") == "1"
    assert read_sysctl(paths, "kernel.no_such_knob") is None


def test_governors_per_cpu(make_host) -> None:
    paths = make_host(**{"sys/devices/system/cpu/cpu3/cpufreq/scaling_governor": "performance\n"})
    governors = read_governors(paths)
    assert len(governors) == 8 and governors[3] == "performance" and governors[0] == "powersave"
    assert read_governors(make_host(drop=["sys/devices/system/cpu"])) == {}


def test_limits_of_a_captured_tree_come_from_proc_self_limits(make_host) -> None:
    paths = make_host()
    assert read_limit(paths, "memlock") == Limit(8388608, 8388608)
    assert read_limit(paths, "nofile") == Limit(1024, 524288)
    assert read_limit(make_host(drop=["proc/self/limits"]), "memlock") is None


def test_live_limits_come_from_getrlimit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = read_limit(HostPaths(), "nofile")
    assert limit is not None
    assert limit.soft == (None if soft == resource.RLIM_INFINITY else soft)


def test_shm_size_from_mounts_of_a_tree_and_statvfs_of_a_path(make_host, tmp_path: Path) -> None:
    paths = make_host()
    assert read_shm_size(paths) == (64 << 20, str(paths.proc / "self/mounts"))
    assert read_shm_size(make_host(drop=["proc/self/mounts"])) is None
    size, source = read_shm_size(HostPaths(tmp_path, tmp_path, shm=tmp_path))  # type: ignore[misc]
    assert size > 0 and source == f"statvfs({tmp_path})"
    assert read_shm_size(HostPaths(tmp_path, tmp_path, shm=tmp_path / "missing")) is None
    assert parse_tmpfs_size("2g") == 2 * GiB and parse_tmpfs_size("50%") is None


def test_process_names_and_meminfo(make_host) -> None:
    paths = make_host(**{"proc/4242/comm": "irqbalance\n"})
    assert process_names(paths) == {"systemd", "sshd", "irqbalance"}
    assert process_names(make_host(drop=["proc/1", "proc/812", "proc/4242"])) is None
    info = read_meminfo(paths)
    assert info["SwapTotal"] == 8388604 * 1024 and info["HugePages_Total"] == 0


def test_cgroup_v2_from_mountinfo_and_controllers_file(make_host) -> None:
    info = read_cgroup(make_host())
    assert info is not None and info.version == 2 and not info.hybrid
    assert {"cpu", "cpuset", "memory"} <= set(info.controllers)


def test_cgroup_v1_and_hybrid(tmp_path: Path) -> None:
    v1 = ("32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
          "34 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
          "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd\n")
    paths = write_tree(tmp_path / "v1", {"proc/self/mountinfo": v1})
    info = read_cgroup(paths)
    assert info is not None and info.version == 1 and not info.hybrid
    assert info.controllers == ("cpu", "cpuacct", "memory")
    hybrid = v1 + "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    info = read_cgroup(write_tree(tmp_path / "hy", {"proc/self/mountinfo": hybrid}))
    assert info is not None and info.version == 1 and info.hybrid


def test_cgroup_missing_everywhere_is_none(tmp_path: Path) -> None:
    assert read_cgroup(write_tree(tmp_path, {})) is None


def test_hostname_from_the_tree(make_host, tmp_path: Path) -> None:
    assert read_hostname(make_host()) == "gpu-node-07"
    assert read_hostname(write_tree(tmp_path / "bare", {})) == "unknown"
