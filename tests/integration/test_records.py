"""The runtime store against a real daemon: CreateContainer racing StopPodSandbox, records
written by an older cripy, and a corrupt record set aside while the rest is served."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import grpc

from cripy.api import api_pb2 as pb
from tests.integration.test_crash import crashable_node
from tests.support.pods import Pods, container_config
from tests.support.registry import Registry


def race_once(pods: Pods, create_delay: float, stop_delay: float) -> str:
    """CreateContainer and StopPodSandbox in two threads, each after its delay; the
    outcome, checked: the container was stopped with its pod, or refused."""
    pod_id = pods.run()
    request = pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, sandbox_config=pods.config(pod_id),
        config=container_config("racer", pods.node.image, ["sleep", "300"]))
    created: list[str] = []
    errors: list[grpc.RpcError] = []

    def create() -> None:
        threading.Event().wait(create_delay)
        try:
            created.append(pods.runtime.CreateContainer(request, timeout=60).container_id)
        except grpc.RpcError as exc:
            errors.append(exc)

    def stop() -> None:
        threading.Event().wait(stop_delay)
        pods.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                    timeout=60)

    threads = [threading.Thread(target=create), threading.Thread(target=stop)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    only_pod = pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=pod_id))
    listed = pods.runtime.ListContainers(only_pod).containers
    if created:
        outcome = "stopped with the pod"
        assert [(c.id, c.state) for c in listed] == [(created[0], pb.CONTAINER_EXITED)]
    else:
        outcome = "refused"
        [error] = errors
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert "is not ready" in str(error.details())
        assert list(listed) == []
    pods.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                  timeout=60)
    assert not pods.runtime.ListContainers(only_pod).containers
    return outcome


def test_create_racing_stop_pod_leaves_nothing_behind(pods: Pods) -> None:
    rng = random.Random(10)
    outcomes = [race_once(pods, rng.random() * 0.06, rng.random() * 0.06) for _ in range(16)]
    # Both orders were exercised (the fixture then checks for leftover mounts, conmons).
    assert set(outcomes) == {"stopped with the pod", "refused"}, outcomes


def record_path(daemon: Any, kind: str, object_id: str) -> Path:
    name = "pod" if kind == "pods" else "container"
    return Path(daemon.root) / kind / object_id / f"{name}.json"


def test_records_of_an_older_cripy_load(tmp_path: Path, registry: Registry,
                                        images: Any) -> None:
    with crashable_node(tmp_path, registry, images) as pods:
        daemon = pods.node.daemon
        pod_id = pods.run("old")
        cid = pods.create(pod_id, "c", ["sleep", "300"])
        daemon.stop()
        # As cripy wrote them before records had a version (and before some fields).
        for kind, object_id, dropped in (("pods", pod_id, ("infra_pid",)),
                                         ("containers", cid, ("stop_signal", "message"))):
            path = record_path(daemon, kind, object_id)
            record = json.loads(path.read_text())
            assert record.pop("schema_version") == 2
            for name in dropped:
                del record[name]
            path.write_text(json.dumps(record))
        daemon.start()
        status = pods.status(cid).status
        assert status.state == pb.CONTAINER_RUNNING
        assert pods.exec(cid, "echo", "still here").stdout == b"still here\n"
        pods.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0),
                                   timeout=60)
        assert pods.status(cid).status.state == pb.CONTAINER_EXITED
        assert json.loads(record_path(daemon, "containers", cid).read_text())[
            "schema_version"] == 2  # written anew in the current version


def test_a_corrupt_record_is_quarantined_and_the_rest_served(tmp_path: Path,
                                                             registry: Registry,
                                                             images: Any) -> None:
    with crashable_node(tmp_path, registry, images) as pods:
        daemon = pods.node.daemon
        good_pod, bad_pod = pods.run("good"), pods.run("bad")
        good = pods.create(good_pod, "c", ["sleep", "300"])
        bad = pods.create(bad_pod, "c", ["sleep", "300"])
        daemon.stop()
        record_path(daemon, "containers", bad).write_text('{"id": "' + bad + '", "sta')
        daemon.start()
        listed = {c.id: c.state for c in pods.runtime.ListContainers(
            pb.ListContainersRequest()).containers}
        assert listed == {good: pb.CONTAINER_RUNNING}
        assert pods.exec(good, "true").exit_code == 0
        [moved] = list((Path(daemon.root) / "quarantine").iterdir())
        assert moved.name.startswith(f"container-{bad}-")
        assert moved.read_text().startswith('{"id"')
        assert f"container {bad}: record unreadable" in daemon.log()
        # The pod of the unreadable container is still served, and can go.
        states = {p.id: p.state for p in pods.runtime.ListPodSandbox(
            pb.ListPodSandboxRequest()).items}
        assert states == {good_pod: pb.SANDBOX_READY, bad_pod: pb.SANDBOX_READY}
