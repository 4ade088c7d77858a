"""The status API: CRI-O's inspect endpoints, as HTTP/1.1 on a root-only unix socket.

    GET  /info            the daemon: storage, cgroup driver, ID mappings, version
    GET  /config          the effective configuration as TOML
    GET  /containers/ID   one container (or pod) as JSON, with CRI-O's field names
    POST /pause/ID        freeze a created or running container (`runc pause`)
    POST /unpause/ID      thaw a paused one (`runc resume`)

IDs may be unique prefixes. Errors are JSON `{"error": "..."}` with 400 (bad request or
ID), 404, 405, 409 (wrong state), 413, 500 or 503. Paused is not a state of cripy's
records: /containers/ID reports it from `runc state`.

The HTTP part (`HTTPConnections`: h11, bounded headers and bodies, timeouts, a cap on
clients, one task per client) is shared with the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import h11

from cripy import __version__
from cripy.config import Config, render
from cripy.errors import CripyError, FailedPreconditionError, NotFoundError
from cripy.runtime.store import PAUSED, Container, ContainerState, PodState, Sandbox

if TYPE_CHECKING:
    from cripy.oci.runtime import OciRuntime
    from cripy.runtime.container import ContainerManager
    from cripy.runtime.sandbox import SandboxManager

log = logging.getLogger(__name__)


MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
#: Seconds a client may take to send a whole request (or stay idle before the next).
READ_TIMEOUT = 30.0
#: Seconds a client may take to accept a response.
WRITE_TIMEOUT = 30.0
#: How long, and how much, a rejected client's input is still read before the close.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20
#: Clients served at once; more are answered 503 and closed.
MAX_CLIENTS = 64

#: CRI-O's default mapping: the whole 32-bit range, host ID = container ID.
_FULL_MAPPING = [{"container_id": 0, "host_id": 0, "size": 2**32 - 1}]

_STATUS_OF_CODE = {
    "INVALID_ARGUMENT": 400, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "FAILED_PRECONDITION": 409, "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


# --- HTTP ----------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str  # percent-encoded, without the query
    headers: dict[str, str]  # lower-case names


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value).encode() + b"\n")


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HTTPConnections:
    """The client callback for asyncio.start_server / start_unix_server.

    Each client is served in its own task with its own limits, so a slow or broken one
    only ever costs its own connection. `close()` ends every connection.
    """

    def __init__(self, handler: Handler, limit: int = MAX_CLIENTS) -> None:
        self.handler = handler
        self.limit = limit
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if len(self._tasks) > self.limit:
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                await _linger(reader, writer)
                return
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            if not self._closing:
                raise
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def close(self) -> None:
        """End every connection (the client callback returns quietly)."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        while True:
            try:
                async with asyncio.timeout(READ_TIMEOUT):  # the whole request, slow or not
                    request = await _read_request(conn, reader, writer)
            except (h11.RemoteProtocolError, _Reject) as exc:
                status = exc.status if isinstance(exc, _Reject) else exc.error_status_hint
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    response = error_response(status, str(exc) or "bad request")
                    response.headers.append(("Connection", "close"))
                    await _send(conn, writer, response, head=False)
                    await _linger(reader, writer)
                return
            if request is None:
                return
            try:
                response = await self.handler(request)
            except Exception:
                log.exception("HTTP %s %s failed", request.method, request.path)
                response = error_response(500, "internal error")
            await _send(conn, writer, response, head=request.method == "HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # one side asked to close
            conn.start_next_cycle()


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(65536))  # b"" is the end of the stream


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> Request | None:
    """The next request, its body read and dropped; None when the client closed."""
    event = await _next_event(conn, reader)
    if isinstance(event, h11.ConnectionClosed):
        return None
    if not isinstance(event, h11.Request):
        raise _Reject(400, "expected a request")
    target = event.target.decode("ascii", "replace")
    request = Request(
        method=event.method.decode("ascii", "replace").upper(),
        path=target.split("?", 1)[0].split("#", 1)[0],
        headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers},
    )
    if conn.they_are_waiting_for_100_continue:
        writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
    size = 0
    while True:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.EndOfMessage):
            return request
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY_BYTES:
                raise _Reject(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        elif isinstance(event, h11.ConnectionClosed):
            raise _Reject(400, "connection closed in the request body")


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, response: Response,
                *, head: bool) -> None:
    headers = [("Content-Type", response.content_type),
               ("Content-Length", str(len(response.body))),
               ("Server", f"cripy/{__version__}"), *response.headers]
    data = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
    if not head and response.body:
        data += conn.send(h11.Data(data=response.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    writer.write(data)
    async with asyncio.timeout(WRITE_TIMEOUT):
        await writer.drain()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close politely: stop writing, then drop what the client still sends (for a moment,
    up to a limit), or the kernel would answer it with a reset that can beat our reply."""
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()
    with contextlib.suppress(ConnectionError, TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            dropped = 0
            while dropped < LINGER_BYTES:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                dropped += len(chunk)


def prepare_unix_socket(path: Path) -> None:
    """Make room for a new socket at `path`: a leftover of a killed daemon is removed,
    a socket somebody listens on (or a file that is no socket) is an error."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FailedPreconditionError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens
        return
    finally:
        probe.close()
    raise FailedPreconditionError(f"something is already listening on {path}")


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
            return error_response(_STATUS_OF_CODE.get(exc.code, 500), str(exc))

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
