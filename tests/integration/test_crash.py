"""kill -9 of the daemon in the middle of each operation, then a restart: every pod and
container shows its true state, running ones keep running, half-made ones are gone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.pods import Node, Pods, bridge_network, leftovers, remove_cgroup
from tests.support.registry import Registry

_octets = iter(range(40, 80))


@contextmanager
def crashable_node(tmp_path: Path, registry: Registry, images: Any) -> Iterator[Pods]:
    daemon = Daemon(tmp_path / "daemon", insecure_registries=[registry.host])
    with bridge_network(daemon.cni_dir, tmp_path, next(_octets)) as bridge:
        daemon.start()
        pods = Pods(Node(daemon, bridge, images.busybox.ref, tmp_path), tmp_path / "logs")
        try:
            daemon.pull(images.busybox.ref)
            yield pods
        finally:
            daemon.kill()
            daemon.start()
            pods.created = [p.id for p in daemon.runtime.ListPodSandbox(
                pb.ListPodSandboxRequest()).items]
            pods.cleanup()
            leaks = leftovers(daemon, bridge, pods.cgroup_parent)
            daemon.stop()
            remove_cgroup(pods.cgroup_parent)
            assert leaks == [], leaks


def crash_during(pods: Pods, point: str, call: Any, *args: Any) -> None:
    """Restart the daemon armed at `point`, make `call` reach it, restart it clean.

    `call` must look the stub up when called: the restart replaces the channel."""
    daemon = pods.node.daemon
    daemon.stop()
    daemon.start(crash_at=point)
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert daemon.process is not None and daemon.process.wait(30) == -9
    daemon.start()


def pinned_namespaces(daemon: Daemon) -> list[str]:
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if str(daemon.runroot) in line and line.split()[2] == "nsfs"]


def allocated_ips(tmp_path: Path) -> list[str]:
    ipam = tmp_path / "ipam"
    return [p.name for p in ipam.glob("*/*") if p.name[0].isdigit()] if ipam.exists() else []


@pytest.mark.parametrize("point", ["run-pod-after-namespaces", "run-pod-after-network"])
def test_crash_during_run_pod_sandbox(tmp_path: Path, registry: Registry, images: Any,
                                      point: str) -> None:
    with crashable_node(tmp_path, registry, images) as pods:
        crash_during(pods, point, pods.run, "half")
        daemon = pods.node.daemon
        assert list(daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []
        assert pinned_namespaces(daemon) == []
        assert allocated_ips(tmp_path) == []
        pods.run("half")  # the name is free again


@pytest.mark.parametrize("point", ["create-container-after-mount",
                                   "create-container-after-conmon"])
def test_crash_during_create_container(tmp_path: Path, registry: Registry, images: Any,
                                       point: str) -> None:
    with crashable_node(tmp_path, registry, images) as pods:
        pod_id = pods.run("pod")
        crash_during(pods, point, pods.create, pod_id, "c", ["sleep", "300"])
        daemon = pods.node.daemon
        assert list(daemon.runtime.ListContainers(pb.ListContainersRequest()).containers) == []
        assert [x for x in leftovers(daemon, pods.node.bridge, pods.cgroup_parent)
                if not x.startswith(("veth", "mount"))] == []
        assert not any("rootfs" in x for x in leftovers(daemon, pods.node.bridge,
                                                         pods.cgroup_parent))
        cid = pods.create(pod_id, "c", ["sleep", "300"])
        assert pods.exec(cid, "true").exit_code == 0


def test_crash_during_start_container(tmp_path: Path, registry: Registry,
                                      images: Any) -> None:
    with crashable_node(tmp_path, registry, images) as pods:
        pod_id = pods.run("pod")
        cid = pods.create(pod_id, "c", ["sleep", "300"], start=False)
        crash_during(pods, "start-container-after-start", lambda: pods.runtime.StartContainer(
            pb.StartContainerRequest(container_id=cid)))
        assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
        assert pods.exec(cid, "echo", "alive").stdout == b"alive\n"


def test_crash_during_stop_pod_sandbox(tmp_path: Path, registry: Registry,
                                       images: Any) -> None:
    with crashable_node(tmp_path, registry, images) as pods:
        pod_id = pods.run("pod")
        cid = pods.create(pod_id, "c", ["sleep", "300"])
        crash_during(pods, "stop-pod-after-containers", lambda: pods.runtime.StopPodSandbox(
            pb.StopPodSandboxRequest(pod_sandbox_id=pod_id)))
        assert pods.status(cid).status.state == pb.CONTAINER_EXITED
        pods.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        assert pinned_namespaces(pods.node.daemon) == []
        assert allocated_ips(tmp_path) == []


@pytest.mark.parametrize("point", ["stop-pod-after-network", "remove-pod-after-pod-dir"])
def test_crash_during_pod_teardown(tmp_path: Path, registry: Registry, images: Any,
                                   point: str) -> None:
    with crashable_node(tmp_path, registry, images) as pods:
        pod_id = pods.run("pod")
        pods.create(pod_id, "c", ["sleep", "300"])

        def teardown() -> None:
            pods.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
            pods.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

        crash_during(pods, point, teardown)
        teardown()  # what the kubelet does again after the restart
        daemon = pods.node.daemon
        assert list(daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []
        assert pinned_namespaces(daemon) == []
        assert allocated_ips(tmp_path) == []
        assert not (daemon.runroot / "pods" / pod_id).exists()
        assert not (daemon.root / "pods" / pod_id).exists()


def test_exits_while_the_daemon_is_down_are_reported(tmp_path: Path, registry: Registry,
                                                     images: Any) -> None:
    with crashable_node(tmp_path, registry, images) as pods:
        pod_id = pods.run("pod")
        runner = pods.create(pod_id, "runner", ["sleep", "300"])
        quitter = pods.create(pod_id, "quitter", ["sh", "-c", "sleep 1; exit 5"])
        pid = json.loads(pods.status(runner, verbose=True).info["info"])["pid"]
        pods.node.daemon.kill()
        time.sleep(2)
        killed_at = time.time_ns()
        pods.node.daemon.start()
        status = pods.status(quitter).status
        assert status.state == pb.CONTAINER_EXITED and status.exit_code == 5
        assert status.started_at < status.finished_at < killed_at
        assert pods.status(runner).status.state == pb.CONTAINER_RUNNING
        assert Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("point", ["pull-mid-layer", "pull-layer-staged", "pull-after-layer",
                                   "pull-before-image"])
def test_crash_during_pull_image(tmp_path: Path, registry: Registry, images: Any,
                                 point: str) -> None:
    with crashable_node(tmp_path, registry, images) as pods:
        daemon = pods.node.daemon
        ref = images.multilayer.ref
        crash_during(pods, point, daemon.pull, ref)
        ids = {i.id for i in daemon.images.ListImages(pb.ListImagesRequest()).images}
        assert images.multilayer.config_digest not in ids
        assert list((daemon.root / "image" / "tmp").iterdir()) == []
        for layer in (daemon.root / "image" / "layers").iterdir():  # none half-made
            assert (layer / "layer.json").is_file() and (layer / "diff").is_dir(), layer
        assert daemon.pull(ref) == images.multilayer.config_digest
