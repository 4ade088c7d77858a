"""NRI connections over asyncio: the multiplexer and ttrpc, client and server at once.

One plugin is one stream socket (an accepted connection on the NRI socket, or one end of
a socketpair whose other end a pre-installed plugin inherits). NRI multiplexes two ttrpc
connections over it (see `cripy.nri.mux`): on one the runtime serves the Runtime service
(the plugin calls RegisterPlugin and UpdateContainers), on the other it is the client of
the plugin's Plugin service (Configure, Synchronize, the events).

`MuxPeer` is the symmetric core, used for the runtime side (`PluginConnection`) and by the
tests' plugin. Nothing here blocks the event loop: socket reads and writes go through
asyncio streams, each served request runs in its own task, and every call has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from google.protobuf.message import DecodeError, Message

from cripy.nri import api_pb2, events, mux, ttrpc, ttrpc_pb2

log = logging.getLogger(__name__)

RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"
PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"

# NRI's environment for plugins it launches with a pre-connected socket (pkg/api).
PLUGIN_SOCKET_ENV = "NRI_PLUGIN_SOCKET"
PLUGIN_NAME_ENV = "NRI_PLUGIN_NAME"
PLUGIN_IDX_ENV = "NRI_PLUGIN_IDX"
# The fd number NRI hands the socket over as (the first of exec's ExtraFiles). The Go stub
# takes whatever number NRI_PLUGIN_SOCKET names, so another inherited fd works as well.
PLUGIN_SOCKET_FD = 3

_READ_CHUNK = 64 * 1024
# How long close() lets queued bytes drain to a peer before it drops them.
_CLOSE_FLUSH_TIMEOUT = 1.0

M = TypeVar("M", bound=Message)


class NriError(Exception):
    """Base of the errors of an NRI connection."""


class NriCallError(NriError):
    """The peer answered a call with an error status (or its answer was unusable)."""

    def __init__(self, code: int, message: str) -> None:
        try:
            name = ttrpc.Code(code).name
        except ValueError:
            name = str(code)
        super().__init__(f"{name}: {message}")
        self.code = code
        self.message = message


class NriMessageTooLarge(NriCallError):
    """A request (or its answer) exceeds ttrpc's maximum message size (RESOURCE_EXHAUSTED,
    as a Go client reports it): `length` bytes against `maximum`. NRI answers this for
    Synchronize by sending the state in smaller parts."""

    def __init__(self, message: str, length: int, maximum: int = ttrpc.MAX_MESSAGE_LENGTH) -> None:
        super().__init__(ttrpc.Code.RESOURCE_EXHAUSTED, message)
        self.length = length
        self.maximum = maximum


class NriTimeout(NriError):
    """The peer did not answer in time."""


class NriDisconnected(NriError):
    """The connection is closed (before or during the call)."""


Handler = Callable[[Message], Awaitable[Message]]


class MuxPeer:
    """Both ttrpc roles over one multiplexed socket: serves `serve_conn`, calls on
    `call_conn`. Register handlers, then `start()`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        serve_conn: int,
        call_conn: int,
        label: str = "",
    ) -> None:
        self.label = label
        self._reader = reader
        self._writer = writer
        self._serve_conn = serve_conn
        self._call_conn = call_conn
        self._mux = mux.MuxDecoder()
        self._server_frames = ttrpc.FrameDecoder()
        self._client_frames = ttrpc.FrameDecoder()
        self._ids = ttrpc.ClientStreamIds()
        self._pending: dict[int, asyncio.Future[ttrpc.Frame | ttrpc.OversizedFrame]] = {}
        self._handlers: dict[tuple[str, str], tuple[type[Message], Handler]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._read_task: asyncio.Task[None] | None = None
        self._closed_event = asyncio.Event()
        self._close_callbacks: list[Callable[[MuxPeer], None]] = []
        self._flushed: asyncio.Future[None] | None = None
        self.close_reason = ""
        self.peer_pid = _peer_pid(writer)

    # --- setup and teardown ----------------------------------------------------------

    def register(
        self,
        service: str,
        method: str,
        request_type: type[M],
        handler: Callable[[M], Awaitable[Message]],
    ) -> None:
        """Serve `service`/`method`. The handler's NriCallError becomes that status; any
        other exception is returned as UNKNOWN."""
        self._handlers[(service, method)] = (request_type, handler)  # type: ignore[assignment]

    def start(self) -> None:
        if self._read_task is None and not self.closed:
            self._read_task = asyncio.get_running_loop().create_task(self._read_loop())

    @property
    def closed(self) -> bool:
        return self._closed_event.is_set()

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def add_close_callback(self, callback: Callable[[MuxPeer], None]) -> None:
        """Run `callback(self)` once when the connection closes (at once if it has)."""
        if self.closed:
            callback(self)
        else:
            self._close_callbacks.append(callback)

    async def close(self, reason: str = "closed locally") -> None:
        """Close the connection; idempotent. Pending calls fail with NriDisconnected."""
        self._shutdown(reason)
        current = asyncio.current_task()
        others = [t for t in (self._read_task, *self._tasks) if t is not None and t is not current]
        for task in others:
            task.cancel()
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        if self._flushed is None:
            self._flushed = asyncio.ensure_future(self._writer.wait_closed())
            # Retrieve its exception, if any, so that none is reported as lost.
            self._flushed.add_done_callback(lambda f: f.cancelled() or f.exception())
        # asyncio.wait, unlike a timeout, does not cancel the shared close waiter.
        done, _ = await asyncio.wait({self._flushed}, timeout=_CLOSE_FLUSH_TIMEOUT)
        if not done:
            # The peer does not read what is still queued for it: drop it.
            self._writer.transport.abort()

    def _shutdown(self, reason: str) -> None:
        if self.closed:
            return
        self.close_reason = reason
        self._closed_event.set()
        log.info("NRI connection %s closed: %s", self.label or "?", reason)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(NriDisconnected(f"connection closed: {reason}"))
        self._pending.clear()
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.close()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self._read_task is not None and self._read_task is not asyncio.current_task():
            self._read_task.cancel()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("NRI close callback failed")

    # --- calling the peer ------------------------------------------------------------

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        timeout: float,
    ) -> M:
        """One unary call, answered within `timeout` seconds (also sent to the peer as
        the call's deadline)."""
        if self.closed:
            raise NriDisconnected(f"connection closed: {self.close_reason}")
        # Nothing below awaits before the request is written: stream ids reach the wire in
        # increasing order, which ttrpc servers require.
        sid = self._ids.next()
        data = ttrpc.encode_request(
            service, method, request.SerializeToString(), timeout_nano=int(timeout * 1e9)
        )
        try:
            message = ttrpc.encode_frame(sid, ttrpc.MessageType.REQUEST, data)
        except ttrpc.OversizedMessageError as exc:
            # What a Go ttrpc client reports for a request it cannot send.
            raise NriMessageTooLarge(f"{method}: {exc}", exc.length) from exc
        fut: asyncio.Future[ttrpc.Frame | ttrpc.OversizedFrame] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[sid] = fut
        try:
            async with asyncio.timeout(timeout):
                await self._send(self._call_conn, message)
                frame = await fut
        except TimeoutError:
            raise NriTimeout(f"{method}: no answer within {timeout:g}s") from None
        finally:
            self._pending.pop(sid, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: a disconnect may have set one nobody awaits
        if isinstance(frame, ttrpc.OversizedFrame):
            raise NriMessageTooLarge(
                f"{method}: response of {frame.length} bytes exceeds the maximum"
                f" of {ttrpc.MAX_MESSAGE_LENGTH}",
                frame.length,
            )
        try:
            rsp = ttrpc.decode_response(frame.data)
        except ttrpc.TtrpcProtocolError as exc:
            raise NriCallError(ttrpc.Code.INTERNAL, f"{method}: {exc}") from exc
        if not rsp.HasField("status"):
            raise NriCallError(ttrpc.Code.UNKNOWN, f"{method}: no status provided on response")
        if rsp.status.code != ttrpc.Code.OK:
            raise NriCallError(rsp.status.code, rsp.status.message)
        try:
            return response_type.FromString(rsp.payload)
        except DecodeError as exc:
            raise NriCallError(
                ttrpc.Code.INTERNAL, f"{method}: malformed {response_type.__name__}: {exc}"
            ) from exc

    async def _send(self, conn_id: int, message: bytes) -> None:
        if self.closed:
            raise NriDisconnected(f"connection closed: {self.close_reason}")
        # One synchronous write per message, so frames of concurrent messages never mix.
        self._writer.write(mux.frames_for_message(conn_id, message))
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._shutdown(f"write failed: {exc}")
            raise NriDisconnected(f"connection closed: {self.close_reason}") from exc

    # --- reading ---------------------------------------------------------------------

    async def _read_loop(self) -> None:
        reason = "connection closed by peer"
        try:
            while True:
                data = await self._reader.read(_READ_CHUNK)
                if not data:
                    if self._mux.buffered or self._server_frames.in_message:
                        reason = "connection closed by peer in the middle of a message"
                    break
                for frame in self._mux.feed(data):
                    if frame.conn_id == self._serve_conn:
                        for msg in self._server_frames.feed(frame.payload):
                            self._on_server_message(msg)
                    elif frame.conn_id == self._call_conn:
                        for msg in self._client_frames.feed(frame.payload):
                            self._on_client_message(msg)
                    # Frames for other connection ids are dropped, as NRI's mux does.
        except (mux.MuxProtocolError, ttrpc.TtrpcProtocolError) as exc:
            reason = f"protocol error: {exc}"
        except (ConnectionError, OSError) as exc:
            reason = f"read failed: {exc}"
        except Exception as exc:
            log.exception("NRI connection %s: reading failed", self.label or "?")
            reason = f"internal error: {exc!r}"
        except asyncio.CancelledError:
            reason = self.close_reason or "cancelled"
            self._shutdown(reason)
            raise
        self._shutdown(reason)

    def _on_client_message(self, msg: ttrpc.Frame | ttrpc.OversizedFrame) -> None:
        if msg.type != ttrpc.MessageType.RESPONSE:
            return  # unary calls only: nothing else is meaningful on our streams
        fut = self._pending.get(msg.stream_id)
        if fut is not None and not fut.done():
            fut.set_result(msg)
        # An answer for no pending call (it timed out) is dropped.

    def _on_server_message(self, msg: ttrpc.Frame | ttrpc.OversizedFrame) -> None:
        if msg.type != ttrpc.MessageType.REQUEST:
            return  # data frames belong to streaming calls, which NRI does not use
        if not ttrpc.is_client_stream(msg.stream_id):
            # Answered on that stream, as ttrpc servers do, so the caller learns which.
            self._spawn(
                self._respond_error(
                    msg.stream_id,
                    ttrpc.Code.INVALID_ARGUMENT,
                    "StreamID must be odd for client initiated streams",
                )
            )
            return
        if isinstance(msg, ttrpc.OversizedFrame):
            self._spawn(
                self._respond_error(
                    msg.stream_id,
                    ttrpc.Code.RESOURCE_EXHAUSTED,
                    f"message length {msg.length} exceeds maximum message size of"
                    f" {ttrpc.MAX_MESSAGE_LENGTH}",
                )
            )
            return
        self._spawn(self._serve(msg.stream_id, ttrpc.decode_request(msg.data)))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream_id: int, req: ttrpc_pb2.Request) -> None:
        entry = self._handlers.get((req.service, req.method))
        if entry is None:
            known = any(service == req.service for service, _ in self._handlers)
            what = f"method {req.method}" if known else f"service {req.service}"
            await self._respond_error(stream_id, ttrpc.Code.UNIMPLEMENTED, f"{what} not found")
            return
        request_type, handler = entry
        try:
            request = request_type.FromString(req.payload)
        except DecodeError as exc:
            await self._respond_error(
                stream_id, ttrpc.Code.INVALID_ARGUMENT, f"malformed {req.method} request: {exc}"
            )
            return
        try:
            if req.timeout_nano > 0:
                async with asyncio.timeout(req.timeout_nano / 1e9):
                    response = await handler(request)
            else:
                response = await handler(request)
            payload = response.SerializeToString()
        except NriCallError as exc:
            await self._respond_error(stream_id, exc.code, exc.message)
            return
        except TimeoutError:
            await self._respond_error(
                stream_id, ttrpc.Code.DEADLINE_EXCEEDED, f"{req.method}: deadline exceeded"
            )
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("NRI %s handler failed", req.method)
            await self._respond_error(stream_id, ttrpc.Code.UNKNOWN, str(exc))
            return
        await self._respond(stream_id, ttrpc.encode_response(payload))

    async def _respond_error(self, stream_id: int, code: int, message: str) -> None:
        await self._respond(stream_id, ttrpc.encode_response(code=code, message=message))

    async def _respond(self, stream_id: int, data: bytes) -> None:
        try:
            message = ttrpc.encode_frame(stream_id, ttrpc.MessageType.RESPONSE, data)
        except ttrpc.OversizedMessageError as exc:
            data = ttrpc.encode_response(code=ttrpc.Code.RESOURCE_EXHAUSTED, message=str(exc))
            message = ttrpc.encode_frame(stream_id, ttrpc.MessageType.RESPONSE, data)
        with contextlib.suppress(NriDisconnected):
            await self._send(self._serve_conn, message)


def _peer_pid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid: int = struct.unpack("3i", creds)[0]
    # A socketpair carries its creator's credentials (ours), whoever holds the other end:
    # only accepted connections tell the peer's pid.
    if pid == 0 or pid == os.getpid():
        return None
    return pid


# --- the runtime side ----------------------------------------------------------------


class RuntimeHandlers(Protocol):
    """The Runtime service, as the runtime implements it for its plugins."""

    async def register_plugin(
        self, conn: PluginConnection, req: api_pb2.RegisterPluginRequest
    ) -> None: ...

    async def update_containers(
        self, conn: PluginConnection, req: api_pb2.UpdateContainersRequest
    ) -> api_pb2.UpdateContainersResponse: ...


class PluginConnection(MuxPeer):
    """The runtime's end of one plugin connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handlers: RuntimeHandlers,
        *,
        label: str = "",
    ) -> None:
        super().__init__(
            reader,
            writer,
            serve_conn=mux.RUNTIME_SERVICE_CONN,
            call_conn=mux.PLUGIN_SERVICE_CONN,
            label=label,
        )
        self._runtime = handlers
        # Set once the plugin has shown that it lacks the per-event RPCs of NRI v0.12.
        self.legacy_events = False
        self.register(
            RUNTIME_SERVICE, "RegisterPlugin", api_pb2.RegisterPluginRequest, self._register
        )
        self.register(
            RUNTIME_SERVICE,
            "UpdateContainers",
            api_pb2.UpdateContainersRequest,
            self._update_containers,
        )

    @classmethod
    async def from_socket(
        cls, sock: socket.socket, handlers: RuntimeHandlers, *, label: str = ""
    ) -> PluginConnection:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer, handlers, label=label)

    async def _register(self, req: api_pb2.RegisterPluginRequest) -> Message:
        await self._runtime.register_plugin(self, req)
        return api_pb2.Empty()

    async def _update_containers(self, req: api_pb2.UpdateContainersRequest) -> Message:
        return await self._runtime.update_containers(self, req)

    async def call_plugin(
        self, method: str, request: Message, response_type: type[M], timeout: float
    ) -> M:
        return await self.call(PLUGIN_SERVICE, method, request, response_type, timeout)

    async def configure(
        self, req: api_pb2.ConfigureRequest, timeout: float
    ) -> api_pb2.ConfigureResponse:
        return await self.call_plugin("Configure", req, api_pb2.ConfigureResponse, timeout)

    async def synchronize(
        self, req: api_pb2.SynchronizeRequest, timeout: float
    ) -> api_pb2.SynchronizeResponse:
        return await self.call_plugin("Synchronize", req, api_pb2.SynchronizeResponse, timeout)

    async def shutdown(self, timeout: float) -> None:
        await self.call_plugin("Shutdown", api_pb2.Empty(), api_pb2.Empty, timeout)

    async def create_container(
        self, req: api_pb2.CreateContainerRequest, timeout: float
    ) -> api_pb2.CreateContainerResponse:
        return await self.call_plugin(
            "CreateContainer", req, api_pb2.CreateContainerResponse, timeout
        )

    async def update_container(
        self, req: api_pb2.UpdateContainerRequest, timeout: float
    ) -> api_pb2.UpdateContainerResponse:
        return await self.call_plugin(
            "UpdateContainer", req, api_pb2.UpdateContainerResponse, timeout
        )

    async def stop_container(
        self, req: api_pb2.StopContainerRequest, timeout: float
    ) -> api_pb2.StopContainerResponse:
        return await self.call_plugin("StopContainer", req, api_pb2.StopContainerResponse, timeout)

    async def update_pod_sandbox(
        self, req: api_pb2.UpdatePodSandboxRequest, timeout: float
    ) -> api_pb2.UpdatePodSandboxResponse:
        return await self.call_plugin(
            "UpdatePodSandbox", req, api_pb2.UpdatePodSandboxResponse, timeout
        )

    async def validate_container_adjustment(
        self, req: api_pb2.ValidateContainerAdjustmentRequest, timeout: float
    ) -> api_pb2.ValidateContainerAdjustmentResponse:
        return await self.call_plugin(
            "ValidateContainerAdjustment",
            req,
            api_pb2.ValidateContainerAdjustmentResponse,
            timeout,
        )

    async def state_change(self, event: api_pb2.StateChangeEvent, timeout: float) -> None:
        await self.call_plugin("StateChange", event, api_pb2.Empty, timeout)

    async def event(
        self,
        event: int,
        pod: api_pb2.PodSandbox,
        container: api_pb2.Container | None,
        timeout: float,
    ) -> None:
        """Deliver a notification event (`events.NOTIFICATION_EVENTS`): by its own RPC,
        or by StateChange to a plugin that does not implement that RPC (the fallback
        NRI's adaptation makes for plugins built before v0.12's per-event RPCs)."""
        if event not in events.NOTIFICATION_EVENTS:
            raise ValueError(f"{events.EVENT_METHOD.get(event, event)} is not a notification")
        if not self.legacy_events:
            method = events.EVENT_METHOD[event]
            request = _notification_request(method, pod, container)
            try:
                await self.call_plugin(method, request, api_pb2.Empty, timeout)
                return
            except NriCallError as exc:
                if exc.code != ttrpc.Code.UNIMPLEMENTED:
                    raise
                self.legacy_events = True
        change = api_pb2.StateChangeEvent(event=event, pod=pod)  # type: ignore[arg-type]
        if container is not None:
            change.container.CopyFrom(container)
        await self.state_change(change, timeout)


def _notification_request(
    method: str, pod: api_pb2.PodSandbox, container: api_pb2.Container | None
) -> Message:
    request_type: type[Message] = getattr(api_pb2, method + "Request")
    request = request_type()
    request.pod.CopyFrom(pod)  # type: ignore[attr-defined]
    if container is not None and "container" in request_type.DESCRIPTOR.fields_by_name:
        request.container.CopyFrom(container)  # type: ignore[attr-defined]
    return request


# The notification responses are all empty messages: parsing them as Empty is exact.


def plugin_socketpair() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs) for a pre-installed plugin: the child inherits `theirs` (e.g. with
    subprocess's pass_fds) and finds its number in PLUGIN_SOCKET_ENV (see
    `plugin_environment`); the parent closes `theirs` once the child runs."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.set_inheritable(True)
    return ours, theirs


def plugin_environment(name: str, idx: str, fd: int = PLUGIN_SOCKET_FD) -> dict[str, str]:
    """The environment NRI gives a plugin it launches (pkg/adaptation): its name, its
    index and the number of its inherited socket."""
    return {PLUGIN_NAME_ENV: name, PLUGIN_IDX_ENV: idx, PLUGIN_SOCKET_ENV: str(fd)}


def _prepare_socket_path(path: str) -> None:
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"NRI socket path {path} exists and is not a socket")
    os.unlink(path)


async def start_listener(
    path: str,
    handlers: RuntimeHandlers,
    on_connect: Callable[[PluginConnection], Awaitable[None]],
) -> asyncio.Server:
    """Listen for external plugins on the unix socket `path` (mode 0600). Each accepted
    connection is started and handed to `on_connect` in its own task."""
    await asyncio.to_thread(_prepare_socket_path, path)

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = PluginConnection(reader, writer, handlers, label="external")
        conn.start()
        try:
            await on_connect(conn)
        except Exception:
            log.exception("NRI: setting up an external plugin connection failed")
            await conn.close("setup failed")

    server = await asyncio.start_unix_server(accepted, path=path)
    await asyncio.to_thread(os.chmod, path, 0o600)
    return server
