"""The status API: CRI-O's inspect endpoints, as HTTP/1.1 on a root-only unix socket.

    GET  /info            the daemon: storage, cgroup driver, ID mappings, version
    GET  /config          the effective configuration as TOML
    GET  /containers/ID   one container (or pod) as JSON, with CRI-O's field names
    POST /pause/ID        freeze a created or running container (`runc pause`)
    POST /unpause/ID      thaw a paused one (`runc resume`)

IDs may be unique prefixes. Errors are JSON `{"error": "..."}` with 400 (bad request or
ID), 404, 405, 409 (wrong state), 413, 500 or 503. Paused is not a state of cripy's
records: /containers/ID reports it from `runc state`.

The HTTP part is cripy.httpserver, shared with the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from cripy import __version__
from cripy.config import Config, render
from cripy.errors import CripyError, NotFoundError
from cripy.httpserver import (
    HTTPConnections,
    Request,
    Response,
    error_response,
    json_response,
    prepare_unix_socket,
)
from cripy.oci.features import RUNTIME_FEATURES
from cripy.runtime.store import PAUSED, Container, ContainerState, PodState, Sandbox

if TYPE_CHECKING:
    from cripy.oci.runtime import OciRuntime
    from cripy.runtime.container import ContainerManager
    from cripy.runtime.sandbox import SandboxManager

log = logging.getLogger(__name__)


#: CRI-O's default mapping: the whole 32-bit range, host ID = container ID.
_FULL_MAPPING = [{"container_id": 0, "host_id": 0, "size": 2**32 - 1}]

# --- the status API ------------------------------------------------------------------


class StatusServer:
    def __init__(self, path: Path, config: Config, containers: ContainerManager,
                 sandboxes: SandboxManager, oci: OciRuntime) -> None:
        self.path = Path(path)
        self.config = config
        self.containers = containers
        self.sandboxes = sandboxes
        self.oci = oci
        self._clients = HTTPConnections(self.handle)
        self._server: asyncio.Server | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        await asyncio.to_thread(prepare_unix_socket, self.path)
        # Mode 0660 from the start: no moment where others may connect.
        old_umask = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(self._clients, path=str(self.path))
        finally:
            os.umask(old_umask)
        self._inode = os.stat(self.path).st_ino
        log.info("status API on unix://%s", self.path)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._clients.close()
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:  # not a successor's socket
                self.path.unlink()

    async def handle(self, request: Request) -> Response:
        parts = [unquote(p) for p in request.path.split("/")[1:]]
        route: tuple[tuple[str, ...], Callable[[], Awaitable[Response]]] | None = None
        match parts:
            case ["info"]:
                route = ("GET", "HEAD"), self._info
            case ["config"]:
                route = ("GET", "HEAD"), self._config
            case ["containers", ident] if ident:
                route = ("GET", "HEAD"), lambda: self._container(ident)
            case ["pause", ident] if ident:
                route = ("POST",), lambda: self._pause(ident)
            case ["unpause", ident] if ident:
                route = ("POST",), lambda: self._unpause(ident)
        if route is None:
            return error_response(404, f"no such endpoint: {request.path}")
        methods, call = route
        if request.method not in methods:
            response = error_response(405, f"{request.method} is not allowed on "
                                           f"{request.path} (only {', '.join(methods)})")
            response.headers.append(("Allow", ", ".join(methods)))
            return response
        try:
            return await call()
        except CripyError as exc:
            return error_response(exc.code.http_status, str(exc))

    async def _info(self) -> Response:
        config = self.config
        return json_response({
            "storage_driver": "overlay",
            "storage_root": config.root,
            "storage_image": "",
            "cgroup_driver": config.runtime.cgroup_manager,
            "default_id_mappings": {"uids": _FULL_MAPPING, "gids": _FULL_MAPPING},
            "runroot": config.runroot,
            "runtime": self.oci.runtime_path,
            "runtime_root": str(self.oci.state_dir / "runc"),
            "version": __version__,
            "checkpoint_restore": (await self.containers.checkpoints.support()).report(),
            "runtime_handlers": self.containers.runtime_handlers(),
            "default_runtime_handler": config.runtime.default_handler,
            "features": RUNTIME_FEATURES,
        })

    async def _config(self) -> Response:
        return Response(200, render(self.config).encode(), "application/toml")

    async def _container(self, ident: str) -> Response:
        try:
            container = await self.containers.get(ident)
        except NotFoundError:
            sandbox = self._sandbox(ident)
            if sandbox is None:
                raise
            return json_response(self._pod_info(sandbox))
        return json_response(await self._container_info(container))

    def _sandbox(self, ident: str) -> Sandbox | None:
        try:
            sandbox = self.sandboxes.get(ident)
        except NotFoundError:
            return None
        return None if sandbox.state == PodState.CREATING else sandbox

    async def _container_info(self, c: Container) -> dict[str, Any]:
        sandbox = self.sandboxes.find(c.sandbox_id)
        try:
            state = await self.containers.runtime_status(c)
        except CripyError as exc:
            log.warning("container %s: runc state failed: %s", c.id[:12], exc)
            state = str(c.state)
        return {
            "id": c.id,
            "name": c.name,
            "pid": 0 if state == ContainerState.EXITED else c.pid,  # an exited pid may be reused
            "image": c.config.image.image,
            "image_ref": c.image_id,
            "created_time": c.created_at,
            "labels": dict(c.config.labels),
            "annotations": dict(c.config.annotations),
            "log_path": str(self.containers.log_file(c)),
            "root": str(self.containers.bundle_dir(c.id) / "rootfs"),
            "sandbox": c.sandbox_id,
            "ip_addresses": list(sandbox.ips) if sandbox else [],
            "host_network": sandbox.host_network if sandbox else None,
            "state": state,
            "started_time": c.started_at,
            "finished_time": c.finished_at,
            "exit_code": c.exit_code,
        }

    def _pod_info(self, s: Sandbox) -> dict[str, Any]:
        """A pod in CRI-O's infra-container shape; its pid is the infra process's or, as
        CRI-O does without one, a running container's (both share its network)."""
        pid = s.infra_pid or next((c.pid for c in self.containers.in_sandbox(s.id)
                                   if c.state == ContainerState.RUNNING and c.pid > 0), 0)
        return {
            "id": s.id,
            "name": s.name,
            "pid": pid,
            "image": "",
            "image_ref": "",
            "created_time": s.created_at,
            "labels": dict(s.config.labels),
            "annotations": dict(s.config.annotations),
            "log_path": s.config.log_directory,
            "root": "",
            "sandbox": s.id,
            "ip_addresses": list(s.ips),
            "host_network": s.host_network,
            "state": str(s.state),
        }

    async def _pause(self, ident: str) -> Response:
        c = await self.containers.pause(ident)
        return json_response({"id": c.id, "state": PAUSED})

    async def _unpause(self, ident: str) -> Response:
        c = await self.containers.unpause(ident)
        return json_response({"id": c.id, "state": str(c.state)})
