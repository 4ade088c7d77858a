"""The streaming server's HTTP front end, with stub transports and a fake backend."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from cripy.config import StreamingConfig
from cripy.streaming import server as server_mod
from cripy.streaming.server import StreamingServer, Target
from cripy.streaming.session import (
    AttachTarget,
    ExecTarget,
    Outcome,
    PortForwardTarget,
    StreamBackend,
    StreamSession,
)
from cripy.streaming.tokens import TokenCache

EXEC = ExecTarget("c1", ["sh"], tty=True, stdin=True, stdout=True, stderr=False)
ATTACH = AttachTarget("c1", tty=False, stdin=False, stdout=True, stderr=True)
UPGRADE_SPDY = "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
UPGRADE_WS = "Connection: Upgrade\r\nUpgrade: websocket\r\n"


@dataclass
class Call:
    transport: str
    headers: list[tuple[str, str]]
    target: Target


@dataclass
class Stubs:
    """Stand-in transports: answer 101, then echo one line back."""

    calls: list[Call] = field(default_factory=list)
    hold: asyncio.Event | None = None  # when set: wait on it before echoing
    fail: bool = False

    def handler(self, transport: str) -> server_mod.Handler:
        async def serve(headers: list[tuple[str, str]], reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, target: Target,
                        backend: StreamBackend) -> None:
            self.calls.append(Call(transport, headers, target))
            if self.fail:
                raise RuntimeError("handler blew up")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            await writer.drain()
            if self.hold is not None:
                await self.hold.wait()
            line = await reader.readline()
            writer.write(f"{transport} echo ".encode() + line)
            await writer.drain()

        return serve


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    server: StreamingServer
    stubs: Stubs
    clock: Clock
    ssl: ssl.SSLContext | None = None

    @property
    def port(self) -> int:
        return self.server.port

    async def send(self, raw: bytes, timeout: float = 5.0) -> bytes:
        """Send `raw` on a new connection and read until the server closes it."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.ssl,
            server_hostname="127.0.0.1" if self.ssl else None)
        try:
            writer.write(raw)
            if writer.can_write_eof():
                writer.write_eof()  # the stub's readline gets EOF, unless raw has a line
            await writer.drain()
            async with asyncio.timeout(timeout):
                return await reader.read()
        finally:
            writer.close()

    async def get(self, path: str, headers: str = UPGRADE_SPDY, method: str = "GET",
                  body: bytes = b"") -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
        return await self.send(head + body)


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


@contextlib.asynccontextmanager
async def serving(monkeypatch: pytest.MonkeyPatch, config: StreamingConfig | None = None,
                  ssl_client: ssl.SSLContext | None = None) -> AsyncIterator[Harness]:
    stubs = Stubs()
    monkeypatch.setattr(server_mod, "_spdy_handler", lambda: stubs.handler("spdy"))
    monkeypatch.setattr(server_mod, "_websocket_handler", lambda: stubs.handler("ws"))
    clock = Clock()
    config = config or StreamingConfig(address="127.0.0.1", port=0, token_ttl=30)
    server = StreamingServer(config, cast(StreamBackend, object()),
                             tokens=TokenCache(config.token_ttl, clock=clock))
    await server.start()
    try:
        yield Harness(server, stubs, clock, ssl_client)
    finally:
        await server.stop()


def served(test: Callable[[Harness], Awaitable[None]]) -> Callable[[pytest.MonkeyPatch], None]:
    """A test body run against a fresh server (no asyncio plugin for pytest here)."""

    def wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
        async def body() -> None:
            async with serving(monkeypatch) as h:
                await test(h)

        asyncio.run(body())

    wrapper.__name__ = test.__name__
    return wrapper


# -- URLs and tokens ---------------------------------------------------------------------


def test_urls() -> None:
    config = StreamingConfig(address="127.0.0.1", port=0)
    server = StreamingServer(config, cast(StreamBackend, object()))
    with pytest.raises(RuntimeError):
        server.url_for(EXEC)  # the port is not known before start
    fixed = StreamingServer(StreamingConfig(address="::1", port=1234),
                            cast(StreamBackend, object()))
    url = fixed.url_for(ATTACH)
    assert url.startswith("http://[::1]:1234/attach/")
    assert fixed.url_for(PortForwardTarget("p")).startswith("http://[::1]:1234/portforward/")
    token = url.rsplit("/", 1)[1]
    assert len(token) >= 22 and fixed.tokens.take(token) == ATTACH


@served
async def test_exec_over_spdy_with_bytes_right_behind_the_head(h: Harness) -> None:
    url = h.server.url_for(EXEC)
    assert url.startswith(f"http://127.0.0.1:{h.port}/exec/")
    head = (f"POST {path_of(url)} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Stream-Protocol-Version: "
            f"v4.channel.k8s.io\r\n{UPGRADE_SPDY}\r\n")
    response = await h.send(head.encode() + b"first frame\n")
    assert response == b"HTTP/1.1 101 Switching Protocols\r\n\r\nspdy echo first frame\n"
    (call,) = h.stubs.calls
    assert call.target == EXEC
    assert ("x-stream-protocol-version", "v4.channel.k8s.io") in call.headers
    assert ("upgrade", "SPDY/3.1") in call.headers


@served
async def test_attach_over_websocket(h: Harness) -> None:
    url = h.server.url_for(ATTACH)
    head = f"GET {path_of(url)} HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\n\r\nhi\n"
    response = await h.send(head.encode())
    assert response.endswith(b"ws echo hi\n")
    assert h.stubs.calls[0].target == ATTACH


@served
async def test_tokens_are_single_use_and_expire(h: Harness) -> None:
    url = h.server.url_for(EXEC)
    assert status(await h.get(path_of(url))) == 101
    second = await h.get(path_of(url))
    assert status(second) == 404 and b"not found" in second
    url = h.server.url_for(EXEC)
    h.clock.now += 30
    assert status(await h.get(path_of(url))) == 404
    url = h.server.url_for(EXEC)
    h.clock.now += 29.9
    assert status(await h.get(path_of(url))) == 101
    assert len(h.stubs.calls) == 2


@served
async def test_routing_errors(h: Harness) -> None:
    exec_path = path_of(h.server.url_for(EXEC))
    token = exec_path.rsplit("/", 1)[1]
    for path in ("/", "/exec", "/exec/", "/nope/abc", f"/exec/{token}/x", "/exec/unknown",
                 f"//exec/{token}", f"/EXEC/{token}"):
        assert status(await h.get(path)) == 404, path
    # The token of an exec is no attach (and is spent by trying).
    assert status(await h.get(f"/attach/{token}")) == 404
    exec_path = path_of(h.server.url_for(EXEC))
    for method in ("PUT", "DELETE", "HEAD", "OPTIONS"):
        response = await h.get(exec_path, method=method)
        assert status(response) == 405 and b"Allow: GET, POST" in response
    # A refused method did not spend the token; no Upgrade does.
    response = await h.get(exec_path, headers="")
    assert status(response) == 400 and b"upgrade" in response
    assert status(await h.get(exec_path)) == 404
    exec_path = path_of(h.server.url_for(EXEC))
    response = await h.get(exec_path, headers="Upgrade: h2c\r\n")
    assert status(response) == 400
    assert h.stubs.calls == []


@served
async def test_bad_requests(h: Harness) -> None:
    path = path_of(h.server.url_for(EXEC))
    bad = [
        b"garbage\r\n\r\n",
        f"GET {path} HTTP/1.1\r\n{UPGRADE_SPDY}\r\n".encode(),  # no Host
        f"GET {path} HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".encode(),
        f"GET {path} HTTP/9.9\r\nHost: x\r\n\r\n".encode(),
        f"GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n{UPGRADE_SPDY}\r\nx".encode(),
        f"GET {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode(),
    ]
    for raw in bad:
        response = await h.send(raw)
        assert status(response) in (400, 505), raw
        assert b"Connection: close" in response
    assert status(await h.send(b"GET / HT")) == 400  # the client stopped half-way
    assert await h.send(b"") == b""  # ... or before saying anything: no answer
    assert h.stubs.calls == []
    # The token was never reached, so it still works.
    assert status(await h.get(path)) == 101


@served
async def test_oversized_heads(h: Harness) -> None:
    path = path_of(h.server.url_for(EXEC))
    big = f"X-Big: {'a' * 20_000}\r\n"
    assert status(await h.get(path, headers=big + UPGRADE_SPDY)) == 431
    many = "".join(f"X-H{i}: v\r\n" for i in range(150))
    assert status(await h.get(path, headers=many + UPGRADE_SPDY)) == 431
    # No end of head at all: answered (or cut off) once the buffer limit is hit.
    try:
        response = await h.send(b"GET / HTTP/1.1\r\nX: " + b"a" * 200_000)
    except ConnectionResetError:
        response = b""
    assert response == b"" or status(response) == 431
    assert status(await h.get(path)) == 101


@served
async def test_a_slow_client_times_out_without_holding_up_others(h: Harness) -> None:
    h.server.head_timeout = 0.5
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    began = loop.time()
    writer.write(b"GET /exec/x HTTP/1.1\r\nHost: x\r\n")  # ... and then nothing
    # Meanwhile another client is served at once.
    assert status(await h.get(path_of(h.server.url_for(EXEC)))) == 101
    async with asyncio.timeout(5):
        response = await reader.read()
    assert status(response) == 408
    assert 0.4 < loop.time() - began < 3
    writer.close()
    # Trickling bytes does not extend the deadline.
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    began = loop.time()

    async def trickle() -> None:
        for _ in range(40):
            writer.write(b"X-A: b\r\n")
            await asyncio.sleep(0.05)

    task = asyncio.create_task(trickle())
    async with asyncio.timeout(5):
        response = await reader.read()
    assert status(response) == 408 and loop.time() - began < 1.5
    task.cancel()
    writer.close()


@served
async def test_port_forward_ports_from_the_query(h: Harness) -> None:
    url = h.server.url_for(PortForwardTarget("pod"))
    assert status(await h.get(path_of(url) + "?port=8080&port=53", headers=UPGRADE_WS)) == 101
    assert h.stubs.calls[-1].target == PortForwardTarget("pod", [8080, 53])
    # Fixed by the PortForward request: the query may only choose among them.
    url = h.server.url_for(PortForwardTarget("pod", [80, 443]))
    assert status(await h.get(path_of(url) + "?port=443", headers=UPGRADE_WS)) == 101
    assert h.stubs.calls[-1].target == PortForwardTarget("pod", [443])
    url = h.server.url_for(PortForwardTarget("pod", [80, 443]))
    assert status(await h.get(path_of(url), headers=UPGRADE_WS)) == 101
    assert h.stubs.calls[-1].target == PortForwardTarget("pod", [80, 443])
    for query in ("?port=22", "?port=0", "?port=65536", "?port=x", "?port=", "?port=-1"):
        url = h.server.url_for(PortForwardTarget("pod", [80, 443]))
        assert status(await h.get(path_of(url) + query, headers=UPGRADE_WS)) == 400, query
    # SPDY names its ports in stream headers: the query is not looked at.
    url = h.server.url_for(PortForwardTarget("pod"))
    assert status(await h.get(path_of(url) + "?port=1", headers=UPGRADE_SPDY)) == 101
    assert h.stubs.calls[-1].target == PortForwardTarget("pod")


@served
async def test_concurrent_connections(h: Harness) -> None:
    targets = [ExecTarget(f"c{i}", ["true"], False, False, True, True) for i in range(60)]
    urls = [h.server.url_for(t) for t in targets]
    h.stubs.hold = asyncio.Event()

    async def one(url: str, i: int) -> bytes:
        head = f"GET {path_of(url)} HTTP/1.1\r\nHost: x\r\n{UPGRADE_SPDY}\r\n{i}\n"
        return await h.send(head.encode(), timeout=10)

    tasks = [asyncio.create_task(one(url, i)) for i, url in enumerate(urls)]
    async with asyncio.timeout(10):  # all of them are in their sessions at once
        while len(h.stubs.calls) < len(urls):
            await asyncio.sleep(0.01)
    h.stubs.hold.set()
    responses = await asyncio.gather(*tasks)
    for i, response in enumerate(responses):
        assert response.endswith(f"spdy echo {i}\n".encode())
    seen = [c.target.container_id for c in h.stubs.calls if isinstance(c.target, ExecTarget)]
    assert sorted(seen) == sorted(t.container_id for t in targets)


@served
async def test_a_failing_session_does_not_hurt_others(h: Harness) -> None:
    h.stubs.fail = True
    assert await h.get(path_of(h.server.url_for(EXEC))) == b""
    h.stubs.fail = False
    assert status(await h.get(path_of(h.server.url_for(EXEC)))) == 101


@served
async def test_stop_ends_live_sessions(h: Harness) -> None:
    h.stubs.hold = asyncio.Event()  # never set: the session lives until stopped
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    path = path_of(h.server.url_for(EXEC))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{UPGRADE_SPDY}\r\n".encode())
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    port = h.port
    async with asyncio.timeout(5):
        await h.server.stop()
        assert await reader.read() == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


# -- TLS -------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cripy-streaming-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_file, key_file


def test_tls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cert_file, key_file = self_signed(tmp_path)
    client = ssl.create_default_context(cafile=str(cert_file))
    config = StreamingConfig(address="127.0.0.1", port=0, tls_cert_file=str(cert_file),
                             tls_key_file=str(key_file))

    async def body() -> None:
        async with serving(monkeypatch, config, client) as h:
            url = h.server.url_for(EXEC)
            assert url.startswith(f"https://127.0.0.1:{h.port}/exec/")
            head = f"GET {path_of(url)} HTTP/1.1\r\nHost: x\r\n{UPGRADE_SPDY}\r\nsecret\n"
            assert (await h.send(head.encode())).endswith(b"spdy echo secret\n")
            assert status(await h.get(path_of(url))) == 404
            # Plain HTTP on the TLS port gets nowhere, and does not disturb the server.
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.write(f"GET {path_of(h.server.url_for(EXEC))} HTTP/1.1\r\n\r\n".encode())
            async with asyncio.timeout(5):
                assert not (await reader.read()).startswith(b"HTTP/1.1 101")
            writer.close()
            assert status(await h.get(path_of(h.server.url_for(EXEC)), body=b"\n")) == 101

    asyncio.run(body())


# -- with the real WebSocket transport ---------------------------------------------------


class EchoBackend:
    """exec: stdin to stdout until EOF, then exits with the command's length."""

    async def exec(self, target: ExecTarget, session: StreamSession) -> Outcome:
        assert session.stdin is not None and session.stdout is not None
        while (data := await session.stdin.get()) is not None:
            await session.stdout.write(data.upper())
        return Outcome(exit_code=len(target.cmd))

    async def attach(self, target: AttachTarget, session: StreamSession) -> Outcome:
        return Outcome(error="no attach here")

    async def open_port(
        self, target: PortForwardTarget, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise OSError("no ports here")


def test_exec_through_the_websocket_transport() -> None:
    async def body() -> None:
        server = StreamingServer(StreamingConfig(address="127.0.0.1", port=0), EchoBackend())
        await server.start()
        try:
            target = ExecTarget("c1", ["a", "b"], tty=False, stdin=True, stdout=True,
                                stderr=False)
            url = server.url_for(target).replace("http://", "ws://")
            async with connect(url, subprotocols=[Subprotocol("v5.channel.k8s.io")]) as ws:
                assert await ws.recv() == b"\x01"  # stdout open: the session runs
                await ws.send(b"\x00hello")
                assert await ws.recv() == b"\x01HELLO"
                await ws.send(b"\xff\x00")  # v5: close stdin
                status = await ws.recv()
                assert isinstance(status, bytes) and status[0] == 3
                assert json.loads(status[1:])["details"]["causes"][0]["message"] == "2"
            # The URL was single-use.
            with pytest.raises(InvalidStatus) as info:
                async with connect(url):
                    pass
            assert info.value.response.status_code == 404
        finally:
            await server.stop()

    asyncio.run(body())
