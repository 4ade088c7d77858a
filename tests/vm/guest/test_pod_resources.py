"""Pod-level resources on cgroup v2, per cgroup driver: the overhead plus the containers'
sum, given at RunPodSandbox and by UpdatePodSandboxResources, in the pod cgroup's files
(cgroupfs writes them; with systemd they are the slice's properties)."""

from __future__ import annotations

from cripy.api import api_pb2 as pb
from cripy.runtime.pod_resources import cpu_weight
from tests.vm.guest.node import GuestPods, cgroup_file, systemctl

MiB = 1024 * 1024
R = pb.LinuxContainerResources


def test_run_and_update_apply_overhead_plus_resources(pods: GuestPods) -> None:
    overhead = R(cpu_shares=102, cpu_quota=10_000, cpu_period=100_000,
                 memory_limit_in_bytes=8 * MiB)
    pod_id = pods.run("podres", overhead=overhead, resources=R(
        cpu_shares=512, cpu_quota=50_000, cpu_period=100_000, memory_limit_in_bytes=64 * MiB))
    pod = pods.pod_dir(pod_id)
    assert cgroup_file(pod, "memory.max") == str(72 * MiB)
    assert cgroup_file(pod, "cpu.max") == "60000 100000"
    assert cgroup_file(pod, "cpu.weight") == str(cpu_weight(614))
    cid = pods.create(pod_id, "inside", ["sleep", "300"])
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING

    pods.runtime.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod_id, overhead=overhead, resources=R(
            cpu_shares=1024, cpu_quota=150_000, cpu_period=100_000,
            memory_limit_in_bytes=128 * MiB)), timeout=60)
    assert cgroup_file(pod, "memory.max") == str(136 * MiB)
    assert cgroup_file(pod, "cpu.max") == "160000 100000"
    assert cgroup_file(pod, "cpu.weight") == str(cpu_weight(1126))
    if pods.node.driver == "systemd":  # systemd keeps them: a reload does not undo them
        unit = pod.name
        systemctl("daemon-reload")
        shown = set(systemctl("show", "--property=MemoryMax,CPUWeight", unit).split())
        assert shown == {f"CPUWeight={cpu_weight(1126)}", f"MemoryMax={136 * MiB}"}
        assert cgroup_file(pod, "memory.max") == str(136 * MiB)
