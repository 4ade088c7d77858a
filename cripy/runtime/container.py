"""Containers: an overlay rootfs, an OCI bundle, and runc under conmon.

Like sandboxes, a container's record is written in state "creating" before anything is
made, so a restart after a crash can finish the cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from cripy.api import api_pb2 as pb
from cripy.config import Config
from cripy.crashpoints import crash_point
from cripy.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from cripy.fsutil import atomic_write_json, remove_tree
from cripy.image.store import ImageRecord
from cripy.metrics import CONTAINER_CREATION_STEPS, record_steps
from cripy.nri.hooks import Nri
from cripy.oci import cdi, signals
from cripy.oci.checkpoint import CheckpointArchive, CriuSupport
from cripy.oci.handlers import RuntimeHandler
from cripy.oci.runtime import ExecResult, ExitStatus
from cripy.oci.spec import build_container_spec, resources_to_oci, validate_log_path
from cripy.oci.userns import sandbox_userns
from cripy.runtime.checkpoint import Checkpoints
from cripy.runtime.events import CREATED as CREATED_EVENT
from cripy.runtime.events import DELETED, STARTED, STOPPED, Event, EventBus
from cripy.runtime.idmapped import mount_idmapped_rootfs
from cripy.runtime.locks import LockTable
from cripy.runtime.ports import HOST, Host, Images, OciDriver
from cripy.runtime.sandbox import READY, SandboxManager
from cripy.runtime.store import (
    CONTAINER_STATE_TO_PB,
    PAUSED,
    Container,
    ContainerState,
    Sandbox,
    Store,
)
from cripy.runtime.timing import Steps, merged
from cripy.storage import image_volume

log = logging.getLogger(__name__)

CREATING, CREATED, RUNNING, EXITED = (ContainerState.CREATING, ContainerState.CREATED,
                                      ContainerState.RUNNING, ContainerState.EXITED)
STATE_TO_PB = CONTAINER_STATE_TO_PB


class ContainerManager:
    """The container lifecycle controller: its state is the store's, nothing of its own."""

    def __init__(self, config: Config, oci: OciDriver, images: Images,
                 sandboxes: SandboxManager, events: EventBus | None = None,
                 host: Host = HOST, criu: CriuSupport | None = None) -> None:
        self.config = config
        self.events = events or EventBus()
        self.oci = oci
        self.images = images
        self.sandboxes = sandboxes
        self.host = host
        root = Path(config.root)
        self.store: Store[Container] = Store(Container, root / "containers",
                                             root / "quarantine")
        self._run_dir = Path(config.runroot) / "containers"
        self.locks = LockTable()
        self.nri = Nri()  # the daemon's, once it started NRI
        self.checkpoints = Checkpoints(self, criu)
        #: container ID -> the layers its rootfs and image volumes are made of (layers.json
        #: in its record directory keeps them across restarts).
        self._layers: dict[str, tuple[str, ...]] = {}

    # --- lookups (snapshots, from memory) -----------------------------------------------
    # Exits reach the store as they happen (the exit watcher calls notice_exits), so
    # reads need no look at conmon's files.

    async def get(self, container_id: str) -> Container:
        """A container by ID or unique ID prefix."""
        found = self.store.get(container_id)
        if found.state == CREATING:
            raise NotFoundError(f"container {container_id!r} not found")
        return found

    async def matching(self, flt: pb.ContainerFilter | None) -> list[Container]:
        result = [c for c in self.store if c.state != CREATING]
        if flt is None:
            return result
        if flt.id:
            result = [c for c in result if c.id.startswith(flt.id)]
        if flt.pod_sandbox_id:
            result = [c for c in result if c.sandbox_id.startswith(flt.pod_sandbox_id)]
        if flt.HasField("state"):
            result = [c for c in result if c.pb_state == flt.state.state]
        for key, value in flt.label_selector.items():
            result = [c for c in result if c.config.labels.get(key) == value]
        return result

    async def get_running(self, container_id: str) -> Container:
        """A container that must be running for what is asked of it (exec, attach, logs):
        its exit file is looked at now, so a just-ended one is refused as such."""
        container = await self.refresh(await self.get(container_id))
        if container.state != RUNNING:
            raise FailedPreconditionError(f"container {container.id} is not running")
        return container

    def all(self) -> list[Container]:
        """Every container, those being created too."""
        return self.store.all()

    def in_sandbox(self, sandbox_id: str) -> list[Container]:
        return [c for c in self.store if c.sandbox_id == sandbox_id]

    def listed_in(self, sandbox_id: str) -> list[Container]:
        """The pod's containers as the CRI shows them: not those still being created."""
        return [c for c in self.in_sandbox(sandbox_id) if c.state != CREATING]

    def bundle_dir(self, container_id: str) -> Path:
        """The OCI bundle (config.json, rootfs, conmon's sockets)."""
        return self._run_dir / container_id

    def log_file(self, container: Container) -> Path:
        """The CRI log: the kubelet's path, else one in the bundle."""
        if container.log_path:
            return Path(container.log_path)
        return self.bundle_dir(container.id) / "console.log"

    def runtime_handlers(self) -> list[dict[str, object]]:
        """The configured runtime handlers as probed at start (from memory)."""
        return [h.report() for h in self.oci.handlers.values()]

    def handlers(self) -> list[RuntimeHandler]:
        return list(self.oci.handlers.values())

    def default_handler(self) -> RuntimeHandler | None:
        """The handler pods get without a runtime_handler, as probed at start."""
        return self.oci.handlers.get(self.config.runtime.default_handler)

    @property
    def layers_root(self) -> Path:
        """The filesystem writable layers live on."""
        return self.store.directory

    def upper_dir(self, container_id: str) -> Path:
        """The container's writable layer."""
        return self.store.object_dir(container_id) / "upper"

    async def runtime_spec(self, container_id: str) -> dict[str, Any] | None:
        """The OCI spec the container was created with, if readable."""
        path = self.bundle_dir(container_id) / "config.json"
        try:
            spec: dict[str, Any] = json.loads(await asyncio.to_thread(path.read_bytes))
        except (OSError, ValueError):
            return None
        return spec

    def layers_in_use(self) -> frozenset[str]:
        """Layers of every container's image and image volumes: image removal must leave
        them. From memory."""
        used: set[str] = set()
        for container in self.store:
            record = self.images.store.get(container.image_id)
            if record is not None:
                used.update(record.layers)
        for layers in self._layers.values():
            used.update(layers)
        return frozenset(used)

    def image_volume_users(self, image_id: str) -> list[str]:
        """The containers (ID and name) that mount image `image_id` as an image volume."""
        return [f"{c.id} ({c.name})" for c in self.store.all()
                if image_id in image_volume.volume_images(c.config)]

    async def refresh(self, container: Container) -> Container:
        """The container with its exit noticed, looking at conmon's exit file now: for
        what needs the freshest truth (a stop, a pause, an exec, a checkpoint); plain reads
        take the store, which the exit watcher keeps current."""
        if not container.live:
            return container
        status = await asyncio.to_thread(self.oci.exit_status, container.id)
        if status is None:
            return container
        return await self._record_exit(container, status)

    async def notice_exits(self, container_ids: Collection[str] | None = None) -> None:
        """Record the exits conmon wrote for these running containers (the names of exit
        files written; None: every running container). Called by the exit watcher.

        Created containers are left to StartContainer, which looks once it has recorded
        the start: an exit noticed before would make the start's RUNNING illegal."""
        if container_ids is None:
            running = [c for c in self.store if c.state == RUNNING]
        else:
            running = [c for c in map(self.store.find, container_ids)
                       if c is not None and c.state == RUNNING]
        if not running:
            return

        def read() -> list[tuple[Container, ExitStatus]]:
            found = []
            for container in running:
                try:
                    status = self.oci.exit_status(container.id)
                except OSError as exc:
                    log.warning("container %s: reading its exit failed: %s",
                                container.id[:12], exc)
                    continue
                if status is not None:
                    found.append((container, status))
            return found

        for container, status in await asyncio.to_thread(read):
            await self._record_exit(container, status)

    async def _record_exit(self, container: Container, status: ExitStatus) -> Container:
        """Persist the exit, then publish it: once, whoever notices first."""
        noticed = False

        def exited(c: Container) -> Container:
            nonlocal noticed
            if not c.live:  # someone else noticed first
                return c
            noticed = True
            return dataclasses.replace(
                c, state=EXITED, exit_code=status.exit_code, finished_at=status.finished_at,
                reason=("OOMKilled" if status.oom_killed
                        else "Completed" if status.exit_code == 0 else "Error"))

        try:
            updated = await self.store.update(container.id, exited)
        except NotFoundError:  # removed meanwhile
            return container
        if noticed:
            self._publish(STOPPED, updated)
        return updated

    def _publish(self, kind: str, container: Container) -> None:
        """Tell subscribers, with snapshots of the pod and all its containers."""
        sandbox = self.sandboxes.find(container.sandbox_id)
        peers = self.listed_in(container.sandbox_id)
        self.events.publish(Event(kind, container.id, container.sandbox_id, time.time_ns(),
                                  (sandbox, peers)))

    # --- CreateContainer ----------------------------------------------------------------

    async def create(self, sandbox_id: str, config: pb.ContainerConfig,
                     sandbox_config: pb.PodSandboxConfig) -> Container:
        steps = Steps()
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox.state != READY:
            raise FailedPreconditionError(f"pod sandbox {sandbox.id} is not ready")
        if not config.metadata.name:
            raise InvalidArgumentError("container metadata.name is empty")
        signals.from_pb(config.stop_signal)  # a clear error for an unknown one
        config = image_volume.resolve_image_mounts(config, self.images.lookup)
        log_path = (str(validate_log_path(sandbox.config.log_directory, config.log_path))
                    if config.log_path else "")
        # An image that is a checkpoint archive restores that container (at its start).
        with steps.step("image"):
            restore = await self.checkpoints.open_archive(config.image.image,
                                                          sandbox.runtime_handler)
        try:
            with steps.step("image"):
                image = (self.checkpoints.base_image(restore) if restore is not None
                         else self.images.lookup(config.image.image))
            if image is None:
                raise NotFoundError(f"image {config.image.image!r} not found: pull it first")
            return await self._create(sandbox, config, image, log_path, restore, steps)
        finally:
            if restore is not None and await asyncio.to_thread(restore.directory.exists):
                await self.checkpoints.discard(restore)  # not adopted: the create failed

    async def _create(self, sandbox: Sandbox, config: pb.ContainerConfig, image: ImageRecord,
                      log_path: str, restore: CheckpointArchive | None, steps: Steps
                      ) -> Container:
        async with contextlib.AsyncExitStack() as held:
            # Registered under the pod's lock: a stop or remove of the pod either comes
            # first (and this is refused) or finds the container and waits for its lock.
            async with self.sandboxes.locks.hold(sandbox.id):
                current = self.sandboxes.find(sandbox.id)
                if current is None or current.state != READY:
                    raise FailedPreconditionError(f"pod sandbox {sandbox.id} is not ready")
                sandbox = current
                container = await self.store.add(Container(
                    id=secrets.token_hex(32), sandbox_id=sandbox.id, config=config,
                    image_id=image.id, pod_name=sandbox.name.removeprefix("k8s_"),
                    created_at=time.time_ns(), log_path=log_path,
                ))
                await held.enter_async_context(self.locks.hold(container.id))
            try:
                built = await self._build(container, sandbox, image.layers, restore, steps)
            except BaseException as exc:
                log.warning("CreateContainer %s failed, cleaning up: %s", container.name, exc)
                await asyncio.shield(self.nri.container_failed(container.id))
                await asyncio.shield(self._destroy(container.id))
                raise
            container = await self.store.set(container.id, state=CREATED,
                                             creation_steps=steps.durations(), **built)
        record_steps(CONTAINER_CREATION_STEPS, container.creation_steps)
        self._publish(CREATED_EVENT, container)
        await self.nri.post_create_container(container)
        log.info("container %s (%s) created", container.id[:12], container.name)
        return container

    async def _build(self, container: Container, sandbox: Sandbox, layers: list[str],
                     restore: CheckpointArchive | None = None,
                     steps: Steps | None = None) -> dict[str, Any]:
        """Make the rootfs, the bundle and the runc container; returns the record's new
        fields."""
        store = self.images.store
        record_dir = self.store.object_dir(container.id)
        bundle = self.bundle_dir(container.id)
        rootfs = bundle / "rootfs"
        steps = steps or Steps()
        rootfs_done = steps.begin("rootfs")
        # The layers (image volumes' too) are noted before the mount so image GC never
        # removes them under us.
        volume_images = {}
        for image_id in image_volume.volume_images(container.config):
            found = store.get(image_id)
            if found is None:
                raise NotFoundError(f"image {image_id} of an image volume was removed during "
                                    "the create")
            volume_images[image_id] = found
        used = layers + [d for i in volume_images.values() for d in i.layers]
        self._layers[container.id] = tuple(used)
        await asyncio.to_thread(atomic_write_json, record_dir / "layers.json", used)

        def lowers(diff_ids: list[str]) -> list[str]:  # topmost first, under store.layers
            return [f"{store.layer_dir(d).name}/diff" for d in reversed(diff_ids)]

        if restore is not None:  # the checkpoint's writable layer, before the mount
            restore = await self.checkpoints.adopt(restore, container.id)
        userns = sandbox_userns(sandbox.config, sandbox.namespaces)
        if userns is None:
            await self.host.mount_overlay(store.layers, lowers(layers), record_dir / "upper",
                                          record_dir / "work", rootfs)
        else:
            await mount_idmapped_rootfs(self.host, userns, store.layers, lowers(layers),
                                        record_dir, rootfs)
        volumes = []
        for index, m in enumerate(container.config.mounts):
            if image_volume.is_image_mount(m):
                volumes.append(await image_volume.mount_image_volume(
                    bundle, index, store.layers,
                    lowers(volume_images[m.image.image_ref].layers), m))
        crash_point("create-container-after-mount")
        if restore is not None:
            await self.checkpoints.finish_rootfs(restore, rootfs)
        rootfs_done()
        image = store.get(container.image_id)
        if image is None:
            raise NotFoundError(f"image {container.image_id} was removed during the create")
        log_path = self.log_file(container)

        def build_spec() -> tuple[dict[str, Any], dict[str, Any], bool]:
            # The image config, the rootfs's passwd and group, mountinfo, /dev: all reads.
            image_config = self.images.image_config(image)
            context = self.sandboxes.spec_context(sandbox, container.id, rootfs)
            spec = build_container_spec(
                _effective_config(image_volume.with_volume_binds(container.config, volumes),
                                  sandbox), sandbox.config, image_config, context)
            cdi.inject(spec, container.config, self.config.cdi.spec_dirs)
            if restore is not None:
                spec = self.checkpoints.restore_spec(spec, restore, container.config.image.image)
            return spec, image_config, context.cgroup_v2

        def write_bundle() -> None:
            atomic_write_json(bundle / "config.json", spec)
            log_path.parent.mkdir(parents=True, exist_ok=True)

        spec, image_config, cgroup_v2 = await steps.timed("spec", asyncio.to_thread(build_spec))
        await steps.timed("nri", self.nri.create_container(sandbox, container, spec,
                                                           cgroup_v2=cgroup_v2))
        await steps.timed("spec", asyncio.to_thread(write_bundle))
        user = spec["process"]["user"]
        identity = {"stop_signal": signals.stop_signal(container.config, image_config),
                    "user": (user["uid"], user["gid"], *user.get("additionalGids", ()))}
        if restore is not None:  # CRIU makes the process at StartContainer
            return {"pid": 0, **identity}
        c = container.config
        pid = await steps.timed("runc_create", self.oci.create(
            container.id, bundle, log_path, tty=c.tty, stdin=c.stdin, stdin_once=c.stdin_once,
            log_size_max=self.config.runtime.log_size_max, handler=sandbox.runtime_handler,
            cgroup_parent=sandbox.config.linux.cgroup_parent))
        crash_point("create-container-after-conmon")
        return {"pid": pid, **identity}

    # --- StartContainer / StopContainer / RemoveContainer -------------------------------

    async def start(self, container_id: str) -> None:
        container = await self.get(container_id)
        async with self.locks.hold(container.id):
            container = self.store.get(container.id)
            if container.state != CREATED:
                raise FailedPreconditionError(
                    f"container {container.id} is {container.state}, not created")
            sandbox = self.sandboxes.find(container.sandbox_id)
            if sandbox is None or sandbox.state != READY:
                raise FailedPreconditionError(
                    f"pod sandbox {container.sandbox_id} of container {container.id} "
                    "is not ready")
            await self.nri.start_container(container)
            started_at = time.time_ns()  # taken first: a quick exit must not precede it
            changes: dict[str, Any] = {}
            steps = Steps()
            if await self.checkpoints.pending(container.id):
                changes["pid"] = await steps.timed(
                    "start", self.checkpoints.restore(container, sandbox))
            else:
                await steps.timed("start", self.oci.start(container.id))
            crash_point("start-container-after-start")
            started = steps.durations()
            container = await self.store.set(
                container.id, state=RUNNING, started_at=started_at,
                creation_steps=merged(container.creation_steps, started), **changes)
        record_steps(CONTAINER_CREATION_STEPS, started)
        self._publish(STARTED, container)
        await self.refresh(container)  # an exit before RUNNING was recorded
        await self.nri.post_start_container(container)
        log.info("container %s started", container.id[:12])

    async def stop(self, container_id: str, timeout: float) -> None:
        """Signal, wait `timeout`, then SIGKILL. Stopping a stopped one succeeds."""
        try:
            container = await self.get(container_id)
        except NotFoundError:
            return
        async with self.locks.hold(container.id):
            await self._stop_locked(container.id, timeout)
        stopped = self.store.find(container.id)
        if stopped is not None and not stopped.live:
            await self.nri.stop_container(stopped)
        log.info("container %s stopped", container.id[:12])

    async def _stop_locked(self, container_id: str, timeout: float) -> None:
        container = self.store.find(container_id)
        if container is None or not container.live:
            return
        await self.oci.stop(container.id, max(timeout, 0), container.stop_signal)
        if container.state == CREATED:  # never started: nothing will exit
            await self.oci.delete(container.id)
            container = await self.store.set(
                container.id, state=EXITED, finished_at=time.time_ns(), exit_code=255,
                reason="Error", message="stopped before it was started")
            self._publish(STOPPED, container)
        await self.refresh(container)

    async def remove(self, container_id: str) -> None:
        """Remove a container, killing it first if it runs. Removing what is gone succeeds."""
        try:
            container = await self.get(container_id)
        except NotFoundError:
            return
        async with self.locks.hold(container.id):
            await self._destroy(container.id)
        self._publish(DELETED, container)
        await self.nri.remove_container(container)
        log.info("container %s removed", container.id[:12])

    # For the pod's stop and remove, under the pod's lock: every container of the pod,
    # those being created too (their lock is held until the create is done).

    async def stop_all_in(self, sandbox_id: str) -> None:
        async def stop(container_id: str) -> None:
            async with self.locks.hold(container_id):
                await self._stop_locked(container_id, 0)

        await asyncio.gather(*(stop(c.id) for c in self.in_sandbox(sandbox_id)))

    async def remove_all_in(self, sandbox_id: str) -> None:
        async def remove(container_id: str) -> None:
            async with self.locks.hold(container_id):
                container = self.store.find(container_id)
                if container is None:  # its create failed, or a remove came first
                    return
                await self._destroy(container_id)
            self._publish(DELETED, container)

        await asyncio.gather(*(remove(c.id) for c in self.in_sandbox(sandbox_id)))

    async def _destroy(self, container_id: str) -> None:
        try:
            await self.oci.stop(container_id, 0)
            await self.oci.delete(container_id)
        except UnavailableError as exc:
            # runc cannot even be run (missing binary): it cannot have made anything.
            log.warning("container %s: runtime unavailable during cleanup: %s",
                        container_id[:12], exc)
        bundle = self.bundle_dir(container_id)
        await self.host.unmount(bundle / "rootfs")
        await image_volume.unmount_volumes(bundle)
        await asyncio.to_thread(remove_tree, bundle)
        await self.store.delete(container_id)
        self._layers.pop(container_id, None)

    # --- other operations ---------------------------------------------------------------

    async def update_resources(self, container_id: str,
                               resources: pb.LinuxContainerResources, *,
                               from_nri: bool = False) -> None:
        """Apply new limits; ContainerStatus reports them from then on. NRI plugins see
        (and may change) the update, unless it is theirs (`from_nri`)."""
        container = await self.get(container_id)
        async with self.locks.hold(container.id):
            container = await self.refresh(self.store.get(container.id))
            if not container.live:
                raise FailedPreconditionError(f"container {container.id} is not running")
            follow_ups = None
            if not from_nri:
                resources, follow_ups = await self.nri.update_container(container, resources)
            await self.oci.update(container.id, resources_to_oci(resources))
            config = pb.ContainerConfig()
            config.CopyFrom(container.config)
            config.linux.resources.CopyFrom(resources)
            container = await self.store.set(container.id, config=config)
        if follow_ups is not None:
            await self.nri.after_update(container, follow_ups)

    async def exec_sync(self, container_id: str, cmd: list[str], timeout: float | None
                        ) -> ExecResult:
        container = await self.get_running(container_id)
        if not cmd:
            raise InvalidArgumentError("exec command is empty")
        return await self.oci.exec_sync(container.id, cmd, timeout=timeout)

    async def reopen_log(self, container_id: str) -> None:
        container = await self.get_running(container_id)
        await self.oci.reopen_log(container.id)

    async def runtime_status(self, container: Container) -> str:
        """The container's state, or "paused" when the OCI runtime says so."""
        if not container.live:
            return str(container.state)
        runc = await self.oci.state(container.id)
        return PAUSED if runc is not None and runc.get("status") == PAUSED \
            else str(container.state)

    async def pause(self, container_id: str) -> Container:
        """Freeze a created or running container (not a state of the record)."""
        container = await self.get(container_id)
        async with self.locks.hold(container.id):
            container = await self.refresh(self.store.get(container.id))
            if not container.live:
                raise FailedPreconditionError(
                    f"container {container.id} is not in running or created state, "
                    f"now is {container.state}")
            status = await self._oci_status(container)
            if status not in (CREATED, RUNNING):
                raise FailedPreconditionError(
                    f"container {container.id} is not in running or created state, "
                    f"now is {status}")
            await self.oci.pause(container.id)
        log.info("container %s paused", container.id[:12])
        return container

    async def unpause(self, container_id: str) -> Container:
        """Thaw a paused container."""
        container = await self.get(container_id)
        async with self.locks.hold(container.id):
            container = self.store.get(container.id)
            status = await self._oci_status(container) if container.live \
                else str(container.state)
            if status != PAUSED:
                raise FailedPreconditionError(
                    f"container {container.id} is not in paused state, now is {status}")
            await self.oci.resume(container.id)
        log.info("container %s resumed", container.id[:12])
        return container

    async def _oci_status(self, container: Container) -> str:
        runc = await self.oci.state(container.id)
        if runc is None:
            raise FailedPreconditionError(
                f"container {container.id} is not known to the runtime")
        return str(runc.get("status", "unknown"))

    # --- persistence and start-up -------------------------------------------------------

    def _layers_file(self, container_id: str) -> tuple[str, ...]:
        try:
            layers = json.loads(
                (self.store.object_dir(container_id) / "layers.json").read_text())
        except (OSError, ValueError):
            return ()
        if not isinstance(layers, list):
            return ()
        return tuple(str(d) for d in layers)

    async def recover(self) -> None:
        """Load the records; finish off containers a crash left half made; notice exits."""
        loaded_records = await self.store.load()
        await image_volume.unmount_orphans(self._run_dir, {r.id for r in loaded_records})
        for loaded in loaded_records:
            container = loaded.obj
            if container is None:
                await self._destroy_leftover(loaded.id)
                continue
            if container.state == CREATING or \
                    self.sandboxes.find(container.sandbox_id) is None:
                log.info("container %s was being created at the crash: removing it",
                         loaded.id[:12])
                await self._destroy(container.id)
                continue
            container = await self.refresh(container)
            if not container.live:
                continue
            state = await self.oci.state(container.id)
            if state is not None and state.get("status") == "running" and \
                    container.state == CREATED:
                # Started just before the crash, not yet recorded as such.
                await self.store.set(container.id, state=RUNNING, started_at=time.time_ns())
            elif state is None and not await self.checkpoints.pending(container.id):
                await self.store.set(
                    container.id, state=EXITED, exit_code=255, reason="Error",
                    message="the container was lost (node reboot?)",
                    finished_at=time.time_ns())
        ids = [c.id for c in self.store]
        self._layers.update(await asyncio.to_thread(
            lambda: {cid: self._layers_file(cid) for cid in ids}))

    async def _destroy_leftover(self, container_id: str) -> None:
        await self.oci.delete(container_id)
        await self.host.unmount(self.bundle_dir(container_id) / "rootfs")
        await image_volume.unmount_volumes(self.bundle_dir(container_id))
        await asyncio.to_thread(remove_tree, self.bundle_dir(container_id))
        await asyncio.to_thread(remove_tree, self.store.object_dir(container_id))
        self._layers.pop(container_id, None)



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

