"""The streaming server: where Exec, Attach and PortForward URLs lead.

A minimal HTTP/1.1 front end, as the kubelet's streaming server has: GET or POST to
`/exec/TOKEN`, `/attach/TOKEN` or `/portforward/TOKEN`. The token is single-use and
expires (`tokens.py`); an unknown one is a 404. The request head is read with size,
count and time limits and parsed by h11; then the `Upgrade` header picks the transport
(SPDY/3.1 or WebSocket), which writes its own 101 and runs the session on the raw
stream. Each connection is a task of its own: its failures stay with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import replace
from http import HTTPStatus
from typing import cast

import h11

from cripy.config import StreamingConfig
from cripy.streaming.session import AttachTarget, ExecTarget, PortForwardTarget, StreamBackend
from cripy.streaming.tokens import TokenCache

log = logging.getLogger(__name__)

Target = ExecTarget | AttachTarget | PortForwardTarget
Handler = Callable[
    [list[tuple[str, str]], asyncio.StreamReader, asyncio.StreamWriter, Target, StreamBackend],
    Awaitable[None],
]

MAX_HEAD_BYTES = 16 * 1024  # request line and headers together
MAX_HEADERS = 100
HEAD_TIMEOUT = 10.0  # seconds for the whole request head (and the TLS handshake)
WRITE_TIMEOUT = 10.0  # for an error response to leave
STOP_TIMEOUT = 5.0  # for live sessions to wind down on stop()

_KINDS: dict[str, type[Target]] = {
    "exec": ExecTarget,
    "attach": AttachTarget,
    "portforward": PortForwardTarget,
}


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or []


def _spdy_handler() -> Handler:
    module = importlib.import_module("cripy.streaming.spdy_handler")
    return cast(Handler, module.serve_spdy)


def _websocket_handler() -> Handler:
    module = importlib.import_module("cripy.streaming.ws_handler")
    return cast(Handler, module.serve_websocket)


class StreamingServer:
    head_timeout = HEAD_TIMEOUT

    def __init__(
        self,
        config: StreamingConfig,
        backend: StreamBackend,
        *,
        tokens: TokenCache[Target] | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.tokens: TokenCache[Target] = (
            tokens if tokens is not None else TokenCache(config.token_ttl))
        self._server: asyncio.Server | None = None
        self._port = config.port
        self._tls = bool(config.tls_cert_file)
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port listened on (the real one once started, when configured as 0)."""
        return self._port

    async def start(self) -> None:
        if self._server is not None:
            return
        context = None
        if self._tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.config.tls_cert_file, self.config.tls_key_file)
        self._server = await asyncio.start_server(
            self._on_connection,
            host=self.config.address or None,
            port=self.config.port,
            ssl=context,
            ssl_handshake_timeout=self.head_timeout if context else None,
            reuse_address=True,
        )
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("streaming server listening on %s", self._base_url())

    async def stop(self) -> None:
        """Stop listening and end every live session."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            if pending:
                log.warning("%d streaming sessions did not end in time", len(pending))
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), STOP_TIMEOUT)

    def url_for(self, target: Target) -> str:
        """A single-use URL for `target`."""
        if self._port == 0:
            raise RuntimeError("the streaming server has not started yet")
        kind = next(k for k, cls in _KINDS.items() if isinstance(target, cls))
        token = self.tokens.issue(target)
        return f"{self._base_url()}/{kind}/{token}"

    def _base_url(self) -> str:
        host = self.config.address or "0.0.0.0"
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        return f"{'https' if self._tls else 'http'}://{host}:{self._port}"

    # -- connections ---------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # stop() ended this session; the task is ours and ends here, quietly (asyncio
            # would log a cancelled connection task as an error).
            pass
        except Exception:
            log.exception("streaming connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(self.head_timeout):
                    head = await _read_head(reader)
            except TimeoutError:
                raise HttpError(HTTPStatus.REQUEST_TIMEOUT, "request head timed out") from None
            if head is None:
                return  # the client left without a request
            handler, headers, target = self._route(head)
        except HttpError as exc:
            await _respond_error(writer, exc)
            return
        except OSError:
            return
        await handler(headers, reader, writer, target, self.backend)

    def _route(self, head: bytes) -> tuple[Handler, list[tuple[str, str]], Target]:
        request = _parse_head(head)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
        url = urllib.parse.urlsplit(request.target.decode("latin-1"))
        parts = url.path.split("/")
        if len(parts) != 3 or parts[0] or parts[1] not in _KINDS or not parts[2]:
            raise HttpError(HTTPStatus.NOT_FOUND, "not found")
        kind, token = parts[1], parts[2]
        if request.method not in (b"GET", b"POST"):
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed",
                            [("Allow", "GET, POST")])
        target = self.tokens.take(token)
        if target is None or not isinstance(target, _KINDS[kind]):
            raise HttpError(HTTPStatus.NOT_FOUND, f"{kind} token not found or expired")
        upgrade = {
            p.strip().lower() for n, v in headers if n == "upgrade" for p in v.split(",")
        }
        if "spdy/3.1" in upgrade:
            return _load(_spdy_handler, "SPDY/3.1"), headers, target
        if "websocket" in upgrade:
            if isinstance(target, PortForwardTarget):
                target = _with_query_ports(target, url.query)
            return _load(_websocket_handler, "WebSocket"), headers, target
        raise HttpError(HTTPStatus.BAD_REQUEST,
                        "expected an upgrade to SPDY/3.1 or websocket")


def _load(loader: Callable[[], Handler], name: str) -> Handler:
    try:
        return loader()
    except ImportError as exc:
        log.error("the %s transport is not available: %s", name, exc)
        raise HttpError(HTTPStatus.NOT_IMPLEMENTED, f"{name} streaming is not available") \
            from None


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The request head through its blank line; None on EOF before any byte."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise HttpError(HTTPStatus.BAD_REQUEST, "incomplete request head") from None
    except asyncio.LimitOverrunError:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request head too large") from None
    if len(head) > MAX_HEAD_BYTES:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
    return head


def _parse_head(head: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise HttpError(exc.error_status_hint, f"bad request: {exc}") from None
    if not isinstance(event, h11.Request):
        raise HttpError(HTTPStatus.BAD_REQUEST, "bad request")
    if event.http_version not in (b"1.0", b"1.1"):
        raise HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.1 only")
    if len(event.headers) > MAX_HEADERS:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
    for name, value in event.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            raise HttpError(HTTPStatus.BAD_REQUEST, "a streaming request has no body")
    return event


def _with_query_ports(target: PortForwardTarget, query: str) -> PortForwardTarget:
    """WebSocket port forwarding names its ports as `?port=N` (repeatable)."""
    values = urllib.parse.parse_qs(query, keep_blank_values=True).get("port", [])
    if not values:
        return target
    ports = []
    for value in values:
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"invalid port {value[:20]!r}")
        port = int(value)
        if target.ports and port not in target.ports:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"port {port} was not requested")
        ports.append(port)
    return replace(target, ports=ports)


async def _respond_error(writer: asyncio.StreamWriter, error: HttpError) -> None:
    status = HTTPStatus(error.status)
    body = f"{error}\n".encode()
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in error.headers),
    ]
    with contextlib.suppress(OSError, TimeoutError):
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
