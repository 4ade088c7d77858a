"""Pod-level resources on this host's cgroup v1 (cgroupfs driver): with
`[runtime] pod_cgroup_resources` the overhead plus the containers' sum, given at
RunPodSandbox and by UpdatePodSandboxResources, land in the pod cgroup's files; without
it (the default) they are checked and recorded, and the kubelet's pod cgroup is left alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.pods import Node, Pods, bridge_network, leftovers, pod_config, remove_cgroup
from tests.support.registry import Registry

CGROUP_ROOT = Path("/sys/fs/cgroup")
MiB = 1024 * 1024
R = pb.LinuxContainerResources


@pytest.fixture
def writing_pods(tmp_path: Path, registry: Registry, images: Any) -> Iterator[Pods]:
    """Pods of a daemon with pod_cgroup_resources on."""
    daemon = Daemon(tmp_path / "daemon", insecure_registries=[registry.host],
                    extra_config="[runtime]\npod_cgroup_resources = true\n")
    with bridge_network(daemon.cni_dir, tmp_path, 57) as bridge, daemon:
        daemon.pull(images.busybox.ref)
        tracker = Pods(Node(daemon, bridge, images.busybox.ref, tmp_path), tmp_path / "logs")
        try:
            yield tracker
        finally:
            tracker.cleanup()
            leaks = leftovers(daemon, bridge, tracker.cgroup_parent)
            remove_cgroup(tracker.cgroup_parent)
            assert leaks == [], f"the test leaked: {leaks}"


def pod_file(pods: Pods, controller: str, name: str) -> str:
    return (CGROUP_ROOT / controller / pods.cgroup_parent.lstrip("/") / name).read_text().strip()


def run_on_default_parent(pods: Pods, name: str,
                          resources: pb.LinuxContainerResources) -> str:
    config = pod_config(name, pods.log_dir, resources=resources)
    pod_id: str = pods.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config),
                                             timeout=60).pod_sandbox_id
    pods.created.append(pod_id)
    return pod_id


def update(pods: Pods, pod_id: str, resources: pb.LinuxContainerResources,
           overhead: pb.LinuxContainerResources) -> None:
    pods.runtime.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod_id, resources=resources, overhead=overhead), timeout=60)


def rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value


def test_run_and_update_apply_overhead_plus_resources(writing_pods: Pods) -> None:
    pods = writing_pods
    overhead = R(cpu_shares=102, cpu_quota=10_000, cpu_period=100_000,
                 memory_limit_in_bytes=8 * MiB)
    pod_id = pods.run("podres", overhead=overhead, resources=R(
        cpu_shares=512, cpu_quota=50_000, cpu_period=100_000, memory_limit_in_bytes=64 * MiB))
    assert pod_file(pods, "memory", "memory.limit_in_bytes") == str(72 * MiB)
    assert pod_file(pods, "cpu", "cpu.cfs_period_us") == "100000"
    assert pod_file(pods, "cpu", "cpu.cfs_quota_us") == "60000"
    assert pod_file(pods, "cpu", "cpu.shares") == "614"
    # a container of the pod runs inside those limits
    cid = pods.create(pod_id, "inside", ["sleep", "300"])
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING

    update(pods, pod_id, R(cpu_shares=1024, cpu_quota=150_000, cpu_period=100_000,
                           memory_limit_in_bytes=128 * MiB), overhead)
    assert pod_file(pods, "memory", "memory.limit_in_bytes") == str(136 * MiB)
    assert pod_file(pods, "cpu", "cpu.cfs_quota_us") == "160000"
    assert pod_file(pods, "cpu", "cpu.shares") == "1126"
    info = json.loads(pods.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(
        pod_sandbox_id=pod_id, verbose=True)).info["info"])
    assert info["config"]["linux"]["resources"]["memoryLimitInBytes"] == str(128 * MiB)

    # resized to no limits: the containers together have none
    update(pods, pod_id, R(cpu_shares=1024), overhead)
    assert pod_file(pods, "cpu", "cpu.cfs_quota_us") == "-1"
    assert int(pod_file(pods, "memory", "memory.limit_in_bytes")) > 1 << 60


def test_bad_requests_are_refused_with_the_reason(writing_pods: Pods) -> None:
    pods = writing_pods
    unknown = rpc_error(lambda: update(pods, "f" * 64, R(cpu_shares=512), R()))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND

    bad = rpc_error(lambda: pods.run("podres-bad", resources=R(cpu_quota=5)))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cpu_quota 5" in (bad.details() or "")

    pod_id = pods.run("podres-a", resources=R(cpu_shares=512))
    assert pod_file(pods, "cpu", "cpu.shares") == "512"
    bad = rpc_error(lambda: update(pods, pod_id, R(memory_limit_in_bytes=-5), R()))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = rpc_error(lambda: update(pods, pod_id, R(), R(cpuset_cpus="0")))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cpuset_cpus cannot be set for a pod" in (bad.details() or "")

    # Another pod in the same parent: limits would bind both, so they are refused.
    pods.run("podres-b")
    shared = rpc_error(lambda: update(pods, pod_id, R(cpu_shares=256), R()))
    assert shared.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "shared with other pods" in (shared.details() or "")
    assert pod_file(pods, "cpu", "cpu.shares") == "512"  # untouched

    default = rpc_error(lambda: run_on_default_parent(pods, "podres-default",
                                                      R(cpu_shares=256)))
    assert default.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the default one" in (default.details() or "")


def test_by_default_the_pod_cgroup_is_left_to_the_kubelet(pods: Pods) -> None:
    pod_id = pods.run("podres-off", resources=R(cpu_shares=512, memory_limit_in_bytes=64 * MiB))
    update(pods, pod_id, R(cpu_shares=1024, memory_limit_in_bytes=128 * MiB), R())
    for controller in ("cpu", "memory"):  # no container yet: nobody made the pod cgroup
        assert not (CGROUP_ROOT / controller / pods.cgroup_parent.lstrip("/")).exists()
    info = json.loads(pods.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(
        pod_sandbox_id=pod_id, verbose=True)).info["info"])
    assert info["config"]["linux"]["resources"]["memoryLimitInBytes"] == str(128 * MiB)
    bad = rpc_error(lambda: update(pods, pod_id, R(cpu_period=10), R()))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    unknown = rpc_error(lambda: update(pods, "e" * 64, R(cpu_shares=512), R()))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
