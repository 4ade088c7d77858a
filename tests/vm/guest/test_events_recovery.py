"""Events and crash recovery on a cgroup v2 node."""

from __future__ import annotations

from pathlib import Path

import pytest

from cripy.api import api_pb2 as pb
from tests.integration.test_events import Subscriber
from tests.vm.guest.node import GuestNode, GuestPods, cgroup_file, wait_for
from tests.vm.guest.test_crun import run_with


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


def test_a_daemon_crash_keeps_running_containers_and_reports_exits_meanwhile(
        pods: GuestPods, node: GuestNode) -> None:
    """One crash for all of it (a daemon start is the dear part under emulation): a
    running container survives it in its cgroup (with systemd: its scope, which must not
    be left behind afterwards either; test_systemd_driver has no crash check of its own),
    a crun container beside it is found again by crun, and one that exits while the
    daemon is down is reported after the restart."""
    pod_id = pods.run("survivor")
    cid = pods.create(pod_id, "survivor", ["sleep", "300"])
    by_crun = pods.create(run_with(pods, "crun", "survivor-crun"), "by-crun", ["sleep", "300"])
    # Exits with 7 once told to (through its root, while the daemon is down).
    gone = pods.create(pods.run("gone"), "gone",
                       ["sh", "-c", "until [ -e /tmp/exit-now ]; do sleep 0.1; done; exit 7"])
    pid, gone_pid = pods.pid(cid), pods.pid(gone)
    cg = pods.cgroup_dir(cid)
    node.daemon.kill()
    assert Path(f"/proc/{pid}").exists()
    assert str(pid) in cgroup_file(cg, "cgroup.procs").split()  # its cgroup (scope) lives on
    Path(f"/proc/{gone_pid}/root/tmp/exit-now").touch()
    wait_for("the container's exit", lambda: not Path(f"/proc/{gone_pid}").exists())
    node.daemon.start()

    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
    assert pods.pid(cid) == pid and pods.cgroup_dir(cid) == cg
    assert str(pid) in cgroup_file(cg, "cgroup.procs").split()
    assert pods.exec(cid, "echo", "still here").stdout == b"still here\n"
    assert pods.status(by_crun).status.state == pb.CONTAINER_RUNNING
    assert pods.exec(by_crun, "echo", "crun too").stdout == b"crun too\n"
    listed = pods.runtime.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
        state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING)))).containers
    assert {cid, by_crun} <= {c.id for c in listed} and gone not in [c.id for c in listed]

    status = pods.status(gone).status
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 7, "Error")
    assert status.finished_at > status.started_at

    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    assert not cg.exists()
    # removing the pods afterwards leaves nothing (the pods fixture checks cgroups, scopes
    # and units)
