"""The guest is the node the checks are about: systemd as PID 1, cgroup v2 only, AppArmor."""

from __future__ import annotations

from pathlib import Path


def test_systemd_is_pid_1_on_the_unified_hierarchy() -> None:
    assert Path("/proc/1/comm").read_text().strip() == "systemd"
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    cgroup_mounts = [(m[1], m[2]) for m in mounts if m[2] in ("cgroup", "cgroup2")]
    assert cgroup_mounts == [("/sys/fs/cgroup", "cgroup2")]
    controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    assert {"cpuset", "cpu", "io", "memory", "hugetlb", "pids"} <= set(controllers)


def test_apparmor_is_enabled() -> None:
    assert Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
