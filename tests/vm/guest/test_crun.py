"""The crun runtime handler on a cgroup v2 node, with both cgroup drivers: the same pod
lifecycle, resources and exec as with runc."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cripy.api import api_pb2 as pb
from tests.vm.guest.node import GuestPods, cgroup_file

MIB = 1 << 20
GRACEFUL = ["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"]


def run_with(pods: GuestPods, handler: str, name: str) -> str:
    """A pod in its own kubelet pod cgroup, run by `handler`."""
    return pods.run(name, handler=handler)


def runtime_ids(binary: str, root: Path) -> set[str]:
    out = subprocess.run([binary, "--root", str(root), "list", "--format", "json"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return {c["id"] for c in json.loads(out or "[]") or []}


def test_crun_runs_the_pod_lifecycle_with_resources_and_exec(pods: GuestPods) -> None:
    pod_id = run_with(pods, "crun", "crun")
    resources = pb.LinuxContainerResources(memory_limit_in_bytes=48 * MIB, cpu_quota=20000,
                                           cpu_period=100000, cpu_shares=512)
    cid = pods.create(pod_id, "app", GRACEFUL, resources=resources)
    oci = pods.node.daemon.runroot / "oci"
    assert cid in runtime_ids("crun", oci / "crun")
    assert cid not in runtime_ids("runc", oci / "runc")
    status = pods.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    assert status.status.runtime_handler == "crun"

    # crun's systemd mode runs the process, with its limits, in a "container" child of
    # the scope.
    directory = pods.cgroup_dir(cid)
    expected = pods.expected_dir(pod_id, cid)
    assert directory == (expected / "container" if pods.node.driver == "systemd" else expected)
    assert cgroup_file(directory, "memory.max") == str(48 * MIB)
    assert cgroup_file(directory, "cpu.max") == "20000 100000"
    pods.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(memory_limit_in_bytes=80 * MIB)))
    assert cgroup_file(directory, "memory.max") == str(80 * MIB)

    result = pods.exec(cid, "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 4)
    assert pods.exec(cid, "cat", "/proc/self/cgroup").stdout == b"0::/\n"

    # Stats come from that same cgroup.
    stats = pods.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats
    current = int(cgroup_file(directory, "memory.current"))
    assert stats.memory.usage_bytes.value > 0 and \
        abs(stats.memory.usage_bytes.value - current) < 4 * MIB

    pods.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10), timeout=60)
    status_c = pods.status(cid).status
    assert (status_c.state, status_c.exit_code) == (pb.CONTAINER_EXITED, 0)
    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    assert cid not in runtime_ids("crun", oci / "crun")
    assert not directory.exists()


# One driver: which runtime holds which container is the handler's business. (That each
# is found again by its own runtime after a daemon crash is test_events_recovery's crash
# check, on both drivers, which has a crun pod beside the runc ones.)
@pytest.mark.drivers("cgroupfs")
def test_crun_and_runc_pods_side_by_side(pods: GuestPods) -> None:
    crun_pod = run_with(pods, "crun", "side-crun")
    runc_pod = run_with(pods, "", "side-runc")
    a = pods.create(crun_pod, "a", ["sleep", "300"])
    b = pods.create(runc_pod, "b", ["sleep", "300"])
    oci = pods.node.daemon.runroot / "oci"
    assert a in runtime_ids("crun", oci / "crun") and b in runtime_ids("runc", oci / "runc")
    assert a not in runtime_ids("runc", oci / "runc") and b not in runtime_ids("crun", oci / "crun")
    for cid in (a, b):
        assert pods.exec(cid, "echo", cid[:6]).stdout == cid[:6].encode() + b"\n"
