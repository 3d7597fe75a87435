"""Temporary proc/sys trees shaped like a stock (untuned) two-socket GPU host.

The ``make_host`` fixture (in this folder's conftest.py) is :func:`host_maker` over
the test's ``tmp_path``; test modules import the plain helpers from here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

from aitrain.fabric.host import HostPaths

GiB = 1 << 30

LIMITS = """Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max open files            1024                 524288               files     
Max locked memory         8388608              8388608              bytes     
Max address space         unlimited            unlimited            bytes     
"""

MEMINFO = """MemTotal:       527958800 kB
MemFree:        500000000 kB
SwapTotal:        8388604 kB
SwapFree:         8388604 kB
HugePages_Total:       0
HugePages_Free:        0
HugePages_Rsvd:        0
HugePages_Surp:        0
Hugepagesize:       2048 kB
Hugetlb:               0 kB
"""

MOUNTINFO_V2 = (
    "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
    "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)

MOUNTS = """proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
shm /dev/shm tmpfs rw,nosuid,nodev,noexec,relatime,size=65536k,inode64 0 0
"""


def stock_host_files() -> dict[str, str]:
    """relative path -> content of a host nobody has tuned for training (8 CPUs, 2 nodes)."""
    files = {
        "proc/sys/kernel/hostname": "gpu-node-07\n",
        "proc/sys/kernel/numa_balancing": "1\n",
        "proc/sys/kernel/sched_autogroup_enabled": "1\n",
        "proc/sys/kernel/sched_rt_runtime_us": "950000\n",
        "proc/sys/kernel/sched_rt_period_us": "1000000\n",
        "proc/sys/kernel/sched_migration_cost_ns": "500000\n",
        "proc/sys/vm/swappiness": "60\n",
        "proc/sys/vm/zone_reclaim_mode": "0\n",
        "proc/sys/net/core/rmem_max": "212992\n",
        "proc/sys/net/core/wmem_max": "212992\n",
        "proc/sys/net/core/netdev_max_backlog": "1000\n",
        "proc/sys/net/ipv4/tcp_rmem": "4096\t131072\t6291456\n",
        "proc/sys/net/ipv4/tcp_wmem": "4096\t16384\t4194304\n",
        "proc/sys/net/ipv4/ip_local_port_range": "32768\t60999\n",
        "proc/sys/net/ipv4/ip_local_reserved_ports": "\n",
        "proc/meminfo": MEMINFO,
        "proc/self/limits": LIMITS,
        "proc/self/mounts": MOUNTS,
        "proc/self/mountinfo": MOUNTINFO_V2,
        "proc/1/comm": "systemd\n",
        "proc/812/comm": "sshd\n",
        "sys/kernel/mm/transparent_hugepage/enabled": "[always] madvise never\n",
        "sys/kernel/mm/transparent_hugepage/defrag": "[always] defer defer+madvise madvise never\n",
        "sys/devices/system/cpu/online": "0-7\n",
        "sys/devices/system/node/node0/cpulist": "0-1,4-5\n",
        "sys/devices/system/node/node1/cpulist": "2-3,6-7\n",
        "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc\n",
    }
    for cpu in range(8):
        base = f"sys/devices/system/cpu/cpu{cpu}"
        files[f"{base}/cpufreq/scaling_governor"] = "powersave\n"
        files[f"{base}/cpufreq/scaling_available_governors"] = "performance powersave\n"
        files[f"{base}/topology/thread_siblings_list"] = f"{cpu % 4},{cpu % 4 + 4}\n"
    return files


def write_tree(root: Path, files: dict[str, str]) -> HostPaths:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "sys").mkdir(exist_ok=True)
    return HostPaths(root / "proc", root / "sys")


def snapshot(root: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


MakeHost = Callable[..., HostPaths]


def host_maker(tmp_path: Path) -> MakeHost:
    """``make(drop=[...], **{"proc/sys/vm/swappiness": "10\\n"})`` -> HostPaths of a new tree
    under ``tmp_path``: host0, host1, ..."""
    made = itertools.count()

    def make(drop: tuple[str, ...] | list[str] = (), **overrides: str) -> HostPaths:
        files = stock_host_files()
        for rel in drop:
            for key in [k for k in files if k == rel or k.startswith(rel.rstrip("/") + "/")]:
                del files[key]
        files.update(overrides)
        return write_tree(tmp_path / f"host{next(made)}", files)

    return make
