"""Containers: an overlay rootfs, an OCI bundle, and runc under conmon.

Like sandboxes, a container's record is written in state "creating" before anything is
made, so a restart after a crash can finish the cleanup.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cripy.api import api_pb2 as pb
from cripy.config import Config
from cripy.crashpoints import crash_point
from cripy.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from cripy.fsutil import atomic_write_json, remove_tree
from cripy.image.service import ImageManager
from cripy.oci.runtime import ExecResult, OciRuntime
from cripy.oci.spec import build_container_spec, resources_to_oci, validate_log_path
from cripy.runtime.events import CREATED as CREATED_EVENT
from cripy.runtime.events import DELETED, STARTED, STOPPED, Event, EventBus
from cripy.runtime.locks import LockTable
from cripy.runtime.records import RecordDir
from cripy.runtime.sandbox import READY, Sandbox, SandboxManager
from cripy.storage.overlay import mount_overlay, unmount

log = logging.getLogger(__name__)

CREATING, CREATED, RUNNING, EXITED = "creating", "created", "running", "exited"
STATE_TO_PB = {CREATED: pb.CONTAINER_CREATED, RUNNING: pb.CONTAINER_RUNNING,
               EXITED: pb.CONTAINER_EXITED, CREATING: pb.CONTAINER_UNKNOWN}


@dataclass
class Container:
    id: str
    sandbox_id: str
    config: pb.ContainerConfig
    image_id: str
    pod_name: str
    created_at: int
    log_path: str
    stop_signal: int = signal.SIGTERM
    state: str = CREATING
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0

    @property
    def name(self) -> str:
        return f"k8s_{self.config.metadata.name}_{self.pod_name}"

    def to_record(self) -> dict[str, Any]:
        record = {k: v for k, v in vars(self).items() if k != "config"}
        record["config"] = base64.b64encode(self.config.SerializeToString()).decode()
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Container:
        config = pb.ContainerConfig()
        config.ParseFromString(base64.b64decode(record.pop("config")))
        return cls(config=config, **record)


class ContainerManager:
    def __init__(self, config: Config, oci: OciRuntime, images: ImageManager,
                 sandboxes: SandboxManager, events: EventBus | None = None) -> None:
        self.config = config
        self.events = events or EventBus()
        self.oci = oci
        self.images = images
        self.sandboxes = sandboxes
        self.records = RecordDir(Path(config.root) / "containers", "container")
        self.run_dir = Path(config.runroot) / "containers"
        self.containers: dict[str, Container] = {}
        self.locks = LockTable()
        self._names = asyncio.Lock()

    # --- lookups ------------------------------------------------------------------------

    def get(self, container_id: str) -> Container:
        if not container_id:
            raise InvalidArgumentError("container ID is empty")
        found = self.containers.get(container_id)
        if found is None:
            matches = [c for i, c in self.containers.items() if i.startswith(container_id)]
            if len(matches) > 1:
                raise InvalidArgumentError(f"container ID prefix {container_id!r} is ambiguous")
            found = matches[0] if matches else None
        if found is None or found.state == CREATING:
            raise NotFoundError(f"container {container_id!r} not found")
        self.refresh(found)
        return found

    def matching(self, flt: pb.ContainerFilter | None) -> list[Container]:
        result = [c for c in self.containers.values() if c.state != CREATING]
        for container in result:
            self.refresh(container)
        if flt is None:
            return result
        if flt.id:
            result = [c for c in result if c.id.startswith(flt.id)]
        if flt.pod_sandbox_id:
            result = [c for c in result if c.sandbox_id.startswith(flt.pod_sandbox_id)]
        if flt.HasField("state"):
            result = [c for c in result if STATE_TO_PB[c.state] == flt.state.state]
        for key, value in flt.label_selector.items():
            result = [c for c in result if c.config.labels.get(key) == value]
        return result

    def get_running(self, container_id: str) -> Container:
        """A container that must be running for what is asked of it (exec, attach, logs)."""
        container = self.get(container_id)
        if container.state != RUNNING:
            raise FailedPreconditionError(f"container {container.id} is not running")
        return container

    def in_sandbox(self, sandbox_id: str) -> list[Container]:
        return [c for c in self.containers.values() if c.sandbox_id == sandbox_id]

    def layers_in_use(self) -> frozenset[str]:
        """Layers of every container's image: image removal must leave them."""
        used: set[str] = set()
        for container in self.containers.values():
            record = self.images.store.get(container.image_id)
            if record is not None:
                used.update(record.layers)
            used.update(self._layers_file(container.id))
        return frozenset(used)

    def refresh(self, container: Container) -> None:
        """Notice that a running container exited (conmon wrote its exit file)."""
        if container.state not in (CREATED, RUNNING):
            return
        status = self.oci.exit_status(container.id)
        if status is None:
            return
        container.state = EXITED
        container.exit_code = status.exit_code
        container.finished_at = status.finished_at
        container.reason = ("OOMKilled" if status.oom_killed
                            else "Completed" if status.exit_code == 0 else "Error")
        self.records.save(container.id, container.to_record())  # small; kept synchronous
        self._publish(STOPPED, container)

    def _publish(self, kind: str, container: Container) -> None:
        """Tell subscribers, with snapshots of the pod and all its containers."""
        sandbox = self.sandboxes.sandboxes.get(container.sandbox_id)
        peers = [copy.copy(c) for c in self.in_sandbox(container.sandbox_id)
                 if c.state != CREATING]
        self.events.publish(Event(kind, container.id, container.sandbox_id, time.time_ns(),
                                  (copy.copy(sandbox), peers)))

    async def watch_exits(self, interval: float = 0.25) -> None:
        """Notice exits as they happen (conmon's exit files), so events go out promptly."""
        while True:
            await asyncio.sleep(interval)
            for container in list(self.containers.values()):
                if container.state == RUNNING:
                    try:
                        self.refresh(container)
                    except OSError as exc:
                        log.warning("container %s: reading its exit failed: %s",
                                    container.id[:12], exc)

    # --- CreateContainer ----------------------------------------------------------------

    async def create(self, sandbox_id: str, config: pb.ContainerConfig,
                     sandbox_config: pb.PodSandboxConfig) -> Container:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox.state != READY:
            raise FailedPreconditionError(f"pod sandbox {sandbox.id} is not ready")
        if not config.metadata.name:
            raise InvalidArgumentError("container metadata.name is empty")
        image = self.images.lookup(config.image.image)
        if image is None:
            raise NotFoundError(f"image {config.image.image!r} not found: pull it first")
        log_path = (str(validate_log_path(sandbox.config.log_directory, config.log_path))
                    if config.log_path else "")
        async with self._names:
            container = Container(
                id=secrets.token_hex(32), sandbox_id=sandbox.id, config=config,
                image_id=image.id, pod_name=sandbox.name.removeprefix("k8s_"),
                created_at=time.time_ns(), log_path=log_path,
            )
            holder = next((c for c in self.containers.values() if c.name == container.name),
                          None)
            if holder is not None:
                raise AlreadyExistsError(
                    f"container name {container.name!r} is already in use by {holder.id}")
            self.containers[container.id] = container
            await self._save(container)
        async with self.locks.hold(container.id):
            try:
                await self._build(container, sandbox, image.layers)
            except BaseException as exc:
                log.warning("CreateContainer %s failed, cleaning up: %s", container.name, exc)
                await asyncio.shield(self._destroy(container))
                raise
            container.state = CREATED
            await self._save(container)
        self._publish(CREATED_EVENT, container)
        log.info("container %s (%s) created", container.id[:12], container.name)
        return container

    async def _build(self, container: Container, sandbox: Sandbox, layers: list[str]) -> None:
        store = self.images.store
        record_dir = self.records.object_dir(container.id)
        bundle = self.run_dir / container.id
        rootfs = bundle / "rootfs"
        # The layers are noted before the mount so image GC never removes them under us.
        await asyncio.to_thread(atomic_write_json, record_dir / "layers.json", layers)
        lowers = [f"{store.layer_dir(d).name}/diff" for d in reversed(layers)]
        await mount_overlay(store.layers, lowers, record_dir / "upper", record_dir / "work",
                            rootfs)
        crash_point("create-container-after-mount")
        image = store.get(container.image_id)
        if image is None:
            raise NotFoundError(f"image {container.image_id} was removed during the create")
        image_config = self.images.image_config(image)
        spec = build_container_spec(_effective_config(container.config, sandbox),
                                    sandbox.config, image_config,
                                    self.sandboxes.spec_context(sandbox, container.id, rootfs))
        container.stop_signal = _stop_signal(image_config)
        await asyncio.to_thread(atomic_write_json, bundle / "config.json", spec)
        log_path = Path(container.log_path) if container.log_path else bundle / "console.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        c = container.config
        container.pid = await self.oci.create(
            container.id, bundle, log_path, tty=c.tty, stdin=c.stdin, stdin_once=c.stdin_once,
            log_size_max=self.config.runtime.log_size_max, handler=sandbox.runtime_handler,
            cgroup_parent=sandbox.config.linux.cgroup_parent)
        crash_point("create-container-after-conmon")

    # --- StartContainer / StopContainer / RemoveContainer -------------------------------

    async def start(self, container_id: str) -> None:
        container = self.get(container_id)
        async with self.locks.hold(container.id):
            if container.state != CREATED:
                raise FailedPreconditionError(
                    f"container {container.id} is {container.state}, not created")
            started_at = time.time_ns()  # taken first: a quick exit must not precede it
            await self.oci.start(container.id)
            crash_point("start-container-after-start")
            container.state = RUNNING
            container.started_at = started_at
            await self._save(container)
        self._publish(STARTED, container)
        log.info("container %s started", container.id[:12])

    async def stop(self, container_id: str, timeout: float) -> None:
        """Signal, wait `timeout`, then SIGKILL. Stopping a stopped one succeeds."""
        try:
            container = self.get(container_id)
        except NotFoundError:
            return
        async with self.locks.hold(container.id):
            if container.state in (CREATED, RUNNING):
                await self.oci.stop(container.id, max(timeout, 0), container.stop_signal)
                if container.state == CREATED:  # never started: nothing will exit
                    await self.oci.delete(container.id)
                    container.state = EXITED
                    container.finished_at = time.time_ns()
                    container.exit_code = 255
                    container.reason = "Error"
                    container.message = "stopped before it was started"
                    await self._save(container)
                    self._publish(STOPPED, container)
                self.refresh(container)
        log.info("container %s stopped", container.id[:12])

    async def remove(self, container_id: str) -> None:
        """Remove a container, killing it first if it runs. Removing what is gone succeeds."""
        try:
            container = self.get(container_id)
        except NotFoundError:
            return
        async with self.locks.hold(container.id):
            await self._destroy(container)
        self._publish(DELETED, container)
        log.info("container %s removed", container.id[:12])

    async def stop_all_in(self, sandbox_id: str) -> None:
        await asyncio.gather(*(self.stop(c.id, 0) for c in self.in_sandbox(sandbox_id)))

    async def remove_all_in(self, sandbox_id: str) -> None:
        await asyncio.gather(*(self.remove(c.id) for c in self.in_sandbox(sandbox_id)))

    async def _destroy(self, container: Container) -> None:
        try:
            await self.oci.stop(container.id, 0)
            await self.oci.delete(container.id)
        except UnavailableError as exc:
            # runc cannot even be run (missing binary): it cannot have made anything.
            log.warning("container %s: runtime unavailable during cleanup: %s",
                        container.id[:12], exc)
        bundle = self.run_dir / container.id
        await unmount(bundle / "rootfs")
        await asyncio.to_thread(remove_tree, bundle)
        await asyncio.to_thread(remove_tree, self.records.object_dir(container.id))
        self.containers.pop(container.id, None)

    # --- other operations ---------------------------------------------------------------

    async def update_resources(self, container_id: str,
                               resources: pb.LinuxContainerResources) -> None:
        """Apply new limits; ContainerStatus reports them from then on."""
        container = self.get(container_id)
        async with self.locks.hold(container.id):
            if container.state not in (CREATED, RUNNING):
                raise FailedPreconditionError(f"container {container.id} is not running")
            await self.oci.update(container.id, resources_to_oci(resources))
            container.config.linux.resources.CopyFrom(resources)
            await self._save(container)

    async def exec_sync(self, container_id: str, cmd: list[str], timeout: float | None
                        ) -> ExecResult:
        container = self.get_running(container_id)
        if not cmd:
            raise InvalidArgumentError("exec command is empty")
        return await self.oci.exec_sync(container.id, cmd, timeout=timeout)

    async def reopen_log(self, container_id: str) -> None:
        container = self.get_running(container_id)
        await self.oci.reopen_log(container.id)

    # --- persistence and start-up -------------------------------------------------------

    async def _save(self, container: Container) -> None:
        await asyncio.to_thread(self.records.save, container.id, container.to_record())

    def _layers_file(self, container_id: str) -> list[str]:
        try:
            layers: list[str] = json.loads(
                (self.records.object_dir(container_id) / "layers.json").read_text())
        except (OSError, ValueError):
            return []
        return layers

    async def recover(self) -> None:
        """Load the records; finish off containers a crash left half made; notice exits."""
        for container_id, record in await asyncio.to_thread(
                lambda: list(self.records.load_all())):
            if record is None:
                await self._destroy_leftover(container_id)
                continue
            container = Container.from_record(record)
            self.containers[container.id] = container
            if container.state == CREATING or container.sandbox_id not in \
                    self.sandboxes.sandboxes:
                log.info("container %s was being created at the crash: removing it",
                         container_id[:12])
                await self._destroy(container)
                continue
            self.refresh(container)
            if container.state not in (CREATED, RUNNING):
                continue
            state = await self.oci.state(container.id)
            if state is not None and state.get("status") == "running" and \
                    container.state == CREATED:
                # Started just before the crash, not yet recorded as such.
                container.state = RUNNING
                container.started_at = time.time_ns()
                await self._save(container)
            elif state is None:
                container.state = EXITED
                container.exit_code = 255
                container.reason = "Error"
                container.message = "the container was lost (node reboot?)"
                container.finished_at = time.time_ns()
                await self._save(container)

    async def _destroy_leftover(self, container_id: str) -> None:
        await self.oci.delete(container_id)
        await unmount(self.run_dir / container_id / "rootfs")
        await asyncio.to_thread(remove_tree, self.run_dir / container_id)
        await asyncio.to_thread(remove_tree, self.records.object_dir(container_id))


def _effective_config(config: pb.ContainerConfig, sandbox: Sandbox) -> pb.ContainerConfig:
    """A container asking for the pod's PID namespace where the pod shares none gets its
    own: PID mode POD is the proto's default, so a config that never set it asks for it."""
    options = config.linux.security_context.namespace_options
    if options.pid != pb.POD or sandbox.shares_pid:
        return config
    effective = pb.ContainerConfig()
    effective.CopyFrom(config)
    effective.linux.security_context.namespace_options.pid = pb.CONTAINER
    return effective


def _stop_signal(image_config: dict[str, Any]) -> int:
    """The image's StopSignal ("SIGQUIT", "QUIT" or "3"), SIGTERM by default."""
    value = str((image_config.get("config") or {}).get("StopSignal") or "").upper()
    if not value:
        return signal.SIGTERM
    if value.isdigit():
        return int(value)
    name = value if value.startswith("SIG") else f"SIG{value}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        log.warning("image stop signal %r is unknown: using SIGTERM", value)
        return signal.SIGTERM
