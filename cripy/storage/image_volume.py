"""Image volumes (Mount.image, KEP-4639): an already pulled image mounted read-only.

Each image mount of a container gets a read-only overlay of that image's layers (no
upper layer) at `<bundle>/image-volumes/<n>`, n being the mount's index in the
container's config; the container then gets a read-only bind of it, or of its
`image_sub_path`, at `container_path`. The overlays live in the container's bundle, so
removing the container (or finding its remains after a crash) unmounts them all.

The checks here run before anything is made, so bad requests are refused with a clear
error: a writable image mount, a host path given too, a sub path that is absolute or
climbs with `..`. A sub path is resolved inside the mounted image with the image's own
symlinks taken relative to the image root; one that does not exist is NOT_FOUND, one
whose symlinks lead out of the image is INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cripy.api import api_pb2 as pb
from cripy.errors import InvalidArgumentError, NotFoundError
from cripy.image.store import ImageRecord
from cripy.network.namespaces import _mount_points
from cripy.storage.overlay import mount_readonly_overlay, unmount

log = logging.getLogger(__name__)

VOLUMES_DIR = "image-volumes"
MAX_SYMLINKS = 40  # as the kernel's path walk


def is_image_mount(m: pb.Mount) -> bool:
    return bool(m.image.image or m.image.image_ref)


def image_text(m: pb.Mount) -> str:
    """What names the mount's image: the reference given, else the resolved ID."""
    return m.image.image or m.image.image_ref


def check_image_mount(m: pb.Mount) -> None:
    """Refuse what an image mount cannot be (before anything is made)."""
    where = f"image volume {m.container_path!r} ({image_text(m)})"
    if not m.readonly:
        raise InvalidArgumentError(
            f"{where}: image volumes are read-only; the mount must set readonly: true")
    if m.host_path:
        raise InvalidArgumentError(
            f"{where}: a mount is an image or a host path, not both (host_path "
            f"{m.host_path!r})")
    if m.uidMappings or m.gidMappings:
        raise InvalidArgumentError(f"{where}: id-mapped image volumes are not supported")
    if m.propagation == pb.PROPAGATION_BIDIRECTIONAL:
        raise InvalidArgumentError(
            f"{where}: a read-only image cannot propagate mounts back to the host "
            "(bidirectional propagation)")
    sub_path_components(m.image_sub_path, where)


def sub_path_components(sub_path: str, where: str) -> list[str]:
    """The components of a relative sub path without `..` (InvalidArgumentError else)."""
    if sub_path.startswith("/") or "\x00" in sub_path:
        raise InvalidArgumentError(
            f"{where}: image_sub_path {sub_path!r} must be a relative path")
    parts = [p for p in sub_path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgumentError(
            f"{where}: image_sub_path {sub_path!r} must not contain '..'")
    return parts


def resolve_sub_path(root: Path, sub_path: str, where: str = "image volume") -> Path:
    """`sub_path` inside `root`, the image's symlinks followed as if `root` were '/'.

    Blocking (lstat, readlink): call it in a thread. `root` is a read-only mount of
    ours, so what is resolved here is what gets bound.
    """
    todo = list(reversed(sub_path_components(sub_path, where)))
    resolved: list[str] = []
    links = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":  # only from a symlink's target
            if not resolved:
                raise InvalidArgumentError(
                    f"{where}: image_sub_path {sub_path!r} leads out of the image through "
                    "a symlink")
            resolved.pop()
            continue
        path = root.joinpath(*resolved, part)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(
                f"{where}: image_sub_path {sub_path!r} does not exist in the image "
                f"({'/'.join([*resolved, part])} is missing)") from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise InvalidArgumentError(
                    f"{where}: image_sub_path {sub_path!r}: too many levels of symlinks")
            target = os.readlink(path)
            if target.startswith("/"):
                resolved = []
            todo.extend(reversed(target.split("/")))
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            raise NotFoundError(
                f"{where}: image_sub_path {sub_path!r} does not exist in the image "
                f"({'/'.join([*resolved, part])} is not a directory)")
        resolved.append(part)
    return root.joinpath(*resolved)


def resolve_image_mounts(config: pb.ContainerConfig,
                         lookup: Callable[[str], ImageRecord | None]) -> pb.ContainerConfig:
    """`config` with each image mount checked and its image_ref set to the image ID.

    The container's record keeps this config: ContainerStatus.mounts then tells which
    image content each mount got, and RemoveImage finds the images in use.
    """
    if not any(is_image_mount(m) for m in config.mounts):
        return config
    resolved = pb.ContainerConfig()
    resolved.CopyFrom(config)
    for m in resolved.mounts:
        if not is_image_mount(m):
            continue
        check_image_mount(m)
        record = lookup(m.image.image_ref or m.image.image)
        if record is None:
            raise NotFoundError(
                f"image volume {m.container_path!r}: image {image_text(m)!r} not found: "
                "pull it first")
        m.image.image_ref = record.id
    return resolved


def volume_images(config: pb.ContainerConfig) -> list[str]:
    """The image IDs a (resolved) config mounts as image volumes."""
    return [m.image.image_ref for m in config.mounts if is_image_mount(m)]


@dataclass(frozen=True)
class MountedVolume:
    index: int  # the mount's index in ContainerConfig.mounts
    source: Path  # what is bound into the container: the overlay or a path inside it


def volumes_dir(bundle: Path) -> Path:
    return bundle / VOLUMES_DIR


async def mount_image_volume(bundle: Path, index: int, layers_root: Path,
                             lowers: list[str], m: pb.Mount) -> MountedVolume:
    """Mount the image (its layer directories `lowers`, topmost first, relative to
    `layers_root`) read-only for mount `index` and resolve its sub path in it."""
    base = volumes_dir(bundle)
    target = base / str(index)
    await mount_readonly_overlay(layers_root, lowers, target, base / "empty")
    where = f"image volume {m.container_path!r} ({image_text(m)})"
    source = await asyncio.to_thread(resolve_sub_path, target, m.image_sub_path, where)
    return MountedVolume(index, source)


def with_volume_binds(config: pb.ContainerConfig, volumes: list[MountedVolume]
                      ) -> pb.ContainerConfig:
    """`config` with each image mount turned into the read-only bind of its volume,
    as the OCI spec is built from host binds."""
    if not volumes:
        return config
    effective = pb.ContainerConfig()
    effective.CopyFrom(config)
    for volume in volumes:
        m = effective.mounts[volume.index]
        # Private: nothing is ever mounted under an image volume on the host, so
        # host-to-container propagation would carry nothing either.
        bind = pb.Mount(container_path=m.container_path, host_path=str(volume.source),
                        readonly=True, propagation=pb.PROPAGATION_PRIVATE,
                        recursive_read_only=m.recursive_read_only)
        m.CopyFrom(bind)
    return effective


def _mounts_under(directory: Path) -> list[Path]:
    prefix = os.path.realpath(directory) + "/"
    return sorted((Path(p) for p in _mount_points() if p.startswith(prefix)),
                  key=lambda p: -len(p.parts))


async def unmount_volumes(bundle: Path) -> None:
    """Unmount every image volume of a container (those a crash left too)."""
    for point in await asyncio.to_thread(_mounts_under, volumes_dir(bundle)):
        await unmount(point)


async def unmount_orphans(containers_dir: Path, known: set[str]) -> None:
    """Unmount image volumes of bundles whose container has no record (start-up)."""
    for point in await asyncio.to_thread(_mounts_under, containers_dir):
        relative = point.relative_to(os.path.realpath(containers_dir)).parts
        if len(relative) >= 2 and relative[1] == VOLUMES_DIR and relative[0] not in known:
            log.info("unmounting image volume %s of a container without a record", point)
            await unmount(point)
