"""Pod-level resources: validation, resources + overhead, and what is written to the pod's
cgroup (fake v1 / v2 trees) or asked of systemd."""

from __future__ import annotations

from pathlib import Path

import pytest

from cripy.api import api_pb2 as pb
from cripy.errors import InvalidArgumentError
from cripy.runtime.pod_resources import (
    PodLimits,
    apply_cgroupfs,
    cpu_weight,
    pod_limits,
    systemd_properties,
)

MiB = 1024 * 1024
R = pb.LinuxContainerResources
POD = "/kubepods/burstable/pod1"


def test_resources_plus_overhead() -> None:
    limits = pod_limits(
        R(cpu_shares=512, cpu_quota=50_000, cpu_period=100_000, memory_limit_in_bytes=64 * MiB),
        R(cpu_shares=102, cpu_quota=10_000, cpu_period=100_000, memory_limit_in_bytes=8 * MiB))
    assert limits == PodLimits(memory=72 * MiB, cpu_quota=60_000, cpu_period=100_000,
                               cpu_shares=614)


def test_no_container_limit_means_none_for_the_pod() -> None:
    # the overhead alone does not limit a pod whose containers are unlimited
    limits = pod_limits(R(cpu_shares=2), R(cpu_shares=100, cpu_quota=10_000,
                                            memory_limit_in_bytes=8 * MiB))
    assert limits == PodLimits(memory=None, cpu_quota=None, cpu_period=100_000, cpu_shares=102)
    assert pod_limits(R(), R()) is None  # nothing asked: nothing is touched


def test_overhead_quota_scales_to_the_pod_period() -> None:
    limits = pod_limits(R(cpu_quota=25_000, cpu_period=50_000),
                        R(cpu_quota=10_000, cpu_period=100_000))
    assert limits is not None and (limits.cpu_quota, limits.cpu_period) == (30_000, 50_000)


@pytest.mark.parametrize(("res", "message"), [
    (R(memory_limit_in_bytes=-1), "memory_limit_in_bytes -1 is negative"),
    (R(cpu_shares=1), "cpu_shares 1 is outside"),
    (R(cpu_shares=300_000), "cpu_shares 300000 is outside"),
    (R(cpu_period=999), "cpu_period 999 is outside"),
    (R(cpu_quota=500), "cpu_quota 500 must be"),
    (R(cpu_quota=-2), "cpu_quota -2 must be"),
    (R(cpuset_cpus="0"), "cpuset_cpus cannot be set for a pod"),
    (R(unified={"pids.max": "5"}), "unified cannot be set for a pod"),
    (R(hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=1)]), "hugepage_limits"),
])
def test_bad_values_are_refused(res: pb.LinuxContainerResources, message: str) -> None:
    for resources, overhead, what in ((res, R(), "resources"), (R(), res, "overhead")):
        with pytest.raises(InvalidArgumentError, match=f"pod {what}: .*{message}"):
            pod_limits(resources, overhead)


def v2_root(root: Path) -> Path:
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("memory\n")
    return root


def fake_v2_levels(root: Path) -> None:
    """What the kernel puts in a new v2 directory (a fake tree has to be told)."""
    directory = root
    for part in POD.strip("/").split("/"):
        directory = directory / part
        directory.mkdir()
        (directory / "cgroup.controllers").write_text("cpu memory\n")
        (directory / "cgroup.subtree_control").write_text("")


def test_v2_files_and_controllers(tmp_path: Path) -> None:
    root = v2_root(tmp_path / "cg")
    fake_v2_levels(root)
    limits = PodLimits(memory=72 * MiB, cpu_quota=60_000, cpu_period=100_000, cpu_shares=614)
    apply_cgroupfs(POD, limits, root)
    pod = root / POD.lstrip("/")
    assert (pod / "memory.max").read_text() == str(72 * MiB)
    assert (pod / "cpu.max").read_text() == "60000 100000"
    assert (pod / "cpu.weight").read_text() == str(cpu_weight(614))
    assert (root / "cgroup.subtree_control").read_text() == "+cpu"  # memory was on
    assert (root / "kubepods" / "burstable" / "cgroup.subtree_control").read_text() == \
        "+cpu +memory"
    apply_cgroupfs(POD, PodLimits(None, None, 100_000, None), root)
    assert (pod / "memory.max").read_text() == "max"
    assert (pod / "cpu.max").read_text() == "max 100000"


def test_v1_files(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    for controller in ("memory", "cpu,cpuacct"):
        (root / controller).mkdir(parents=True)
    (root / "cpu").symlink_to("cpu,cpuacct")
    apply_cgroupfs(POD, PodLimits(72 * MiB, 60_000, 100_000, 614), root)
    cpu = root / "cpu,cpuacct" / POD.lstrip("/")
    assert (root / "memory" / POD.lstrip("/") / "memory.limit_in_bytes").read_text() == \
        str(72 * MiB)
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "60000"
    assert (cpu / "cpu.shares").read_text() == "614"
    apply_cgroupfs(POD, PodLimits(None, None, 100_000, None), root)
    assert (cpu / "cpu.cfs_quota_us").read_text() == "-1"
    assert (root / "memory" / POD.lstrip("/") / "memory.limit_in_bytes").read_text() == "-1"


def test_systemd_properties() -> None:
    limits = PodLimits(72 * MiB, 60_000, 100_000, 614)
    assert systemd_properties(limits, cgroup_v2=True) == [
        f"MemoryMax={72 * MiB}", "CPUQuotaPeriodSec=100000us", "CPUQuota=60.00%",
        f"CPUWeight={cpu_weight(614)}"]
    assert systemd_properties(PodLimits(None, None, 50_000, 614), cgroup_v2=False) == [
        "MemoryMax=infinity", "CPUQuotaPeriodSec=50000us", "CPUQuota=", "CPUShares=614"]
    assert cpu_weight(2) == 1 and cpu_weight(262144) == 10000 and cpu_weight(1024) == 39
