"""The WebSocket exec/attach/port-forward handler over real loopback TCP, driven by the
`websockets` library as an independent client against a fake StreamBackend."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus
from websockets.typing import Subprotocol

from cripy.streaming.session import (
    AttachTarget,
    ExecTarget,
    Outcome,
    PortForwardTarget,
    StreamSession,
    TerminalSize,
)
from cripy.streaming.websocket import (
    CloseReceived,
    Opcode,
    Role,
    WebSocketConnection,
    client_handshake_request,
    encode_frame,
    make_client_key,
)
from cripy.streaming.ws_handler import serve_websocket

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V4_B64 = "v4.base64.channel.k8s.io"
V1 = "channel.k8s.io"
V1_B64 = "base64.channel.k8s.io"
Message = bytes | str


class FakeBackend:
    """Commands: `cat N` echoes stdin to stdout until EOF, says so on stderr, exits N;
    `resize N` reports N terminal sizes on stdout; `big N` writes N bytes; `fail`
    raises; `sleep` waits to be cancelled. Ports map to local servers."""

    def __init__(self, ports: dict[int, int]) -> None:
        self.ports = ports
        self.resizes: list[TerminalSize] = []
        self.saw_eof = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.sessions: list[StreamSession] = []

    async def exec(self, target: ExecTarget, session: StreamSession) -> Outcome:
        self.sessions.append(session)
        name, *args = target.cmd
        if name == "cat":
            assert session.stdin is not None and session.stdout is not None
            while (data := await session.stdin.get()) is not None:
                await session.stdout.write(data)
            self.saw_eof.set()
            if session.stderr is not None:
                await session.stderr.write(b"saw EOF\n")
            await session.stdout.close()
            return Outcome(exit_code=int(args[0]))
        if name == "resize":
            assert session.resize is not None and session.stdout is not None
            for _ in range(int(args[0])):
                size = await session.resize.get()
                self.resizes.append(size)
                await session.stdout.write(f"{size.width}x{size.height}\n".encode())
            return Outcome()
        if name == "big":
            assert session.stdout is not None
            await session.stdout.write(bytes(i % 251 for i in range(int(args[0]))))
            return Outcome()
        if name == "fail":
            raise RuntimeError("no such container")
        return await self._sleep()

    async def attach(self, target: AttachTarget, session: StreamSession) -> Outcome:
        self.sessions.append(session)
        return await self._sleep()

    async def _sleep(self) -> Outcome:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Outcome()

    async def open_port(
        self, target: PortForwardTarget, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if port not in self.ports:
            raise ConnectionRefusedError(f"connect to localhost:{port}: refused")
        return await asyncio.open_connection("127.0.0.1", self.ports[port])


def make_target(path: str) -> ExecTarget | AttachTarget | PortForwardTarget:
    url = urlsplit(path)
    query = parse_qs(url.query)

    def flag(name: str) -> bool:
        return query.get(name, ["0"])[0] in ("1", "true")

    if url.path == "/portforward":
        return PortForwardTarget("pod1", [int(p) for p in query.get("port", [])])
    streams = dict(stdin=flag("input"), stdout=flag("output"), stderr=flag("error"))
    if url.path == "/attach":
        return AttachTarget("c1", tty=flag("tty"), **streams)
    return ExecTarget("c1", query.get("command", []), tty=flag("tty"), **streams)


async def handle_http(
    backend: FakeBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """What the streaming server does: read the request head, hand over the socket."""
    _method, path, _version = (await reader.readline()).decode().split(" ")
    headers: list[tuple[str, str]] = []
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers.append((name.strip().lower(), value.strip()))
    await serve_websocket(headers, reader, writer, make_target(path), backend)


async def serve_tcp(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def upper_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(4096):
        writer.write(data.upper())
        await writer.drain()
    writer.close()


async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"greeting")
    await writer.drain()
    writer.close()


class World:
    def __init__(self, url: str, backend: FakeBackend) -> None:
        self.url = url
        self.backend = backend
        self.port = int(url.rsplit(":", 1)[1])

    def connect(self, path: str, *protocols: str) -> connect:
        return connect(
            self.url + path,
            subprotocols=[Subprotocol(p) for p in protocols] or None,
            compression=None,
            proxy=None,
            open_timeout=5,
        )


@contextlib.asynccontextmanager
async def world() -> AsyncIterator[World]:
    echo, echo_port = await serve_tcp(upper_echo)
    greet, greet_port = await serve_tcp(greeter)
    backend = FakeBackend({8080: echo_port, 9090: greet_port})
    server, port = await serve_tcp(lambda r, w: handle_http(backend, r, w))
    try:
        yield World(f"ws://127.0.0.1:{port}", backend)
    finally:
        for s in (server, echo, greet):
            s.close()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        async with asyncio.timeout(20):
            await coro()

    asyncio.run(main())


async def rest(ws: ClientConnection) -> list[Message]:
    """Every message until the server closes; the close must be a normal one."""
    out: list[Message] = []
    with contextlib.suppress(ConnectionClosedOK):
        while True:
            out.append(await ws.recv())
    assert ws.close_code == 1000
    return out


def status_of(message: Message) -> dict[str, Any]:
    assert isinstance(message, bytes) and message[:1] == b"\x03"
    status: dict[str, Any] = json.loads(message[1:])
    return status


def b64(channel: int, data: bytes) -> str:
    return str(channel) + base64.b64encode(data).decode()


# --- exec and attach ------------------------------------------------------------------


def test_v5_exec_stdin_close_and_exit_code() -> None:
    async def go() -> None:
        async with world() as w, w.connect(
            "/exec?command=cat&command=3&input=1&output=1&error=1", V4, V5
        ) as ws:
            assert ws.subprotocol == V5  # preferred even though offered second
            assert await ws.recv() == b"\x01"  # connection established
            await ws.send(b"\x00hello ")
            assert await ws.recv() == b"\x01hello "
            await ws.send([b"\x00wor", b"ld"])  # a fragmented message
            assert await ws.recv() == b"\x01world"
            await ws.send(b"\xff\x00")  # v5: close stdin
            messages = await rest(ws)
            assert w.backend.saw_eof.is_set()
            assert messages[0] == b"\x02saw EOF\n"
            status = status_of(messages[1])
            assert status["status"] == "Failure"
            assert status["reason"] == "NonZeroExitCode"
            assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
            assert len(messages) == 2

    run(go)


def test_v4_success_status_and_chunked_output() -> None:
    async def go() -> None:
        async with world() as w, w.connect("/exec?command=big&command=100000&output=1", V4) as ws:
            assert ws.subprotocol == V4
            messages = await rest(ws)
            assert messages[0] == b"\x01"
            out = messages[1:-1]
            assert all(isinstance(m, bytes) and m[0] == 1 and len(m) <= 32769 for m in out)
            data = b"".join(m[1:] for m in out if isinstance(m, bytes))
            assert data == bytes(i % 251 for i in range(100000))
            assert status_of(messages[-1]) == {"metadata": {}, "status": "Success"}

    run(go)


def test_v4_has_no_stdin_close_signal_connection_close_is_eof() -> None:
    async def go() -> None:
        async with world() as w:
            async with w.connect("/exec?command=cat&command=0&input=1&output=1", V4) as ws:
                assert await ws.recv() == b"\x01"
                await ws.send(b"\xff\x00")  # not a signal before v5: ignored
                await ws.send(b"\x00still open")
                assert await ws.recv() == b"\x01still open"
                assert not w.backend.saw_eof.is_set()
            await asyncio.wait_for(w.backend.saw_eof.wait(), 5)

    run(go)


def test_v4_base64() -> None:
    async def go() -> None:
        async with world() as w:
            async with w.connect("/exec?command=cat&command=0&input=1&output=1", V4_B64) as ws:
                assert ws.subprotocol == V4_B64
                assert await ws.recv() == "1"
                await ws.send(b64(0, b"\x00\xffbinary"))
                assert await ws.recv() == b64(1, b"\x00\xffbinary")
                await ws.send("0!!not base64")  # dropped, as the kubelet does
                await ws.send(b64(0, b"more"))
                assert await ws.recv() == b64(1, b"more")
            async with w.connect("/exec?command=fail&output=1", V4_B64) as ws:
                messages = await rest(ws)
                assert messages[0] == "1"
                assert isinstance(messages[1], str) and messages[1][0] == "3"
                status = json.loads(base64.b64decode(messages[1][1:]))
                assert status["status"] == "Failure"
                assert status["reason"] == "InternalError"
                assert "no such container" in status["message"]

    run(go)


@pytest.mark.parametrize("protocol", [V1, V1_B64, None])
def test_pre_v4_protocols_send_only_a_failure_message(protocol: str | None) -> None:
    def decode(message: Message) -> tuple[int, bytes]:
        if isinstance(message, str):
            return int(message[0]), base64.b64decode(message[1:])
        return message[0], message[1:]

    async def go() -> None:
        protocols = [protocol] if protocol else []
        async with world() as w:
            async with w.connect("/exec?command=fail&output=1", *protocols) as ws:
                assert ws.subprotocol == protocol
                messages = [decode(m) for m in await rest(ws)]
                assert messages == [(1, b""), (3, b"no such container")]
            async with w.connect("/exec?command=big&command=5&output=1", *protocols) as ws:
                messages = [decode(m) for m in await rest(ws)]
                assert messages == [(1, b""), (1, bytes(range(5)))]  # no status on success

    run(go)


def test_tty_resize() -> None:
    async def go() -> None:
        async with world() as w, w.connect(
            "/exec?command=resize&command=3&tty=1&output=1&error=1&input=1", V5
        ) as ws:
            assert await ws.recv() == b"\x01"
            await ws.send(b'\x04{"Width":80,"Height":24}')
            assert await ws.recv() == b"\x0180x24\n"
            await ws.send(b'\x04{"width": 1')  # split across messages
            await ws.send(b'\x0400, "height": 50}\n')
            assert await ws.recv() == b"\x01100x50\n"
            await ws.send(b'\x04{"Width": -1, "Height": 5}')  # not a uint16: ignored
            await ws.send(b'\x04{"Width": 3, "Height": 4}{"Width": 5, "Height": 6}')
            assert await ws.recv() == b"\x013x4\n"
            messages = await rest(ws)
            assert status_of(messages[-1])["status"] == "Success"
            assert w.backend.resizes == [
                TerminalSize(80, 24), TerminalSize(100, 50), TerminalSize(3, 4)
            ]
            session = w.backend.sessions[0]
            assert session.tty and session.stderr is None  # a terminal merges stderr

    run(go)


def test_client_leaving_detaches_an_attach() -> None:
    async def go() -> None:
        async with world() as w:
            async with w.connect("/attach?output=1&input=1", V5) as ws:
                assert await ws.recv() == b"\x01"
            await asyncio.wait_for(w.backend.cancelled.wait(), 5)

    run(go)


def test_ping_is_answered() -> None:
    async def go() -> None:
        async with world() as w, w.connect("/attach?output=1", V5) as ws:
            pong = await ws.ping(b"are you there")
            await asyncio.wait_for(pong, 5)

    run(go)


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "protocols", "needle"),
    [
        ("/exec?command=cat&output=1", ["chat"], "not supported"),
        ("/exec?command=cat", [V5], "at least 1 of stdin, stdout, stderr"),
        ("/portforward", [V4], 'query parameter "port" is required'),
        ("/portforward?port=80", ["portforward.k8s.io"], "not supported"),
    ],
)
def test_refused_with_400(path: str, protocols: list[str], needle: str) -> None:
    async def go() -> None:
        async with world() as w:
            with pytest.raises(InvalidStatus) as info:
                async with w.connect(path, *protocols):
                    pass
            response = info.value.response
            assert response.status_code == 400
            assert needle in response.body.decode()

    run(go)


async def raw_exchange(port: int, request: bytes, frames: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    writer.write(frames)
    await writer.drain()
    rest_ = await reader.read()  # until the server closes
    writer.close()
    return head + rest_


def test_bad_handshake_is_400() -> None:
    async def go() -> None:
        async with world() as w:
            request = b"GET /exec?output=1 HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"
            response = await raw_exchange(w.port, request)
            assert response.startswith(b"HTTP/1.1 400 ")
            assert b"Connection: Upgrade" in response

    run(go)


# --- malformed frames -----------------------------------------------------------------

MASK = b"\x01\x02\x03\x04"


def masked(opcode: int, payload: bytes, **kw: Any) -> bytes:
    return encode_frame(opcode, payload, mask=MASK, **kw)


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (encode_frame(Opcode.BINARY, b"\x00unmasked"), 1002),
        (masked(Opcode.BINARY, b"\x00x", rsv=4), 1002),
        (masked(0x3, b""), 1002),
        (masked(Opcode.PING, b"x" * 126), 1002),
        (masked(Opcode.PING, b"x", fin=False), 1002),
        (masked(Opcode.CONTINUATION, b"x"), 1002),
        (masked(Opcode.TEXT, b"\x30\xc3\x28"), 1007),
        (masked(Opcode.CLOSE, (1005).to_bytes(2, "big")), 1002),
        (bytes([0x82, 0xFF]) + (1 << 40).to_bytes(8, "big") + MASK, 1009),
        (masked(Opcode.BINARY, b"\xff"), 1002),  # v5 stream close naming no stream
        (masked(Opcode.BINARY, b"\xff\x09"), 1002),  # ... or an unknown one
    ],
)
def test_malformed_frames_close_the_connection_server_stays_healthy(
    frames: bytes, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        async with world() as w:
            key = make_client_key()
            request = client_handshake_request(
                "x", "/exec?command=cat&command=0&input=1&output=1", key, [V5]
            )
            # a good message first, then the bad frame(s)
            response = await raw_exchange(
                w.port, request, masked(Opcode.BINARY, b"\x00ok") + frames
            )
            head, _, body = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            client = WebSocketConnection(Role.CLIENT)
            events = client.receive_data(body)
            closes = [e for e in events if isinstance(e, CloseReceived)]
            assert closes and closes[0].code == code
            # the server still serves
            async with w.connect("/exec?command=cat&command=7&input=1&output=1", V5) as ws:
                assert await ws.recv() == b"\x01"
                await ws.send(b"\xff\x00")
                messages = await rest(ws)
                assert status_of(messages[-1])["details"]["causes"][0]["message"] == "7"

    with caplog.at_level(logging.INFO, logger="cripy.streaming.ws_handler"):
        run(go)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- port forward ---------------------------------------------------------------------


def port_prefix(channel: int, port: int) -> bytes:
    return bytes([channel]) + port.to_bytes(2, "little")


def test_port_forward_echo_and_error_channel() -> None:
    async def go() -> None:
        async with world() as w, w.connect("/portforward?port=8080&port=7070", V4) as ws:
            assert ws.subprotocol == V4
            first = [await ws.recv() for _ in range(4)]
            assert first == [
                port_prefix(0, 8080), port_prefix(1, 8080),
                port_prefix(2, 7070), port_prefix(3, 7070),
            ]
            await ws.send(b"\x00hello")
            got: dict[int, bytes] = {}
            while got.get(0) != b"HELLO" or 3 not in got:
                message = await ws.recv()
                assert isinstance(message, bytes)
                got[message[0]] = got.get(message[0], b"") + message[1:]
            assert b"error forwarding port 7070 to pod pod1" in got[3]
            await ws.send(b"\x00again")
            assert await ws.recv() == b"\x00AGAIN"

    run(go)


def test_port_forward_ends_when_the_pod_side_closes() -> None:
    async def go() -> None:
        async with world() as w, w.connect("/portforward?port=9090") as ws:
            assert ws.subprotocol is None  # no protocol: the binary one
            messages = await rest(ws)
            assert messages[:2] == [port_prefix(0, 9090), port_prefix(1, 9090)]
            assert b"".join(m[1:] for m in messages[2:] if isinstance(m, bytes)) == b"greeting"

    run(go)


def test_port_forward_base64() -> None:
    async def go() -> None:
        async with world() as w, w.connect("/portforward?port=8080", V4_B64) as ws:
            assert ws.subprotocol == V4_B64
            port = (8080).to_bytes(2, "little")
            assert [await ws.recv(), await ws.recv()] == [b64(0, port), b64(1, port)]
            await ws.send(b64(0, b"abc"))
            assert await ws.recv() == b64(0, b"ABC")

    run(go)


def test_port_forward_client_close_ends_the_session() -> None:
    async def go() -> None:
        async with world() as w:
            async with w.connect("/portforward?port=8080", V4) as ws:
                await ws.recv()
                await ws.recv()
                await ws.send(b"\x00x")
                assert await ws.recv() == b"\x00X"
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            # and a second session works
            async with w.connect("/portforward?port=8080", V4) as ws:
                await ws.recv()
                await ws.recv()
                await ws.send(b"\x00y")
                assert await ws.recv() == b"\x00Y"

    run(go)
