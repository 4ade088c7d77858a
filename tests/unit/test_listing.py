"""List and status responses built from per-snapshot encodings: the same messages the
plain conversion gives, new ones after every change, and no entry outliving its object."""

from __future__ import annotations

import dataclasses
import gc

import pytest

from cripy.api import api_pb2 as pb
from cripy.runtime.store import Container, ContainerState, PodState, Sandbox
from cripy.server.container import STATUSES, container_item, container_status
from cripy.server.listing import Encodings, varint
from cripy.server.sandbox import pod_status, sandbox_item


def container(index: int, **changes: object) -> Container:
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=f"c{index}", attempt=index),
        image=pb.ImageSpec(image="busybox"),
        labels={"app": "web", "io.kubernetes.pod.name": f"p{index}"},
        annotations={"io.kubernetes.container.hash": f"{index:08x}"})
    made = Container(id=f"{index:064x}", sandbox_id="f" * 64, config=config,
                     image_id="sha256:" + "1" * 64, pod_name=f"p{index}", created_at=index,
                     log_path="", state=ContainerState.RUNNING, started_at=index + 1,
                     user=(0, 0))
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]


def sandbox(index: int) -> Sandbox:
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=f"p{index}", namespace="default", uid="u"),
        labels={"app": "web"}, annotations={"seen": "now"})
    return Sandbox(id=f"{index:064x}", config=config, runtime_handler="runc",
                   created_at=index, state=PodState.READY, ips=("10.88.0.2", "fd00::2"))


@pytest.mark.parametrize(("value", "encoded"), [
    (0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02"),
    (1 << 32, b"\x80\x80\x80\x80\x10")])
def test_varint(value: int, encoded: bytes) -> None:
    assert varint(value) == encoded


def test_a_list_is_what_the_plain_conversion_gives() -> None:
    encodings = Encodings(container_item)
    objs = [container(i) for i in range(5)]
    listed = encodings.response(pb.ListContainersResponse, "containers", objs)
    assert listed == pb.ListContainersResponse(containers=[container_item(c) for c in objs])
    again = encodings.response(pb.ListContainersResponse, "containers", objs[1:3])
    assert [c.id for c in again.containers] == [objs[1].id, objs[2].id]
    assert encodings.response(pb.ListContainersResponse, "containers", []) == \
        pb.ListContainersResponse()
    pods = [sandbox(i) for i in range(3)]
    assert Encodings(sandbox_item).response(pb.ListPodSandboxResponse, "items", pods) == \
        pb.ListPodSandboxResponse(items=[sandbox_item(s) for s in pods])


def test_a_changed_object_is_encoded_anew_and_the_old_entry_goes() -> None:
    encodings = Encodings(container_item)
    running = container(1)
    assert encodings.response(pb.ListContainersResponse, "containers", [running]) \
        .containers[0].state == pb.CONTAINER_RUNNING
    exited = dataclasses.replace(running, state=ContainerState.EXITED, exit_code=3)
    assert encodings.response(pb.ListContainersResponse, "containers", [exited]) \
        .containers[0].state == pb.CONTAINER_EXITED
    assert len(encodings) == 2
    del running
    gc.collect()
    assert len(encodings) == 1  # bounded by the objects alive
    del exited
    gc.collect()
    assert len(encodings) == 0


def test_status_responses_hold_the_plain_statuses() -> None:
    c = container(7, state=ContainerState.EXITED, exit_code=2, finished_at=99,
                  reason="Error")
    status = STATUSES.response(pb.ContainerStatusResponse, "status", (c,))
    assert status == pb.ContainerStatusResponse(status=container_status(c))
    peers = [c, container(8)]
    pod = Encodings(pod_status).response(pb.PodSandboxStatusResponse, "status", (sandbox(1),))
    pod.MergeFromString(STATUSES.field(pb.PodSandboxStatusResponse, "containers_statuses",
                                       peers))
    assert pod == pb.PodSandboxStatusResponse(
        status=pod_status(sandbox(1)), containers_statuses=[container_status(p) for p in peers])
    assert STATUSES.field(pb.PodSandboxStatusResponse, "containers_statuses", []) == b""
