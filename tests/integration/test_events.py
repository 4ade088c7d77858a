"""GetContainerEvents: every lifecycle step reaches every subscriber, slow ones don't stall."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from cripy.api import api_pb2 as pb
from cripy.api import api_pb2_grpc
from tests.support.daemon import Daemon
from tests.support.pods import Pods, pod_config

NAMES = {pb.CONTAINER_CREATED_EVENT: "created", pb.CONTAINER_STARTED_EVENT: "started",
         pb.CONTAINER_STOPPED_EVENT: "stopped", pb.CONTAINER_DELETED_EVENT: "deleted"}


class Subscriber:
    """Reads the event stream on its own channel in a thread."""

    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.stream = api_pb2_grpc.RuntimeServiceStub(self.channel).GetContainerEvents(
            pb.GetEventsRequest())
        self.events: queue.Queue[pb.ContainerEventResponse] = queue.Queue()
        self.history: list[pb.ContainerEventResponse] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                self.events.put(event)
        except grpc.RpcError:
            pass

    def until(self, object_id: str, kind: str, within: float = 15) -> list[str]:
        """Event kinds seen for `object_id` up to and including `kind`."""
        seen: list[str] = []
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            self.history.append(event)
            if event.container_id == object_id:
                seen.append(NAMES[event.container_event_type])
                if seen[-1] == kind:
                    return seen
        raise AssertionError(f"no {kind} event for {object_id}; saw {seen}")

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()


def subscribers(pods: Pods, count: int) -> Iterator[Subscriber]:
    subs = [Subscriber(pods.node.daemon.endpoint) for _ in range(count)]
    time.sleep(0.3)  # let the streams be established
    return iter(subs)


def test_lifecycle_events_reach_every_subscriber(pods: Pods) -> None:
    subs = list(subscribers(pods, 3))
    try:
        pod_id = pods.run("events")
        cid = pods.create(pod_id, "c", ["sleep", "300"])
        pods.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
        pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        for sub in subs:
            assert sub.until(cid, "deleted") == ["created", "started", "stopped", "deleted"]
            pod_events = [NAMES[e.container_event_type] for e in sub.history
                          if e.container_id == pod_id]
            assert pod_events == ["created", "started"]
    finally:
        for sub in subs:
            sub.close()


def test_an_exit_is_reported_with_the_pod_and_container_status(pods: Pods) -> None:
    (sub,) = subscribers(pods, 1)
    try:
        pod_id = pods.run("exits")
        cid = pods.create(pod_id, "quick", ["sh", "-c", "exit 4"])
        deadline = time.monotonic() + 15
        stopped: Any = None
        while stopped is None and time.monotonic() < deadline:
            event = sub.events.get(timeout=15)
            if event.container_id == cid and \
                    event.container_event_type == pb.CONTAINER_STOPPED_EVENT:
                stopped = event
        assert stopped is not None
        assert stopped.pod_sandbox_status.id == pod_id
        (status,) = [s for s in stopped.containers_statuses if s.id == cid]
        assert status.state == pb.CONTAINER_EXITED and status.exit_code == 4
    finally:
        sub.close()


def test_a_subscriber_that_never_reads_does_not_slow_the_daemon(pods: Pods) -> None:
    stalled = grpc.insecure_channel(pods.node.daemon.endpoint)
    stream = api_pb2_grpc.RuntimeServiceStub(stalled).GetContainerEvents(pb.GetEventsRequest())
    (reader,) = subscribers(pods, 1)
    try:
        pod_id = pods.run("busy")
        started = time.monotonic()
        ids = [pods.create(pod_id, f"c{i}", ["true"], start=False) for i in range(15)]
        for cid in ids:
            pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        assert time.monotonic() - started < 60
        assert reader.until(ids[-1], "deleted")[-1] == "deleted"
    finally:
        stream.cancel()
        stalled.close()
        reader.close()


# --- the evented PLEG: statuses in PodSandboxStatus and in the events ----------------------


def next_event(sub: Subscriber, object_id: str,
               kind: pb.ContainerEventType) -> pb.ContainerEventResponse:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            event = sub.events.get(timeout=0.2)
        except queue.Empty:
            continue
        if event.container_id == object_id and event.container_event_type == kind:
            return event
    raise AssertionError(f"no {NAMES[kind]} event for {object_id}")


def states(statuses: Any) -> dict[str, int]:
    return {s.id: s.state for s in statuses}


def test_pod_status_and_events_carry_every_container_status(pods: Pods) -> None:
    (sub,) = subscribers(pods, 1)
    try:
        pod_id = pods.run("pleg")
        empty = pods.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
        assert empty.timestamp > 0 and list(empty.containers_statuses) == []  # truly none

        sleeper = pods.create(pod_id, "sleeper", ["sleep", "300"])
        quitter = pods.create(pod_id, "quitter", ["sh", "-c", "exit 3"])
        stopped = next_event(sub, quitter, pb.CONTAINER_STOPPED_EVENT)
        # The event carries the whole pod, so the kubelet's cache keeps the sleeper.
        assert stopped.pod_sandbox_status.id == pod_id
        assert states(stopped.containers_statuses) == {
            sleeper: pb.CONTAINER_RUNNING, quitter: pb.CONTAINER_EXITED}

        status = pods.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
        assert states(status.containers_statuses) == {
            sleeper: pb.CONTAINER_RUNNING, quitter: pb.CONTAINER_EXITED}
        (quit_status,) = [s for s in status.containers_statuses if s.id == quitter]
        assert quit_status.exit_code == 3 and quit_status.metadata.name == "quitter"
        assert empty.timestamp < stopped.created_at <= status.timestamp

        # Later events are newer than the status the kubelet cached.
        pods.runtime.StopContainer(pb.StopContainerRequest(container_id=sleeper, timeout=0))
        later = next_event(sub, sleeper, pb.CONTAINER_STOPPED_EVENT)
        assert later.created_at > status.timestamp
        assert set(states(later.containers_statuses).values()) == {pb.CONTAINER_EXITED}
        pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=quitter))
        deleted = next_event(sub, quitter, pb.CONTAINER_DELETED_EVENT)
        assert list(states(deleted.containers_statuses)) == [sleeper]
        verbose = pods.runtime.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
        assert list(states(verbose.containers_statuses)) == [sleeper]
        assert verbose.timestamp > later.created_at and "info" in verbose.info
    finally:
        sub.close()


def test_without_pod_events_only_verbose_status_has_statuses(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "daemon", extra_config="[runtime]\nenable_pod_events = false\n")
    with daemon:
        config = pod_config("quiet", tmp_path / "logs", network=pb.NODE)
        pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config),
                                              timeout=60).pod_sandbox_id
        try:
            plain = daemon.runtime.PodSandboxStatus(
                pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
            assert plain.status.id == pod_id
            assert plain.timestamp == 0  # the kubelet lists the containers itself then
            verbose = daemon.runtime.PodSandboxStatus(
                pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
            assert verbose.timestamp > 0 and list(verbose.containers_statuses) == []
        finally:
            daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
            daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
