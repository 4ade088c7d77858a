"""What the lifecycle controllers need of their collaborators, as Protocol classes.

The daemon passes the real ones (OciRuntime, CNIManager, ImageManager, and `HOST` for
mounts and namespaces); the controller unit tests pass fakes that need no root.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from cripy.image.store import ImageRecord
from cripy.network.cni import PodNetwork, PortMapping
from cripy.network.namespaces import is_pinned, pin_namespaces, unpin_namespaces
from cripy.oci.cgroups import CgroupDriver
from cripy.oci.handlers import RuntimeHandler
from cripy.oci.runtime import ExecResult, ExitStatus
from cripy.oci.userns import PodUserns
from cripy.storage.overlay import mount_overlay, mount_tmpfs, unmount


class OciDriver(Protocol):
    """The OCI runtime under conmon (cripy.oci.runtime.OciRuntime)."""

    cgroups: CgroupDriver

    @property
    def handlers(self) -> Mapping[str, RuntimeHandler]: ...
    def handler(self, name: str) -> RuntimeHandler: ...
    def container_cgroup(self, cgroup_parent: str, container_id: str, handler: str
                         ) -> str: ...
    async def create(self, container_id: str, bundle: Path, log_path: Path, *,
                     tty: bool = False, stdin: bool = False, stdin_once: bool = False,
                     log_size_max: int = -1, handler: str = "",
                     cgroup_parent: str = "", restore_from: Path | None = None) -> int: ...
    async def start(self, container_id: str) -> None: ...
    async def stop(self, container_id: str, timeout: float, stop_signal: int = ...) -> None: ...
    async def delete(self, container_id: str) -> None: ...
    async def state(self, container_id: str) -> dict[str, Any] | None: ...
    def exit_status(self, container_id: str) -> ExitStatus | None: ...
    async def update(self, container_id: str, resources: dict[str, Any]) -> None: ...
    async def pause(self, container_id: str) -> None: ...
    async def resume(self, container_id: str) -> None: ...
    async def exec_sync(self, container_id: str, args: list[str], *,
                        timeout: float | None) -> ExecResult: ...
    async def reopen_log(self, container_id: str) -> None: ...
    def runc_argv(self, *args: str, container_id: str | None = None) -> list[str]: ...


class Network(Protocol):
    """Pod networking (cripy.network.cni.CNIManager)."""

    pod_cidr: str
    config_dir: str

    async def setup(self, pod_id: str, netns: Path, *, pod_name: str, pod_namespace: str,
                    pod_uid: str, port_mappings: Sequence[PortMapping] = (),
                    lo_is_up: bool = False) -> PodNetwork: ...
    async def teardown(self, pod_id: str, netns: Path | None) -> None: ...


class LayerStore(Protocol):
    @property
    def layers(self) -> Path: ...
    def layer_dir(self, diff_id: str) -> Path: ...
    def get(self, image_id: str) -> ImageRecord | None: ...
    def read_blob(self, digest: str) -> bytes: ...


class Images(Protocol):
    """The images containers are made from (cripy.image.service.ImageManager)."""

    @property
    def store(self) -> LayerStore: ...
    def lookup(self, text: str) -> ImageRecord | None: ...
    def image_config(self, record: ImageRecord) -> dict[str, Any]: ...


class Host:
    """Mounts and namespace pins: the parts of a pod and a container that need root."""

    async def pin_namespaces(self, directory: Path, kinds: Sequence[str],
                             hostname: str | None, userns: PodUserns | None = None
                             ) -> dict[str, Path]:
        return await pin_namespaces(directory, kinds, hostname, userns)

    async def unpin_namespaces(self, directory: Path) -> None:
        await unpin_namespaces(directory)

    def is_pinned(self, path: Path) -> bool:
        return is_pinned(path)

    async def mount_tmpfs(self, target: Path, options: str) -> None:
        await mount_tmpfs(target, options)

    async def mount_overlay(self, layers_root: Path, lowers: list[str], upper: Path,
                            work: Path, target: Path) -> None:
        await mount_overlay(layers_root, lowers, upper, work, target)

    async def unmount(self, target: Path) -> None:
        await unmount(target)


HOST = Host()
