"""Events and crash recovery on a cgroup v2 node."""

from __future__ import annotations

from pathlib import Path

import pytest

from cripy.api import api_pb2 as pb
from tests.integration.test_events import Subscriber
from tests.vm.guest.node import GuestNode, GuestPods, cgroup_file, wait_for


# One driver: events are published by the daemon's managers, whatever the driver.
@pytest.mark.drivers("cgroupfs")
def test_lifecycle_events(pods: GuestPods) -> None:
    subscriber = Subscriber(pods.node.daemon.endpoint)
    try:
        pod_id = pods.run("events")
        cid = pods.create(pod_id, "c", ["sleep", "300"])
        pods.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
        pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        assert subscriber.until(cid, "deleted") == ["created", "started", "stopped", "deleted"]
        stopped = next(e for e in subscriber.history if e.container_id == cid
                       and e.container_event_type == pb.CONTAINER_STOPPED_EVENT)
        assert stopped.pod_sandbox_status.id == pod_id
    finally:
        subscriber.close()


def test_a_running_container_survives_a_daemon_crash(pods: GuestPods, node: GuestNode) -> None:
    pod_id = pods.run("survivor")
    cid = pods.create(pod_id, "survivor", ["sleep", "300"])
    pid = pods.pid(cid)
    cg = pods.cgroup_dir(cid)
    node.daemon.kill()
    assert Path(f"/proc/{pid}").exists()
    node.daemon.start()
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
    assert pods.pid(cid) == pid and pods.cgroup_dir(cid) == cg
    assert str(pid) in cgroup_file(cg, "cgroup.procs").split()
    assert pods.exec(cid, "echo", "still here").stdout == b"still here\n"
    listed = pods.runtime.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
        state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING)))).containers
    assert cid in [c.id for c in listed]


def test_an_exit_while_the_daemon_is_down_is_reported_after_a_restart(
        pods: GuestPods, node: GuestNode) -> None:
    cid = pods.create(pods.run("gone"), "gone", ["sh", "-c", "sleep 4; exit 7"])
    pid = pods.pid(cid)
    node.daemon.kill()
    wait_for("the container's exit", lambda: not Path(f"/proc/{pid}").exists())
    node.daemon.start()
    status = pods.status(cid).status
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 7, "Error")
    assert status.finished_at > status.started_at
    # removing the pod afterwards leaves nothing (the pods fixture checks cgroups and units)
