"""User namespaces for pods (the kubelet's hostUsers: false).

A pod with NamespaceOption.userns_options mode POD gets one user namespace with the
kubelet's uid and gid mappings, pinned to a file beside its other namespaces. Its
network, IPC and UTS namespaces are made inside it (so /sys, /dev/mqueue and the hostname
belong to the pod's root), and every container of the pod joins it:

- the rootfs is an overlay of idmapped layers (each layer a bind clone with
  MOUNT_ATTR_IDMAP and the pod's user namespace): the image's root-owned files are owned
  by the container's root, and what the container writes lands in the upper layer as the
  mapped host IDs;
- every volume (CRI mount) is an idmapped bind mount (OCI mount uidMappings/gidMappings,
  done by the OCI runtime): a file the container's uid N writes is owned by uid N on the
  host, as the kubelet expects.

Whether a handler can do this was probed at start (cripy.oci.features); pods asking for
it on a handler that cannot are refused with the reason.

`python -m cripy.oci.userns DIR UIDMAP GIDMAP KINDS [HOSTNAME]` pins the namespaces
(the fork and the namespace switch need a single-threaded process of their own).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cripy.api import api_pb2 as pb
from cripy.errors import FailedPreconditionError, InvalidArgumentError
from cripy.network.loopback import bring_up_lo
from cripy.oci import idmap
from cripy.oci.idmap import IDMap

#: The kernel takes at most this many lines per uid_map/gid_map.
MAX_MAP_LINES = 340
ID_LIMIT = 2**32 - 1  # (uid_t)-1 is never a valid ID

CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000
_CLONE_FLAGS = {"net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}


@dataclass(frozen=True)
class PodUserns:
    uids: tuple[IDMap, ...]
    gids: tuple[IDMap, ...]
    path: str = ""  # the pinned user namespace, once made

    def host_root(self) -> tuple[int, int]:
        """The host uid and gid the container's root is."""
        return _to_host(self.uids, 0, "uid"), _to_host(self.gids, 0, "gid")

    def to_args(self) -> list[str]:
        return [_map_arg(self.uids), _map_arg(self.gids)]


def _to_host(maps: Sequence[IDMap], cid: int, what: str) -> int:
    for m in maps:
        if m.container_id <= cid < m.container_id + m.length:
            return m.host_id + cid - m.container_id
    raise InvalidArgumentError(f"user namespace {what} mappings do not map {what} {cid}")


def _map_arg(maps: Sequence[IDMap]) -> str:
    return ",".join(f"{m.container_id}:{m.host_id}:{m.length}" for m in maps)


def _parse_map_arg(text: str) -> tuple[IDMap, ...]:
    return tuple(IDMap(*(int(n) for n in part.split(":"))) for part in text.split(",") if part)


def _check_maps(maps: Sequence[pb.IDMapping], what: str) -> tuple[IDMap, ...]:
    if not maps:
        raise InvalidArgumentError(f"userns_options mode POD needs {what} mappings")
    if len(maps) > MAX_MAP_LINES:
        raise InvalidArgumentError(
            f"userns_options: {len(maps)} {what} mappings, the kernel takes at most "
            f"{MAX_MAP_LINES}")
    out = tuple(IDMap(m.container_id, m.host_id, m.length) for m in maps)
    for m in out:
        if m.length == 0:
            raise InvalidArgumentError(
                f"userns_options: {what} mapping {m.container_id}:{m.host_id} has length 0")
        for start in (m.container_id, m.host_id):
            if start + m.length > ID_LIMIT:
                raise InvalidArgumentError(
                    f"userns_options: {what} mapping {m.container_id}:{m.host_id}:{m.length}"
                    f" goes past the largest ID {ID_LIMIT - 1}")
    for side in ("container_id", "host_id"):
        ranges = sorted((getattr(m, side), m.length) for m in out)
        for (a, alen), (b, _) in zip(ranges, ranges[1:], strict=False):
            if a + alen > b:
                raise InvalidArgumentError(
                    f"userns_options: {what} mappings overlap in {side.replace('_', ' ')}s "
                    f"at {b}")
    return out


def pod_userns(config: pb.PodSandboxConfig) -> PodUserns | None:
    """The pod's user namespace from its config (None: the node's), validated."""
    nso = config.linux.security_context.namespace_options
    if not nso.HasField("userns_options"):
        return None
    options = nso.userns_options
    if options.mode == pb.NODE:
        return None
    if options.mode != pb.POD:
        name = pb.NamespaceMode.Name(options.mode) if options.mode in (
            pb.CONTAINER, pb.TARGET) else str(options.mode)
        raise InvalidArgumentError(
            f"userns_options mode {name} is not supported for a pod: use POD or NODE")
    userns = PodUserns(_check_maps(options.uids, "uid"), _check_maps(options.gids, "gid"))
    userns.host_root()  # container root must be mapped
    for kind, mode in (("network", nso.network), ("pid", nso.pid), ("ipc", nso.ipc)):
        if mode == pb.NODE:
            raise InvalidArgumentError(
                f"a pod in its own user namespace cannot use the node's {kind} namespace "
                f"(userns_options mode POD with {kind} mode NODE)")
    return userns


def check_handler(userns: PodUserns | None, handler: str, supported: bool, reason: str
                  ) -> None:
    if userns is not None and not supported:
        raise FailedPreconditionError(
            f"runtime handler {handler!r} cannot run pods in a user namespace here "
            f"(userns_options mode POD): {reason}")


def container_userns(nso: pb.NamespaceOption, pod: PodUserns | None) -> None:
    """A container's userns_options must agree with its pod's (the kubelet copies them)."""
    if not nso.HasField("userns_options"):
        return
    mode = nso.userns_options.mode
    if mode == pb.POD and pod is None:
        raise InvalidArgumentError(
            "container userns_options mode POD, but its pod has no user namespace")
    if mode == pb.NODE and pod is not None:
        raise InvalidArgumentError(
            "container userns_options mode NODE, but its pod runs in a user namespace")
    if mode not in (pb.POD, pb.NODE):
        raise InvalidArgumentError(
            f"container userns_options mode {mode} is not supported: containers share "
            "their pod's user namespace (POD) or the node's (NODE)")


def spec_entries(userns: PodUserns) -> dict[str, Any]:
    """The OCI linux section's part: join the pinned namespace, with its mappings."""
    return {"uidMappings": [m.to_oci() for m in userns.uids],
            "gidMappings": [m.to_oci() for m in userns.gids]}


def idmap_mount(mount: dict[str, Any], userns: PodUserns) -> dict[str, Any]:
    """An OCI bind mount made idmapped with the pod's mappings."""
    return {**mount, **spec_entries(userns)}


# --- the rootfs: idmapped layers under the overlay -----------------------------------


def idmap_layers(userns_path: str, layers_root: Path, lowers: Sequence[str],
                 into: Path) -> list[str]:
    """Mount an idmapped clone of each of `lowers` (relative to `layers_root`) at
    into/<n>; returns the names relative to `into`, in the same order. Blocking."""
    into.mkdir(parents=True, exist_ok=True)
    fd = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC)
    names: list[str] = []
    try:
        for n, lower in enumerate(lowers):
            target = into / str(n)
            target.mkdir(exist_ok=True)
            clone = idmap.idmapped_clone(str(layers_root / lower), fd)
            try:
                idmap.move_mount(clone, str(target))
            finally:
                os.close(clone)
            names.append(str(n))
    except OSError as exc:
        release_layers(into)
        raise FailedPreconditionError(f"cannot idmap the image layers: {exc}") from None
    finally:
        os.close(fd)
    return names


def release_layers(into: Path) -> None:
    """Detach the idmapped layer clones (a mounted overlay keeps its own). Blocking."""
    if not into.is_dir():
        return
    for entry in sorted(into.iterdir()):
        with contextlib.suppress(OSError):
            idmap.umount_detach(str(entry))
        with contextlib.suppress(OSError):
            entry.rmdir()
    with contextlib.suppress(OSError):
        into.rmdir()


# --- pinning (in its own process) ------------------------------------------------------


def pin_argv(directory: Path, userns: PodUserns, kinds: Sequence[str],
             hostname: str | None) -> list[str]:
    return [sys.executable, "-m", "cripy.oci.userns", str(directory), *userns.to_args(),
            ",".join(kinds), *([hostname] if hostname is not None else [])]


def _pin(directory: Path, uids: Sequence[IDMap], gids: Sequence[IDMap],
         kinds: Sequence[str], hostname: str | None) -> None:
    def make_namespaces() -> None:  # in the new user namespace, as its root
        flags = 0
        for kind in kinds:
            flags |= _CLONE_FLAGS[kind]
        idmap.unshare(flags)
        if hostname is not None:
            socket.sethostname(hostname)
        if "net" in kinds:
            bring_up_lo()

    with idmap.in_new_userns(uids, gids, make_namespaces) as pid:
        for kind in ("user", *kinds):
            idmap.mount(f"/proc/{pid}/ns/{kind}", str(directory / kind), None, idmap.MS_BIND)


if __name__ == "__main__":
    _dir, _uids, _gids, _kinds, *_host = sys.argv[1:]
    try:
        _pin(Path(_dir), _parse_map_arg(_uids), _parse_map_arg(_gids),
             [k for k in _kinds.split(",") if k], _host[0] if _host else None)
    except OSError as _exc:
        print(f"pinning the pod's user namespace failed: {_exc}", file=sys.stderr)
        sys.exit(1)


def sandbox_userns(config: pb.PodSandboxConfig, namespaces: Mapping[str, str]
                   ) -> PodUserns | None:
    """A made pod's user namespace: its mappings and where it is pinned."""
    path = namespaces.get("user")
    if path is None:
        return None
    found = pod_userns(config)
    return PodUserns(found.uids, found.gids, path) if found is not None else None


def prepare_upper(upper: Path, userns: PodUserns) -> None:
    """The writable layer's top directory belongs to the container's root. Blocking."""
    upper.mkdir(parents=True, exist_ok=True)
    os.chown(upper, *userns.host_root())


def own_infra_rootfs(shared: Path, target: Path, userns: PodUserns) -> Path:
    """A copy of the infra rootfs (catatonit only) owned by the pod's root, so the
    runtime, inside the pod's user namespace, can make its mount points. Blocking."""
    target.mkdir(exist_ok=True)
    for entry in shared.iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            shutil.copy2(entry, target / entry.name)
    os.chown(target, *userns.host_root())
    return target
