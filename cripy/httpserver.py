"""HTTP/1.1 for the daemon's small endpoints (the status API, the metrics endpoint):
h11 with bounded headers and bodies, timeouts, a cap on clients, one task per client."""

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
from typing import Any

import h11

from cripy import __version__
from cripy.errors import FailedPreconditionError

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
