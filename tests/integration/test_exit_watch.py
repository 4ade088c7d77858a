"""Exits as a user sees them: reported by the event stream on their own (no status call
asks), with the right code and finish time; exits while the daemon is down or killed are
all there when it is back."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

from cripy.api import api_pb2 as pb
from tests.integration.test_crash import crashable_node
from tests.integration.test_events import Subscriber, subscribers
from tests.support.pods import Pods
from tests.support.registry import Registry

#: How soon after the exit the event must have gone out: generous (a poll would need a
#: quarter of a second at most; a notification takes milliseconds).
PROMPTLY_NS = 1_000_000_000


def stopped_events(sub: Subscriber, ids: set[str], within: float = 30
                   ) -> dict[str, pb.ContainerEventResponse]:
    """The first CONTAINER_STOPPED_EVENT of each of `ids`."""
    found: dict[str, pb.ContainerEventResponse] = {}
    deadline = time.monotonic() + within
    while set(found) != ids and time.monotonic() < deadline:
        try:
            event = sub.events.get(timeout=0.2)
        except queue.Empty:
            continue
        if event.container_id in ids and event.container_id not in found and \
                event.container_event_type == pb.CONTAINER_STOPPED_EVENT:
            found[event.container_id] = event
    assert set(found) == ids, f"no stopped event for {sorted(ids - set(found))}"
    return found


def exited(statuses: Any, cid: str) -> pb.ContainerStatus:
    found: list[pb.ContainerStatus] = [s for s in statuses if s.id == cid]
    assert len(found) == 1 and found[0].state == pb.CONTAINER_EXITED, found
    return found[0]


def test_exits_are_reported_promptly_without_a_status_call(pods: Pods) -> None:
    (sub,) = subscribers(pods, 1)
    try:
        pod_id = pods.run("quick")
        sleeper = pods.create(pod_id, "sleeper", ["sleep", "300"])
        # Several containers of the pod, ending close together.
        codes = {pods.create(pod_id, f"q{code}", ["sh", "-c", f"sleep 1; exit {code}"]): code
                 for code in range(1, 6)}
        events = stopped_events(sub, set(codes))
        late = [(events[cid].created_at - exited(events[cid].containers_statuses,
                                                 cid).finished_at) / 1e6 for cid in codes]
        print("exit to event, ms:", " ".join(f"{ms:.1f}" for ms in late))
        for cid, code in codes.items():
            event = events[cid]
            status = exited(event.containers_statuses, cid)
            assert (status.exit_code, status.reason) == (code, "Error")
            assert status.started_at < status.finished_at <= event.created_at
            assert event.created_at - status.finished_at < PROMPTLY_NS, \
                f"reported {(event.created_at - status.finished_at) / 1e6:.0f} ms late"
            assert event.pod_sandbox_status.id == pod_id
        # Served from memory, as the events said.
        listed = pods.runtime.ListContainers(pb.ListContainersRequest(
            filter=pb.ContainerFilter(pod_sandbox_id=pod_id))).containers
        assert {c.id: c.state for c in listed} == {
            sleeper: pb.CONTAINER_RUNNING, **{cid: pb.CONTAINER_EXITED for cid in codes}}
        for cid, code in codes.items():
            status = pods.status(cid).status
            assert status.exit_code == code
            assert status.finished_at == exited(events[cid].containers_statuses,
                                                cid).finished_at
    finally:
        sub.close()


def test_an_exit_right_after_the_start_is_reported_once(pods: Pods) -> None:
    (sub,) = subscribers(pods, 1)
    try:
        pod_id = pods.run("instant")
        cid = pods.create(pod_id, "instant", ["true"])
        kinds = sub.until(cid, "stopped")
        assert kinds == ["created", "started", "stopped"]
        status = pods.status(cid).status
        assert (status.state, status.exit_code, status.reason) == (
            pb.CONTAINER_EXITED, 0, "Completed")
        pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        assert sub.until(cid, "deleted") == ["deleted"]  # no second "stopped"
    finally:
        sub.close()


def test_exits_while_the_daemon_is_stopped_are_there_at_its_start(
        tmp_path: Path, registry: Registry, images: Any) -> None:
    with crashable_node(tmp_path, registry, images) as pods:
        pod_id = pods.run("down")
        runner = pods.create(pod_id, "runner", ["sleep", "300"])
        quitter = pods.create(pod_id, "quitter", ["sh", "-c", "sleep 2; exit 7"])
        daemon = pods.node.daemon
        assert daemon.stop() == 0  # a clean stop: the watch is closed
        stopped_at = time.time_ns()
        time.sleep(3.5)
        daemon.start()
        listed = {c.id: c.state for c in pods.runtime.ListContainers(
            pb.ListContainersRequest()).containers}
        assert listed == {quitter: pb.CONTAINER_EXITED, runner: pb.CONTAINER_RUNNING}
        status = pods.status(quitter).status
        assert status.exit_code == 7
        assert stopped_at < status.finished_at < stopped_at + 3_500_000_000


def test_a_killed_daemon_loses_no_exit(tmp_path: Path, registry: Registry,
                                       images: Any) -> None:
    with crashable_node(tmp_path, registry, images) as pods:
        pod_id = pods.run("inflight")
        # Exits spread over seconds; the daemon is killed in the middle of them.
        codes = {pods.create(pod_id, f"q{i}", ["sh", "-c", f"sleep {1 + i * 0.5}; exit {i}"]):
                 i for i in range(1, 11)}
        sub = Subscriber(pods.node.daemon.endpoint)
        try:
            first = stopped_events(sub, set(list(codes)[:1]))
        finally:
            sub.close()
        pods.node.daemon.kill()
        killed_at = time.time_ns()
        time.sleep(7)  # every one has ended
        pods.node.daemon.start()
        finished = {}
        for cid, code in codes.items():
            status = pods.status(cid).status
            assert (status.state, status.exit_code) == (pb.CONTAINER_EXITED, code), cid
            finished[code] = status.finished_at
        # Recorded as conmon saw them: in the order they ended, some before the kill,
        # some after it.
        assert [finished[i] for i in sorted(finished)] == sorted(finished.values())
        assert finished[1] == exited(first[list(codes)[0]].containers_statuses,
                                     list(codes)[0]).finished_at
        assert min(finished.values()) < killed_at < max(finished.values())
