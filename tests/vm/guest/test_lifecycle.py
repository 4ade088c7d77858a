"""A pod's life on a cgroup v2 node: run, create, start, exec, stop, remove, and where
its containers' cgroups are."""

from __future__ import annotations

from cripy.api import api_pb2 as pb
from tests.vm.guest.node import GuestPods, cgroup_file

#: Exits 0 on SIGTERM, as a well-behaved workload does.
GRACEFUL = ["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"]


def test_pod_lifecycle_in_the_kubelet_layout(pods: GuestPods) -> None:
    pod_id = pods.run("life")
    cid = pods.create(pod_id, "app", GRACEFUL)
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
    directory = pods.cgroup_dir(cid)
    assert directory == pods.expected_dir(pod_id, cid)
    assert str(pods.pid(cid)) in cgroup_file(directory, "cgroup.procs").split()

    result = pods.exec(cid, "sh", "-c", "echo hello; echo oops >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == (b"hello\n", b"oops\n", 3)

    pods.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10), timeout=60)
    status = pods.status(cid).status
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 0,
                                                               "Completed")
    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    assert not directory.exists()
    listed = pods.runtime.ListContainers(pb.ListContainersRequest()).containers
    assert cid not in [c.id for c in listed]
    pods.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    pods.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    assert pod_id not in [p.id for p in
                          pods.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items]
