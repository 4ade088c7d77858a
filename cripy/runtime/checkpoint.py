"""CheckpointContainer and restores: the container-level side of cripy.oci.checkpoint.

A checkpoint freezes a running container (`runc pause`), dumps it with CRIU (`runc
checkpoint --leave-running`) into a staging directory under the root (ROOT/checkpoints),
adds the metadata, the writable layer and the log, and writes the archive to the
requested location atomically. The container is thawed once its writable layer is copied,
and keeps running whether or not this succeeds.

A restore is a CreateContainer whose image is a checkpoint archive: the archive is
unpacked into the container's directory, the writable layer is re-applied before the
overlay is mounted and the deleted files are removed after; StartContainer then has
conmon run `runc restore` (CRIU) instead of `runc start`. The unpacked archive is removed
once the process is restored (or with the container).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cripy.errors import CripyError, FailedPreconditionError, NotFoundError
from cripy.fsutil import remove_tree
from cripy.image.store import ImageRecord
from cripy.oci.checkpoint import (
    CHECKPOINT_ANNOTATION,
    CHECKPOINT_DIR,
    CONFIG_DUMP,
    CONTAINER_LOG,
    CRIU_CONFIG_ANNOTATION,
    DELETED_FILES,
    RESTORE_LOG,
    ROOTFS_DIFF,
    SPEC_DUMP,
    CheckpointArchive,
    CriuSupport,
    apply_rootfs_diff,
    check_location,
    criu_log_errors,
    dump,
    looks_like_archive,
    probe_criu,
    read_unpacked,
    remove_deleted,
    runtime_criu_problem,
    unpack_archive,
    write_archive,
    write_criu_restore_config,
    write_json,
    write_rootfs_diff,
)
from cripy.runtime.store import Container, ContainerState, Sandbox

if TYPE_CHECKING:
    from cripy.runtime.container import ContainerManager

log = logging.getLogger(__name__)

#: CheckpointContainer's timeout when the request gives none (seconds).
DEFAULT_TIMEOUT = 300.0
#: Where the unpacked archive of a container waiting for its restore lives.
RESTORE_DIR = "restore"
#: Spec annotations of a restored container (ContainerStatus verbose shows the spec).
RESTORED_FROM = "io.cripy.restored-from"
CHECKPOINTED_AT = "io.cripy.checkpointed-at"


def _rfc3339(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).isoformat().replace(
        "+00:00", "Z")


class Checkpoints:
    """Checkpoint and restore for one ContainerManager."""

    def __init__(self, manager: ContainerManager,
                 criu: CriuSupport | None = None) -> None:
        self.manager = manager
        self.criu = criu or CriuSupport(False, "not probed")
        # On disk, not the runroot's tmpfs: a dump holds the container's memory.
        self.work_root = Path(manager.config.root) / "checkpoints"
        self._handler_problems: dict[str, str] = {}  # runtime handler -> why it cannot
        self._probe: asyncio.Future[CriuSupport] | None = None

    def start_probe(self, enabled: bool) -> None:
        """Probe CRIU once, in a thread (`criu check` can take seconds): the daemon serves
        meanwhile, and what needs the answer waits for it."""
        self._probe = asyncio.ensure_future(asyncio.to_thread(_probe_and_log, enabled))

    async def support(self) -> CriuSupport:
        """Whether this node can checkpoint and restore (once probed)."""
        if self._probe is not None:
            self.criu = await asyncio.shield(self._probe)
        return self.criu

    async def check_handler(self, name: str) -> None:
        """Refuse what the runtime handler `name` cannot do (asked once per handler)."""
        handler = self.manager.oci.handler(name)
        if handler.name not in self._handler_problems:
            self._handler_problems[handler.name] = await asyncio.to_thread(
                runtime_criu_problem, handler.runtime_path, handler.flavor)
        problem = self._handler_problems[handler.name]
        if problem:
            raise FailedPreconditionError(
                f"runtime handler {handler.name!r} cannot checkpoint or restore: {problem}")

    # --- CheckpointContainer ------------------------------------------------------------

    async def checkpoint(self, container_id: str, location: str, timeout: float) -> Path:
        """Write a checkpoint archive of the running container to `location`."""
        manager = self.manager
        container = await manager.get(container_id)
        own = [Path(manager.config.root), Path(manager.config.runroot)]
        target = await asyncio.to_thread(check_location, location, own)
        if container.state != ContainerState.RUNNING:
            raise FailedPreconditionError(
                f"container {container.id} is {container.state}: only a running container "
                "can be checkpointed")
        (await self.support()).check()
        sandbox = manager.sandboxes.find(container.sandbox_id)
        await self.check_handler(sandbox.runtime_handler if sandbox is not None else "")
        limit = timeout if timeout > 0 else DEFAULT_TIMEOUT
        async with manager.locks.hold(container.id):
            container = await manager.refresh(manager.store.get(container.id))
            status = await manager.runtime_status(container)
            if status != str(ContainerState.RUNNING):
                raise FailedPreconditionError(
                    f"container {container.id} is {status}: only a running container can "
                    "be checkpointed")
            stage = await asyncio.to_thread(self._stage_dir, container.id)
            try:
                started = time.monotonic()
                images = stage / CHECKPOINT_DIR
                argv = manager.oci.runc_argv(
                    "checkpoint", "--leave-running", "--image-path", str(images),
                    "--work-path", str(stage), container.id, container_id=container.id)
                # Frozen from before CRIU's dump until the writable layer is copied:
                # otherwise a file the container writes in between has a size CRIU did
                # not record, and the restore fails ("File ... has bad size"). CRIU leaves
                # a cgroup it found frozen frozen.
                await manager.oci.pause(container.id)
                try:
                    await dump(argv, f"checkpoint of container {container.id}", stage, limit)
                    checkpointed_at = time.time_ns()
                    await asyncio.to_thread(self._assemble, container, stage, checkpointed_at)
                finally:
                    await self._thaw(container.id)
                await asyncio.to_thread(write_archive, stage, target)
            finally:
                await asyncio.to_thread(remove_tree, stage)
        log.info("container %s checkpointed to %s in %.1fs", container.id[:12], target,
                 time.monotonic() - started)
        return target

    def _stage_dir(self, container_id: str) -> Path:
        self.work_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f"dump-{container_id[:12]}.", dir=self.work_root))
        (stage / CHECKPOINT_DIR).mkdir()
        return stage

    async def _thaw(self, container_id: str) -> None:
        """Thaw the container frozen for its dump (or left frozen by a failed one)."""
        try:
            state = await self.manager.oci.state(container_id)
            if state is not None and state.get("status") == "paused":
                await self.manager.oci.resume(container_id)
        except CripyError as exc:
            log.warning("container %s: thawing it after its checkpoint failed: %s",
                        container_id[:12], exc)

    def _assemble(self, container: Container, stage: Path, checkpointed_at: int) -> None:
        """config.dump, spec.dump, rootfs-diff.tar, deleted.files, container.log."""
        manager = self.manager
        sandbox = manager.sandboxes.find(container.sandbox_id)
        spec: dict[str, Any] = json.loads(
            (manager.bundle_dir(container.id) / "config.json").read_text())
        image = manager.images.store.get(container.image_id)
        image_name = (image.repo_tags[0] if image is not None and image.repo_tags
                      else container.config.image.image)
        handler = manager.oci.handlers.get(sandbox.runtime_handler if sandbox else "")
        write_json(stage / CONFIG_DUMP, {
            "id": container.id, "name": container.name,
            "rootfsImage": container.config.image.image, "rootfsImageRef": container.image_id,
            "rootfsImageName": image_name, "runtime": handler.flavor if handler else "runc",
            "createdTime": _rfc3339(container.created_at),
            "checkpointedTime": _rfc3339(checkpointed_at),
        })
        spec.setdefault("annotations", {}).update(
            _annotations(container, sandbox, image_name, manager.log_file(container)))
        write_json(stage / SPEC_DUMP, spec)
        layers = [manager.images.store.layer_dir(d) / "diff"
                  for d in reversed(manager._layers_file(container.id))]
        excluded = [str(m.get("destination", "")) for m in spec.get("mounts") or []]
        deleted = write_rootfs_diff(manager.upper_dir(container.id), layers, excluded,
                                    stage / ROOTFS_DIFF)
        write_json(stage / DELETED_FILES, deleted)
        log_file = manager.log_file(container)
        if log_file.is_file():
            shutil.copyfile(log_file, stage / CONTAINER_LOG)

    # --- restore ------------------------------------------------------------------------

    def restore_dir(self, container_id: str) -> Path:
        return self.manager.store.object_dir(container_id) / RESTORE_DIR

    async def open_archive(self, image: str, handler: str) -> CheckpointArchive | None:
        """CreateContainer's image as a checkpoint, unpacked into a staging directory: a
        path to an archive, or an image made from one (with CRI-O's checkpoint
        annotation). None when the image is an ordinary one."""
        record = None
        if not await asyncio.to_thread(looks_like_archive, image):
            record = self.manager.images.lookup(image) if image else None
            if record is None or not await asyncio.to_thread(self._is_checkpoint_image,
                                                             record):
                return None
        (await self.support()).check()
        await self.check_handler(handler)
        layers = [self.manager.images.store.layer_dir(d) / "diff"
                  for d in (record.layers if record is not None else [])]

        def unpack() -> CheckpointArchive:
            self.work_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            dest = Path(tempfile.mkdtemp(prefix="restore.", dir=self.work_root))
            try:
                if record is None:
                    return unpack_archive(Path(image), dest,
                                          self.manager.config.image.max_layer_bytes)
                for layer in layers:  # already unpacked (and checked) by the pull
                    shutil.copytree(layer, dest, symlinks=True, dirs_exist_ok=True)
                return read_unpacked(dest, f"checkpoint image {image}")
            except BaseException:
                remove_tree(dest)
                raise

        return await asyncio.to_thread(unpack)

    def _is_checkpoint_image(self, record: ImageRecord) -> bool:
        try:
            manifest = json.loads(self.manager.images.store.read_blob(record.manifest_digest))
        except (OSError, ValueError):
            return False
        annotations = manifest.get("annotations") if isinstance(manifest, dict) else None
        return isinstance(annotations, dict) and CHECKPOINT_ANNOTATION in annotations

    def base_image(self, archive: CheckpointArchive) -> ImageRecord:
        """The image the checkpointed container ran: it must be on this node."""
        for name in archive.image_names:
            with contextlib.suppress(CripyError):
                found = self.manager.images.lookup(name)
                if found is not None:
                    return found
        names = archive.image_names
        raise NotFoundError(
            f"the checkpoint's image {names[0] if names else '(unnamed)'!r} is not on this "
            "node: pull it first")

    async def discard(self, archive: CheckpointArchive) -> None:
        await asyncio.to_thread(remove_tree, archive.directory)

    async def adopt(self, archive: CheckpointArchive, container_id: str) -> CheckpointArchive:
        """Move the unpacked archive into the new container's directory and apply its
        writable layer (before the rootfs is mounted)."""
        dest = self.restore_dir(container_id)
        max_bytes = self.manager.config.image.max_layer_bytes

        def move() -> CheckpointArchive:
            dest.parent.mkdir(parents=True, exist_ok=True)
            archive.directory.rename(dest)
            moved = read_unpacked(dest, "checkpoint archive")
            apply_rootfs_diff(moved, self.manager.upper_dir(container_id), max_bytes)
            write_criu_restore_config(dest / "criu.conf")
            return moved

        return await asyncio.to_thread(move)

    async def finish_rootfs(self, archive: CheckpointArchive, rootfs: Path) -> None:
        """Remove what the checkpointed container had deleted (rootfs mounted)."""
        await asyncio.to_thread(remove_deleted, rootfs, archive.deleted_files())

    def restore_spec(self, spec: dict[str, Any], archive: CheckpointArchive,
                     source: str) -> dict[str, Any]:
        """The new container's spec, marked as restored; CRIU gets its restore options."""
        annotations = spec.setdefault("annotations", {})
        annotations[CRIU_CONFIG_ANNOTATION] = str(archive.directory / "criu.conf")
        annotations[RESTORED_FROM] = source
        annotations[CHECKPOINTED_AT] = str(archive.config.get("checkpointedTime", ""))
        return spec

    async def pending(self, container_id: str) -> bool:
        """The container waits for its restore (StartContainer runs CRIU)."""
        path = self.restore_dir(container_id) / CHECKPOINT_DIR
        return await asyncio.to_thread(path.is_dir)

    async def restore(self, container: Container, sandbox: Sandbox) -> int:
        """conmon runs `runc restore`: returns the restored process's pid."""
        manager = self.manager
        (await self.support()).check()
        await self.check_handler(sandbox.runtime_handler)
        bundle = manager.bundle_dir(container.id)
        c = container.config
        try:
            pid = await manager.oci.create(
                container.id, bundle, manager.log_file(container), tty=c.tty, stdin=c.stdin,
                stdin_once=c.stdin_once, log_size_max=manager.config.runtime.log_size_max,
                handler=sandbox.runtime_handler, cgroup_parent=sandbox.config.linux.cgroup_parent,
                restore_from=self.restore_dir(container.id) / CHECKPOINT_DIR)
        except CripyError as exc:
            reason = await asyncio.to_thread(criu_log_errors, bundle / RESTORE_LOG)
            raise FailedPreconditionError(
                f"restoring container {container.id} from its checkpoint failed: "
                f"{reason or exc}") from None
        await self._thaw(container.id)  # CRIU restores a freezer state it dumped
        await asyncio.to_thread(remove_tree, self.restore_dir(container.id))
        return pid


def _probe_and_log(enabled: bool) -> CriuSupport:
    found = probe_criu(enabled)
    if found.available:
        log.info("checkpoint/restore: criu %s (%s)", found.version, found.path)
    else:
        log.warning("checkpoint/restore is not available: %s", found.reason)
    return found


def _annotations(container: Container, sandbox: Sandbox | None, image_name: str,
                 log_path: Path) -> dict[str, str]:
    """What CRI-O's archives carry in spec.dump (checkpointctl shows them)."""
    meta = container.config.metadata
    found = {
        # checkpointctl tells archive layouts apart by this; ours is CRI-O's.
        "io.container.manager": "cri-o",
        "io.kubernetes.cri-o.ContainerID": container.id,
        "io.kubernetes.cri-o.ContainerName": container.name,
        "io.kubernetes.cri-o.ContainerType": "container",
        "io.kubernetes.cri-o.Created": _rfc3339(container.created_at),
        "io.kubernetes.cri-o.ImageName": image_name,
        "io.kubernetes.cri-o.ImageRef": container.image_id,
        "io.kubernetes.cri-o.Image": container.image_id,
        "io.kubernetes.cri-o.LogPath": str(log_path),
        "io.kubernetes.cri-o.Metadata": json.dumps({"name": meta.name,
                                                    "attempt": meta.attempt}),
        "io.kubernetes.cri-o.Labels": json.dumps(dict(container.config.labels)),
        "io.kubernetes.cri-o.Annotations": json.dumps(dict(container.config.annotations)),
        "io.kubernetes.container.name": meta.name,
        "io.kubernetes.cri-o.SandboxID": container.sandbox_id,
    }
    if sandbox is not None:
        pod = sandbox.config.metadata
        found.update({
            "io.kubernetes.cri-o.SandboxName": sandbox.name,
            "io.kubernetes.pod.name": pod.name,
            "io.kubernetes.pod.namespace": pod.namespace,
            "io.kubernetes.pod.uid": pod.uid,
        })
    return found
