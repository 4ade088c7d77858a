"""cgroup v2 resources as an operator reads them in the container's cgroup files: from
the CRI fields, from the `unified` map, and after UpdateContainerResources."""

from __future__ import annotations

from cripy.api import api_pb2 as pb
from tests.vm.guest.node import GuestPods, cgroup_file

MiB = 1024 * 1024


def cpu_weight(shares: int) -> int:
    """cgroup v2 cpu.weight for cgroup v1 cpu.shares, as runc converts them."""
    return 1 + ((shares - 2) * 9999) // 262142


def test_cri_resources_are_in_the_cgroup_files(pods: GuestPods) -> None:
    resources = pb.LinuxContainerResources(
        memory_limit_in_bytes=64 * MiB, memory_swap_limit_in_bytes=96 * MiB,
        cpu_shares=512, cpu_quota=50000, cpu_period=100000,
        cpuset_cpus="1", cpuset_mems="0",
        hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=4 * MiB)],
        unified={"memory.high": str(48 * MiB), "pids.max": "64", "io.weight": "default 300"})
    cid = pods.create(pods.run("limits"), "limited", ["sleep", "300"], resources=resources)
    cg = pods.cgroup_dir(cid)
    assert cgroup_file(cg, "memory.max") == str(64 * MiB)
    assert cgroup_file(cg, "memory.swap.max") == str(32 * MiB)  # CRI's is memory+swap
    assert cgroup_file(cg, "memory.high") == str(48 * MiB)
    assert cgroup_file(cg, "cpu.max") == "50000 100000"
    assert cgroup_file(cg, "cpu.weight") == str(cpu_weight(512))
    assert cgroup_file(cg, "cpuset.cpus") == "1"
    assert cgroup_file(cg, "cpuset.mems") == "0"
    assert cgroup_file(cg, "cpuset.cpus.effective") == "1"
    assert cgroup_file(cg, "hugetlb.2MB.max") == str(4 * MiB)
    assert cgroup_file(cg, "pids.max") == "64"
    assert cgroup_file(cg, "io.weight") == "default 300"
    # and the container really runs on that CPU only
    allowed = pods.exec(cid, "grep", "Cpus_allowed_list", "/proc/self/status").stdout
    assert allowed.split() == [b"Cpus_allowed_list:", b"1"]


def test_a_memory_limit_alone_means_no_swap(pods: GuestPods) -> None:
    resources = pb.LinuxContainerResources(memory_limit_in_bytes=32 * MiB)
    cid = pods.create(pods.run("noswap"), "noswap", ["sleep", "300"], resources=resources)
    cg = pods.cgroup_dir(cid)
    assert cgroup_file(cg, "memory.max") == str(32 * MiB)
    assert cgroup_file(cg, "memory.swap.max") == "0"
    assert cgroup_file(cg, "cpu.max") == "max 100000"


def test_update_container_resources_applies_live(pods: GuestPods) -> None:
    resources = pb.LinuxContainerResources(memory_limit_in_bytes=64 * MiB, cpu_shares=512,
                                           cpu_quota=50000, cpu_period=100000)
    cid = pods.create(pods.run("resize"), "resize", ["sleep", "300"], resources=resources)
    cg = pods.cgroup_dir(cid)
    pid_before = pods.pid(cid)
    pods.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(
            memory_limit_in_bytes=128 * MiB, cpu_shares=1024, cpu_quota=150000,
            cpu_period=100000, unified={"pids.max": "32", "memory.high": str(100 * MiB)})),
        timeout=60)
    assert cgroup_file(cg, "memory.max") == str(128 * MiB)
    assert cgroup_file(cg, "cpu.max") == "150000 100000"
    assert cgroup_file(cg, "cpu.weight") == str(cpu_weight(1024))
    assert cgroup_file(cg, "pids.max") == "32"
    assert cgroup_file(cg, "memory.high") == str(100 * MiB)
    # the same container, resized in place, and the status reports the new resources
    assert pods.pid(cid) == pid_before
    status = pods.status(cid).status
    assert status.resources.linux.memory_limit_in_bytes == 128 * MiB
    assert status.resources.linux.cpu_quota == 150000
