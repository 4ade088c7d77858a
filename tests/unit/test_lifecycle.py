"""The pod and container lifecycle controllers with fakes of the OCI runtime, CNI, the
image store and the host's mounts: every transition and every refusal, and the ordering
of container operations against the pod's stop and remove. No root, no runc."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cripy.api import api_pb2 as pb
from cripy.config import Config
from cripy.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from cripy.image.store import ImageRecord
from cripy.network.cni import PodNetwork, PortMapping
from cripy.oci.cgroups import CgroupDriver, CgroupfsDriver
from cripy.oci.handlers import RuntimeHandler, select
from cripy.oci.runtime import ExecResult, ExitStatus
from cripy.oci.userns import PodUserns
from cripy.runtime.container import ContainerManager
from cripy.runtime.events import EventBus
from cripy.runtime.exits import ExitWatcher
from cripy.runtime.ports import Host
from cripy.runtime.sandbox import SandboxManager
from cripy.runtime.store import Container, ContainerState, PodState
from cripy.server.container import container_status

IMAGE = ImageRecord(id="sha256:" + "1" * 64, manifest_digest="sha256:" + "2" * 64,
                    layers=["sha256:" + "3" * 64], size=1, repo_tags=["busybox:latest"],
                    repo_digests=[])


# --- fakes ------------------------------------------------------------------------------


class FakeOci:
    """runc as a dict: created -> running -> stopped; exits recorded as conmon would."""

    def __init__(self, tmp: Path) -> None:
        self.cgroups: CgroupDriver = CgroupfsDriver()
        self.handlers = {"runc": RuntimeHandler("runc", "/usr/sbin/runc", tmp / "runc",
                                                "/usr/bin/conmon")}
        self.status: dict[str, str] = {}
        self.exits: dict[str, ExitStatus] = {}
        self.exit_dir = tmp / "exits"  # where "conmon" writes exit files
        self.exit_dir.mkdir()
        self.paused: set[str] = set()
        self.create_gate: asyncio.Event | None = None  # set: creates may finish
        self.creating = asyncio.Event()  # a create is in progress
        self.fail_create = False
        self.exit_at_start: int | None = None  # the process ends as soon as it starts
        self.exit_reads = 0
        self.calls: list[tuple[str, str]] = []

    def handler(self, name: str) -> RuntimeHandler:
        handler = select(self.handlers, "runc", name)
        handler.check_usable()
        return handler

    def container_cgroup(self, cgroup_parent: str, container_id: str, handler: str) -> str:
        return self.cgroups.container_dir(cgroup_parent, container_id)

    async def create(self, container_id: str, bundle: Path, log_path: Path, *,
                     tty: bool = False, stdin: bool = False, stdin_once: bool = False,
                     log_size_max: int = -1, handler: str = "",
                     cgroup_parent: str = "", restore_from: Path | None = None) -> int:
        self.handler(handler)
        self.calls.append(("create", container_id))
        assert (bundle / "config.json").is_file()
        self.creating.set()
        if self.create_gate is not None:
            await self.create_gate.wait()
        if self.fail_create:
            raise FailedPreconditionError(f"runc create of container {container_id} failed")
        self.status[container_id] = "created"
        return 1000 + len(self.calls)

    async def start(self, container_id: str) -> None:
        self.calls.append(("start", container_id))
        assert self.status[container_id] == "created"
        self.status[container_id] = "running"
        if self.exit_at_start is not None:
            self.exit(container_id, self.exit_at_start)

    def exit(self, container_id: str, code: int, oom: bool = False) -> None:
        """The container's process ends by itself."""
        self.status[container_id] = "stopped"
        self.exits[container_id] = ExitStatus(code, 1234, oom)
        (self.exit_dir / container_id).write_text(str(code))

    async def stop(self, container_id: str, timeout: float,
                   stop_signal: int = signal.SIGTERM) -> None:
        self.calls.append(("stop", container_id))
        if self.status.get(container_id) in ("created", "running"):
            self.exit(container_id, 128 + signal.SIGKILL)

    async def delete(self, container_id: str) -> None:
        self.calls.append(("delete", container_id))
        self.status.pop(container_id, None)
        self.exits.pop(container_id, None)
        (self.exit_dir / container_id).unlink(missing_ok=True)

    async def state(self, container_id: str) -> dict[str, Any] | None:
        status = self.status.get(container_id)
        if status is None:
            return None
        return {"status": "paused" if container_id in self.paused else status}

    def exit_status(self, container_id: str) -> ExitStatus | None:
        self.exit_reads += 1
        return self.exits.get(container_id)

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        self.calls.append(("update", container_id))

    async def pause(self, container_id: str) -> None:
        self.paused.add(container_id)

    def runc_argv(self, *args: str, container_id: str | None = None) -> list[str]:
        return ["runc", *args]

    async def resume(self, container_id: str) -> None:
        self.paused.discard(container_id)

    async def exec_sync(self, container_id: str, args: list[str], *,
                        timeout: float | None) -> ExecResult:
        return ExecResult(0, " ".join(args).encode(), b"", False)

    async def reopen_log(self, container_id: str) -> None:
        self.calls.append(("reopen_log", container_id))

    def live(self) -> list[str]:
        return [cid for cid, status in self.status.items() if status != "stopped"]


class FakeNetwork:
    def __init__(self) -> None:
        self.pod_cidr = ""
        self.config_dir = ""
        self.attached: dict[str, str] = {}
        self.fail_setup = False

    async def setup(self, pod_id: str, netns: Path, *, pod_name: str, pod_namespace: str,
                    pod_uid: str, port_mappings: Sequence[PortMapping] = (),
                    lo_is_up: bool = False) -> PodNetwork:
        if self.fail_setup:
            raise FailedPreconditionError("no network")
        ip = f"10.88.0.{len(self.attached) + 2}"
        self.attached[pod_id] = ip
        return PodNetwork(ips=[ip], interface="eth0", result={})

    async def teardown(self, pod_id: str, netns: Path | None) -> None:
        self.attached.pop(pod_id, None)


class FakeHost(Host):
    """Mounts and pins as directories and a set of mount points."""

    def __init__(self) -> None:
        self.mounts: set[Path] = set()

    async def pin_namespaces(self, directory: Path, kinds: Sequence[str],
                             hostname: str | None, userns: PodUserns | None = None
                             ) -> dict[str, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        pinned = {kind: directory / kind for kind in [*kinds, *(["user"] if userns else [])]}
        for path in pinned.values():
            path.touch()
            self.mounts.add(path)
        return pinned

    async def unpin_namespaces(self, directory: Path) -> None:
        for path in [m for m in self.mounts if m.parent == directory]:
            self.mounts.discard(path)
            path.unlink()

    def is_pinned(self, path: Path) -> bool:
        return path in self.mounts

    async def mount_tmpfs(self, target: Path, options: str) -> None:
        target.mkdir(parents=True, exist_ok=True)
        self.mounts.add(target)

    async def mount_overlay(self, layers_root: Path, lowers: list[str], upper: Path,
                            work: Path, target: Path) -> None:
        for d in (upper, work, target):
            d.mkdir(parents=True, exist_ok=True)
        self.mounts.add(target)

    async def unmount(self, target: Path) -> None:
        self.mounts.discard(target)


@dataclass
class FakeLayers:
    layers: Path

    def layer_dir(self, diff_id: str) -> Path:
        return self.layers / diff_id.removeprefix("sha256:")

    def get(self, image_id: str) -> ImageRecord | None:
        return IMAGE if image_id == IMAGE.id else None

    def read_blob(self, digest: str) -> bytes:
        return b'{"schemaVersion": 2, "layers": []}'


@dataclass
class FakeImages:
    store: FakeLayers

    def lookup(self, text: str) -> ImageRecord | None:
        return IMAGE if text in ("busybox", IMAGE.id) else None

    def image_config(self, record: ImageRecord) -> dict[str, Any]:
        return {"config": {"Cmd": ["sh"], "StopSignal": "SIGQUIT"}}


@dataclass
class Node:
    tmp: Path
    oci: FakeOci = field(init=False)
    cni: FakeNetwork = field(default_factory=FakeNetwork)
    host: FakeHost = field(default_factory=FakeHost)
    events: EventBus = field(default_factory=EventBus)
    seen: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.oci = FakeOci(self.tmp)
        self.config = Config(root=str(self.tmp / "root"), runroot=str(self.tmp / "run"))
        self.make()

    def make(self) -> None:
        """The controllers, as the daemon builds them (again: a restart)."""
        self.sandboxes = SandboxManager(self.config, self.oci, self.cni, self.events,
                                        self.host)
        images = FakeImages(FakeLayers(self.tmp / "layers"))
        self.containers = ContainerManager(self.config, self.oci, images, self.sandboxes,
                                           self.events, self.host)
        self.sandboxes.containers = self.containers

    async def pod(self, name: str = "web", **linux: Any) -> str:
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace="default", uid=f"u-{name}"),
            log_directory=str(self.tmp / "logs" / name))
        options = config.linux.security_context.namespace_options
        options.pid = linux.get("pid", pb.CONTAINER)
        return (await self.sandboxes.run(config, "")).id

    async def create(self, pod_id: str, name: str = "app", image: str = "busybox") -> str:
        config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name),
                                    image=pb.ImageSpec(image=image), command=["sleep", "9"],
                                    log_path=f"{name}.log")
        sandbox = self.sandboxes.get(pod_id)
        return (await self.containers.create(pod_id, config, sandbox.config)).id

    async def watch(self) -> None:
        async for event in self.events.subscribe():
            self.seen.append((event.kind, event.object_id))

    async def exited(self, container_id: str) -> Container:
        """The container once the exit watcher has recorded its exit."""
        for _ in range(500):
            container = self.containers.store.get(container_id)
            if container.state == ContainerState.EXITED:
                return container
            await asyncio.sleep(0.01)
        raise AssertionError(f"the exit of container {container_id} was not noticed")

    async def events_seen(self) -> list[tuple[str, str]]:
        await asyncio.sleep(0.01)  # the subscriber's turn
        return self.seen

    def leftovers(self) -> list[str]:
        """What a test must not leave: live runc containers, mounts, pod networks."""
        return ([f"runc {c}" for c in self.oci.live()] + [f"mount {m}" for m in self.host.mounts]
                + [f"network {p}" for p in self.cni.attached])


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    yield Node(tmp_path)


def run(node: Node, scenario: Callable[[Node], Awaitable[None]]) -> None:
    async def main() -> None:
        watcher = asyncio.create_task(node.watch())
        exits = ExitWatcher(node.oci.exit_dir, lambda ids: node.containers.notice_exits(ids))
        await exits.start()
        await asyncio.sleep(0)
        try:
            await scenario(node)
            await asyncio.sleep(0)
        finally:
            watcher.cancel()
            await exits.close()

    asyncio.run(main())


# --- pods -------------------------------------------------------------------------------


def test_pod_lifecycle(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        pod = n.sandboxes.get(pod_id[:6])
        assert pod.state == PodState.READY
        assert pod.ips == ("10.88.0.2",)
        assert set(pod.namespaces) == {"net", "uts", "ipc"}
        assert (n.sandboxes.pod_dir(pod_id) / "hosts").read_text().endswith("10.88.0.2\tweb\n")
        await n.sandboxes.stop(pod_id)
        assert n.sandboxes.get(pod_id).state == PodState.NOTREADY
        assert n.leftovers() == []
        await n.sandboxes.stop(pod_id)  # again: nothing more happens
        await n.sandboxes.remove(pod_id)
        await n.sandboxes.remove(pod_id)
        await n.sandboxes.stop(pod_id)
        with pytest.raises(NotFoundError):
            n.sandboxes.get(pod_id)
        assert not n.sandboxes.pod_dir(pod_id).exists()
        assert not n.sandboxes.store.object_dir(pod_id).exists()
        assert await n.events_seen() == [("created", pod_id), ("started", pod_id),
                                         ("stopped", pod_id), ("deleted", pod_id)]

    run(node, scenario)


def test_pod_refusals(node: Node) -> None:
    async def scenario(n: Node) -> None:
        await n.pod("web")
        with pytest.raises(AlreadyExistsError, match="already in use"):
            await n.pod("web")
        with pytest.raises(InvalidArgumentError, match="metadata.name is empty"):
            await n.pod("")
        with pytest.raises(InvalidArgumentError, match="unknown runtime handler"):
            await n.sandboxes.run(pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(
                name="x", namespace="y", uid="z")), "kata")
        n.cni.fail_setup = True
        with pytest.raises(FailedPreconditionError, match="no network"):
            await n.pod("db")
        assert [s.name for s in n.sandboxes.all()] == ["k8s_web_default_u-web_0"]
        assert len(n.host.mounts) == 4  # web's: net, uts, ipc and shm; nothing of db

    run(node, scenario)


# --- containers -------------------------------------------------------------------------


def test_stop_signal_and_user_are_recorded_and_survive_a_restart(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="app"), image=pb.ImageSpec(image="busybox"),
            command=["sleep", "9"], stop_signal=pb.SIGUSR1)
        config.linux.security_context.run_as_user.value = 1000
        config.linux.security_context.run_as_group.value = 2000
        config.linux.security_context.supplemental_groups.append(3000)
        cid = (await n.containers.create(pod_id, config, n.sandboxes.get(pod_id).config)).id
        c = await n.containers.get(cid)
        assert (c.stop_signal, c.user) == (signal.SIGUSR1, (1000, 2000, 2000, 3000))
        status = container_status(c)
        assert status.stop_signal == pb.SIGUSR1
        assert (status.user.linux.uid, status.user.linux.gid,
                list(status.user.linux.supplemental_groups)) == (1000, 2000, [2000, 3000])
        n.make()  # a restart reads the record back
        await n.sandboxes.recover()
        await n.containers.recover()
        assert (await n.containers.get(cid)).user == (1000, 2000, 2000, 3000)
        config.stop_signal = 99  # type: ignore[assignment]
        with pytest.raises(InvalidArgumentError, match="stop_signal 99"):
            await n.containers.create(pod_id, config, n.sandboxes.get(pod_id).config)
        await n.sandboxes.remove(pod_id)

    run(node, scenario)


def test_container_lifecycle(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        cid = await n.create(pod_id)
        c = await n.containers.get(cid)
        assert (c.state, c.stop_signal, c.pid) == (ContainerState.CREATED, signal.SIGQUIT, 1001)
        await n.containers.start(cid)
        assert (await n.containers.get(cid)).state == ContainerState.RUNNING
        n.oci.exit(cid, 0)
        c = await n.exited(cid)
        assert c == await n.containers.get(cid)
        assert (c.state, c.exit_code, c.reason) == (ContainerState.EXITED, 0, "Completed")
        await n.containers.stop(cid, 10)  # stopping a stopped one succeeds
        await n.containers.remove(cid)
        await n.containers.remove(cid)
        with pytest.raises(NotFoundError):
            await n.containers.get(cid)
        assert not n.containers.bundle_dir(cid).exists()
        await n.sandboxes.remove(pod_id)
        assert n.leftovers() == []
        kinds = [k for k, o in await n.events_seen() if o == cid]
        assert kinds == ["created", "started", "stopped", "deleted"]

    run(node, scenario)


def test_creation_steps_are_recorded(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod = n.sandboxes.get(await n.pod())
        assert set(pod.creation_steps) == {"cgroup", "namespaces", "shm", "cni", "pod_files",
                                           "nri"}
        cid = await n.create(pod.id)
        created = await n.containers.get(cid)
        assert set(created.creation_steps) == {"image", "rootfs", "spec", "nri", "runc_create"}
        await n.containers.start(cid)
        started = await n.containers.get(cid)
        assert set(started.creation_steps) == {*created.creation_steps, "start"}
        assert all(s >= 0 for s in [*pod.creation_steps.values(),
                                    *started.creation_steps.values()])
        n.make()  # a restart: the steps come back from the records
        await n.sandboxes.recover()
        assert n.sandboxes.get(pod.id).creation_steps == pod.creation_steps

    run(node, scenario)


def test_exits_are_reported_with_their_reason(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        for name, code, oom, reason in (("a", 0, False, "Completed"), ("b", 3, False, "Error"),
                                        ("c", 137, True, "OOMKilled")):
            cid = await n.create(pod_id, name)
            await n.containers.start(cid)
            n.oci.exit(cid, code, oom)
            await n.exited(cid)
            [c] = [c for c in await n.containers.matching(None) if c.id == cid]
            assert (c.state, c.exit_code, c.reason) == (ContainerState.EXITED, code, reason)
        await n.sandboxes.remove(pod_id)

    run(node, scenario)


def test_reads_are_served_from_memory(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        cid = await n.create(pod_id)
        await n.containers.start(cid)
        n.oci.exits[cid] = ExitStatus(1, 1234, False)  # no exit file: nothing to notice
        reads = n.oci.exit_reads
        assert (await n.containers.get(cid)).state == ContainerState.RUNNING
        assert [c.state for c in await n.containers.matching(None)] == [ContainerState.RUNNING]
        assert n.oci.exit_reads == reads
        # What must know the truth looks: an exec on the ended container is refused.
        with pytest.raises(FailedPreconditionError, match="is not running"):
            await n.containers.exec_sync(cid, ["true"], None)
        assert (await n.containers.get(cid)).state == ContainerState.EXITED
        await n.sandboxes.remove(pod_id)

    run(node, scenario)


def test_an_exit_at_start_follows_the_start(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        cid = await n.create(pod_id)
        n.oci.exit_at_start = 7
        await n.containers.start(cid)
        c = await n.exited(cid)
        assert (c.exit_code, c.reason) == (7, "Error")
        assert c.started_at > 0
        assert [k for k, o in await n.events_seen() if o == cid] == [
            "created", "started", "stopped"]
        await n.sandboxes.remove(pod_id)

    run(node, scenario)


def test_an_exit_is_published_once_whoever_notices_it(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        cid = await n.create(pod_id)
        await n.containers.start(cid)
        n.oci.exit(cid, 0)
        running = n.containers.store.get(cid)
        await asyncio.gather(n.containers.notice_exits(None), n.containers.notice_exits([cid]),
                             n.containers.refresh(running), n.containers.stop(cid, 0),
                             n.containers.get_running(cid), return_exceptions=True)
        await n.exited(cid)
        await asyncio.sleep(0.05)  # the watcher's turn too
        assert [k for k, o in await n.events_seen() if o == cid] == [
            "created", "started", "stopped"]
        await n.sandboxes.remove(pod_id)

    run(node, scenario)


def test_exits_while_the_daemon_is_down_are_noticed_at_start(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        gone, stays = await n.create(pod_id, "gone"), await n.create(pod_id, "stays")
        for cid in (gone, stays):
            await n.containers.start(cid)
        n.make()  # the daemon is down: nothing loaded, so nothing noticed
        n.oci.exit(gone, 5)
        await asyncio.sleep(0.05)
        await n.sandboxes.recover()
        await n.containers.recover()
        c = await n.containers.get(gone)
        assert (c.state, c.exit_code) == (ContainerState.EXITED, 5)
        assert (await n.containers.get(stays)).state == ContainerState.RUNNING
        assert ("stopped", gone) in await n.events_seen()
        await n.sandboxes.remove(pod_id)

    run(node, scenario)


def test_layers_in_use_come_from_memory_and_old_records(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        cid = await n.create(pod_id)
        assert n.containers.layers_in_use() == frozenset(IMAGE.layers)
        # A record of an older cripy: only its layers.json names a volume's layers.
        volume_layer = "sha256:" + "4" * 64
        layers_file = n.containers.store.object_dir(cid) / "layers.json"
        layers_file.write_text(json.dumps([*IMAGE.layers, volume_layer]))
        n.make()
        await n.sandboxes.recover()
        await n.containers.recover()
        layers_file.unlink()  # read once at the start, not at every call
        assert n.containers.layers_in_use() == frozenset([*IMAGE.layers, volume_layer])
        await n.containers.remove(cid)
        assert n.containers.layers_in_use() == frozenset()
        await n.sandboxes.remove(pod_id)

    run(node, scenario)


def test_stopping_a_created_container(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        cid = await n.create(pod_id)
        await n.containers.stop(cid, 5)
        c = await n.containers.get(cid)
        assert (c.state, c.exit_code, c.message) == (
            ContainerState.EXITED, 255, "stopped before it was started")
        with pytest.raises(FailedPreconditionError, match="is exited, not created"):
            await n.containers.start(cid)
        await n.sandboxes.remove(pod_id)

    run(node, scenario)


def test_container_refusals(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        with pytest.raises(NotFoundError, match="pod sandbox 'nope' not found"):
            await n.create("nope")
        with pytest.raises(InvalidArgumentError, match="metadata.name is empty"):
            await n.create(pod_id, "")
        with pytest.raises(NotFoundError, match="pull it first"):
            await n.create(pod_id, image="alpine")
        cid = await n.create(pod_id)
        with pytest.raises(AlreadyExistsError, match="already in use"):
            await n.create(pod_id)
        with pytest.raises(FailedPreconditionError, match="is not running"):
            await n.containers.exec_sync(cid, ["true"], None)
        await n.containers.start(cid)
        with pytest.raises(FailedPreconditionError, match="is running, not created"):
            await n.containers.start(cid)
        with pytest.raises(InvalidArgumentError, match="command is empty"):
            await n.containers.exec_sync(cid, [], None)
        with pytest.raises(FailedPreconditionError, match="not in paused state"):
            await n.containers.unpause(cid)
        await n.containers.pause(cid)
        with pytest.raises(FailedPreconditionError, match="now is paused"):
            await n.containers.pause(cid)
        await n.containers.unpause(cid)
        await n.containers.stop(cid, 0)
        for call in (n.containers.pause(cid), n.containers.reopen_log(cid),
                     n.containers.update_resources(cid, pb.LinuxContainerResources())):
            with pytest.raises(FailedPreconditionError, match="not running|not in running"):
                await call
        with pytest.raises(NotFoundError):
            await n.containers.start("f" * 64)
        await n.sandboxes.stop(pod_id)
        with pytest.raises(FailedPreconditionError, match=f"pod sandbox {pod_id} is not ready"):
            await n.create(pod_id, "late")
        await n.sandboxes.remove(pod_id)
        assert n.leftovers() == []

    run(node, scenario)


def test_start_refuses_when_the_pod_is_not_ready(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        cid = await n.create(pod_id)
        # The pod lost its namespaces (as recovery after a reboot finds it).
        await n.sandboxes.store.set(pod_id, state=PodState.NOTREADY)
        with pytest.raises(FailedPreconditionError, match="is not ready"):
            await n.containers.start(cid)
        assert n.oci.status[cid] == "created"
        await n.sandboxes.remove(pod_id)
        assert n.leftovers() == []

    run(node, scenario)


def test_a_failed_create_leaves_nothing(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        n.oci.fail_create = True
        with pytest.raises(FailedPreconditionError, match="runc create"):
            await n.create(pod_id)
        assert n.containers.all() == []
        assert list((Path(n.config.root) / "containers").iterdir()) == []
        n.oci.fail_create = False
        await n.create(pod_id)  # the name is free again
        await n.sandboxes.remove(pod_id)
        assert n.leftovers() == []

    run(node, scenario)


def test_update_resources_is_recorded(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        cid = await n.create(pod_id)
        before = await n.containers.get(cid)
        await n.containers.update_resources(cid, pb.LinuxContainerResources(cpu_shares=512))
        after = await n.containers.get(cid)
        assert after.config.linux.resources.cpu_shares == 512
        assert before.config.linux.resources.cpu_shares == 0  # the snapshot did not change
        n.make()  # a restart reads it back
        await n.sandboxes.recover()
        await n.containers.recover()
        assert (await n.containers.get(cid)).config.linux.resources.cpu_shares == 512
        await n.sandboxes.remove(pod_id)

    run(node, scenario)


# --- ordering against the pod's stop and remove -----------------------------------------


def test_a_create_in_flight_is_stopped_with_its_pod(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        n.oci.create_gate = asyncio.Event()
        create = asyncio.create_task(n.create(pod_id))
        await n.oci.creating.wait()
        stop = asyncio.create_task(n.sandboxes.stop(pod_id))
        await asyncio.sleep(0.05)
        assert not stop.done()  # it waits for the create
        n.oci.create_gate.set()
        cid = await create
        await stop
        c = await n.containers.get(cid)
        assert c.state == ContainerState.EXITED
        assert n.sandboxes.get(pod_id).state == PodState.NOTREADY
        assert n.oci.live() == []
        await n.sandboxes.remove(pod_id)
        assert n.leftovers() == []

    run(node, scenario)


def test_a_create_in_flight_is_removed_with_its_pod(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        n.oci.create_gate = asyncio.Event()
        create = asyncio.create_task(n.create(pod_id))
        await n.oci.creating.wait()
        remove = asyncio.create_task(n.sandboxes.remove(pod_id))
        await asyncio.sleep(0.05)
        n.oci.create_gate.set()
        cid = await create
        await remove
        assert n.containers.all() == [] and n.sandboxes.all() == []
        assert ("deleted", cid) in await n.events_seen()
        assert n.leftovers() == []

    run(node, scenario)


def test_create_racing_stop_never_leaves_a_container_behind(node: Node) -> None:
    async def scenario(n: Node) -> None:
        rng = random.Random(7)
        refused = stopped = 0
        for round_ in range(40):
            pod_id = await n.pod(f"p{round_}")

            # Random head starts, and every fourth round one side clearly first, so that
            # both orders happen however loaded the machine is.
            create_delay, stop_delay = rng.random() * 0.002, rng.random() * 0.002
            if round_ % 4 == 0:
                stop_delay += 0.02
            elif round_ % 4 == 1:
                create_delay += 0.02

            async def create(pod_id: str = pod_id, delay: float = create_delay) -> str | None:
                await asyncio.sleep(delay)
                try:
                    return await n.create(pod_id)
                except FailedPreconditionError:
                    return None

            async def stop(pod_id: str = pod_id, delay: float = stop_delay) -> None:
                await asyncio.sleep(delay)
                await n.sandboxes.stop(pod_id)

            cid, _ = await asyncio.gather(create(), stop())
            if cid is None:
                refused += 1
            else:
                stopped += 1
                assert (await n.containers.get(cid)).state == ContainerState.EXITED
            assert n.oci.live() == []
            await n.sandboxes.remove(pod_id)
            assert n.leftovers() == []
        assert refused and stopped  # both orders happened

    run(node, scenario)


# --- restarts ---------------------------------------------------------------------------


def test_recovery_finishes_what_a_crash_left(node: Node) -> None:
    async def scenario(n: Node) -> None:
        pod_id = await n.pod()
        kept = await n.create(pod_id, "kept")
        await n.containers.start(kept)
        half = await n.create(pod_id, "half")
        # As if the daemon died in the middle of creating `half`:
        record = n.containers.store.object_dir(half) / "container.json"
        record.write_text(record.read_text().replace('"created"', '"creating"'))
        orphan_pod = await n.pod("gone")
        orphan = await n.create(orphan_pod, "orphan")
        await n.sandboxes.store.delete(orphan_pod)  # its pod's record vanished
        n.make()
        await n.sandboxes.recover()
        await n.containers.recover()
        assert {c.id for c in n.containers.all()} == {kept}
        assert (await n.containers.get(kept)).state == ContainerState.RUNNING
        assert half not in n.oci.status and orphan not in n.oci.status
        # The pod's namespaces are gone (a reboot): it is not ready any more.
        await n.host.unpin_namespaces(n.sandboxes.pod_dir(pod_id) / "ns")
        n.make()
        await n.sandboxes.recover()
        await n.containers.recover()
        assert n.sandboxes.get(pod_id).state == PodState.NOTREADY
        await n.sandboxes.remove(pod_id)
        n.host.mounts = {m for m in n.host.mounts if orphan_pod not in str(m)}
        n.cni.attached.pop(orphan_pod, None)
        assert n.leftovers() == []

    run(node, scenario)

