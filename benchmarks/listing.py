"""ListContainers, ListPodSandbox, ContainerStatus and PodSandboxStatus in process: the
server layer and the runtime's store with N pods of one running container each, as the
kubelet's relist sees them. No gRPC transport and no runc: what cripy itself spends per
object, serialization included (grpc.aio serializes the response in Python).

    python -m benchmarks.listing [--pods 110] [--rounds 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cripy.api import api_pb2 as pb
from cripy.config import Config
from cripy.oci.runtime import OciRuntime
from cripy.runtime.container import ContainerManager
from cripy.runtime.events import EventBus
from cripy.runtime.sandbox import SandboxManager
from cripy.runtime.store import Container, ContainerState, PodState, Sandbox
from cripy.server.container import ContainerRpcs
from cripy.server.sandbox import SandboxRpcs


class Servicer(ContainerRpcs, SandboxRpcs):
    def __init__(self, sandboxes: SandboxManager, containers: ContainerManager) -> None:
        self.sandboxes = sandboxes
        self.containers = containers


def kubelet_pod(index: int) -> pb.PodSandboxConfig:
    """A pod config with the labels and annotations the kubelet sets."""
    name, uid = f"web-{index}", secrets.token_hex(16)
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="default", uid=uid),
        hostname=name, log_directory=f"/var/log/pods/default_{name}_{uid}",
        labels={"app": "web", "io.kubernetes.pod.name": name,
                "io.kubernetes.pod.namespace": "default", "io.kubernetes.pod.uid": uid},
        annotations={"kubernetes.io/config.seen": "2026-01-01T00:00:00Z",
                     "kubernetes.io/config.source": "api"})


def kubelet_container(pod: pb.PodSandboxConfig) -> pb.ContainerConfig:
    labels = dict(pod.labels)
    labels["io.kubernetes.container.name"] = "app"
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="app"),
        image=pb.ImageSpec(image="sha256:" + "1" * 64, user_specified_image="busybox:latest"),
        command=["sleep", "3600"], log_path="app/0.log", labels=labels,
        annotations={"io.kubernetes.container.hash": "8f2b3c1d",
                     "io.kubernetes.container.restartCount": "0",
                     "io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
                     "io.kubernetes.container.terminationMessagePolicy": "File",
                     "io.kubernetes.pod.terminationGracePeriod": "30"})


async def populate(root: Path, pods: int) -> Servicer:
    config = Config(root=str(root / "root"), runroot=str(root / "run"))
    oci = OciRuntime(state_dir=root / "run" / "oci")
    events = EventBus()
    sandboxes = SandboxManager(config, oci, None, events)  # type: ignore[arg-type]
    containers = ContainerManager(config, oci, None, sandboxes, events)  # type: ignore[arg-type]
    sandboxes.containers = containers
    now = time.time_ns()
    for index in range(pods):
        pod = kubelet_pod(index)
        sandbox = await sandboxes.store.add(Sandbox(
            id=secrets.token_hex(32), config=pod, runtime_handler="", created_at=now,
            state=PodState.READY, ips=(f"10.88.{index // 250}.{index % 250 + 2}",)))
        await containers.store.add(Container(
            id=secrets.token_hex(32), sandbox_id=sandbox.id, config=kubelet_container(pod),
            image_id="sha256:" + "1" * 64, pod_name=sandbox.name.removeprefix("k8s_"),
            created_at=now, log_path=str(Path(pod.log_directory) / "app/0.log"),
            state=ContainerState.RUNNING, started_at=now, pid=1000 + index,
            user=(0, 0, 0)))
    return Servicer(sandboxes, containers)


async def measure(call: Callable[[], Awaitable[Any]], rounds: int) -> float:
    """The median seconds of one call, response serialization included."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        response = await call()
        response.SerializeToString()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def main(pods: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        servicer = await populate(Path(tmp), pods)
        context: Any = None
        some = servicer.containers.store.all()[pods // 2]
        calls: dict[str, tuple[Callable[[], Awaitable[Any]], int]] = {
            "ListContainers": (lambda: servicer.ListContainers(
                pb.ListContainersRequest(), context), pods),
            "ListContainers(state=RUNNING)": (lambda: servicer.ListContainers(
                pb.ListContainersRequest(filter=pb.ContainerFilter(
                    state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))), context),
                pods),
            "ListPodSandbox": (lambda: servicer.ListPodSandbox(
                pb.ListPodSandboxRequest(), context), pods),
            "ContainerStatus": (lambda: servicer.ContainerStatus(
                pb.ContainerStatusRequest(container_id=some.id), context), 1),
            "PodSandboxStatus": (lambda: servicer.PodSandboxStatus(
                pb.PodSandboxStatusRequest(pod_sandbox_id=some.sandbox_id), context), 1),
        }
        print(f"{pods} pods, one running container each; median of {rounds} calls")
        for name, (call, objects) in calls.items():
            seconds = await measure(call, rounds)
            print(f"  {name:32} {seconds * 1e6:9.1f} us/call  "
                  f"{seconds * 1e6 / objects:7.2f} us/object")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.pods, args.rounds))
