"""StopContainer with no grace period (the kubelet's force stop, a pod's stop): SIGKILL
at once, whatever the container's state, with the right exit recorded."""

from __future__ import annotations

import time

from cripy.api import api_pb2 as pb
from tests.support.pods import Pods


def stop_now(pods: Pods, cid: str) -> float:
    started = time.monotonic()
    pods.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    return time.monotonic() - started


def test_a_running_container_is_killed_at_once(pods: Pods) -> None:
    pod_id = pods.run("kill-now")
    # A shell as PID 1 ignores SIGTERM: only the SIGKILL ends it.
    cid = pods.create(pod_id, "stubborn", ["sh", "-c", "trap '' TERM; sleep 300"])
    assert stop_now(pods, cid) < 5
    status = pods.status(cid).status
    assert (status.state, status.exit_code, status.reason) == (
        pb.CONTAINER_EXITED, 137, "Error")  # ours, not the OOM killer's
    assert stop_now(pods, cid) < 5  # stopping a stopped one succeeds
    assert pods.status(cid).status.exit_code == 137


def test_a_created_container_is_stopped_before_its_start(pods: Pods) -> None:
    pod_id = pods.run("kill-created")
    cid = pods.create(pod_id, "never", ["sleep", "300"], start=False)
    stop_now(pods, cid)
    status = pods.status(cid).status
    assert (status.state, status.exit_code, status.reason) == (
        pb.CONTAINER_EXITED, 255, "Error")
    assert status.message == "stopped before it was started"
    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_a_container_that_ended_on_its_own_keeps_its_exit(pods: Pods) -> None:
    pod_id = pods.run("ended")
    cid = pods.create(pod_id, "done", ["sh", "-c", "exit 3"])
    pods.wait_exited(cid)
    stop_now(pods, cid)
    status = pods.status(cid).status
    assert (status.exit_code, status.reason) == (3, "Error")
