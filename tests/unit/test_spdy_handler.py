"""serve_spdy against a fake backend over loopback TCP, driven by the SPDY client."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from cripy.streaming import spdy_handler
from cripy.streaming.session import (
    AttachTarget,
    ExecTarget,
    Outcome,
    PortForwardTarget,
    StreamSession,
    TerminalSize,
)
from cripy.streaming.spdy_client import (
    PortForwardError,
    UpgradeError,
    decode_error,
    spdy_exec,
    spdy_port_forward,
    upgrade,
)
from cripy.streaming.spdy_handler import SpdySession, serve_spdy

Target = ExecTarget | AttachTarget | PortForwardTarget


class FakeBackend:
    """exec runs a tiny command language; open_port reaches local echo servers."""

    def __init__(self) -> None:
        self.resizes: list[TerminalSize] = []
        self.ports: dict[int, int] = {}
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def exec(self, target: ExecTarget, session: StreamSession) -> Outcome:
        self.started.set()
        cmd = target.cmd
        if cmd[0] == "echo":
            assert session.stdin is not None and session.stdout is not None
            while (chunk := await session.stdin.get()) is not None:
                await session.stdout.write(chunk)
            return Outcome()
        if cmd[0] == "exit":
            if session.stderr is not None:
                await session.stderr.write(b"failing\n")
            return Outcome(exit_code=int(cmd[1]))
        if cmd[0] == "resize":
            assert session.resize is not None and session.stdout is not None
            for _ in range(int(cmd[1])):
                size = await session.resize.get()
                self.resizes.append(size)
                await session.stdout.write(f"{size.width}x{size.height}\r\n".encode())
            return Outcome()
        if cmd[0] == "big":
            assert session.stdout is not None
            for i in range(int(cmd[1])):
                await session.stdout.write(bytes([i % 256]) * 10000)
            return Outcome()
        if cmd[0] == "sleep":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if cmd[0] == "fail":
            raise RuntimeError("the runtime broke")
        return Outcome(error=f"unknown command {cmd}")

    async def attach(self, target: AttachTarget, session: StreamSession) -> Outcome:
        assert session.stdout is not None
        await session.stdout.write(b"attached\n")
        return Outcome(exit_code=7)

    async def open_port(self, target: PortForwardTarget, port: int
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if port not in self.ports:
            raise ConnectionRefusedError(f"connect to 127.0.0.1:{port}: connection refused")
        return await asyncio.open_connection("127.0.0.1", self.ports[port])


class Harness:
    """A bare HTTP server: reads the request head, then hands over to serve_spdy."""

    def __init__(self) -> None:
        self.backend = FakeBackend()
        self.targets: dict[str, Target] = {}
        self.port = 0
        self.served = 0
        self.errors: list[BaseException] = []
        self.active: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)
        task.add_done_callback(self.active.discard)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = [(name.strip().lower(), value.strip())
                       for name, _, value in (line.partition(":") for line in lines[1:] if line)]
            await serve_spdy(headers, reader, writer, self.targets[path], self.backend)
            self.served += 1
        except BaseException as exc:  # serve_spdy must not raise
            self.errors.append(exc)
            raise

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextlib.asynccontextmanager
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    server = await asyncio.start_server(h.handle, "127.0.0.1", 0)
    h.port = server.sockets[0].getsockname()[1]
    try:
        yield h
        # Every session ends by itself once its client is gone.
        if h.active:
            await asyncio.wait(set(h.active), timeout=5)
        assert not h.active
    finally:
        server.close()
        await server.wait_closed()
    assert h.errors == []


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(test(), 30)
    asyncio.run(main())


def feeder(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


class Collect:
    def __init__(self) -> None:
        self.data = bytearray()

    async def __call__(self, chunk: bytes) -> None:
        self.data += chunk


def exec_target(*cmd: str, tty: bool = False, stdin: bool = True, stderr: bool = True
                ) -> ExecTarget:
    return ExecTarget("c1", list(cmd), tty=tty, stdin=stdin, stdout=True,
                      stderr=stderr and not tty)


async def raw_error_stream(url: str, protocol: str, kinds: list[str]) -> tuple[str, bytes]:
    """Open the streams by hand; what the error stream carried."""
    reader, writer, chosen = await upgrade(url, [protocol])
    session = SpdySession(reader, writer, client=True)
    task = session.start()
    try:
        streams = {k: await session.create_stream([("streamtype", k)]) for k in kinds}
        if "stdin" in streams:
            await streams["stdin"].close()
        for kind in ("stdout", "stderr"):
            if kind in streams:
                await streams[kind].read_all()
        return chosen, await streams["error"].read_all()
    finally:
        await session.close()
        task.cancel()


# --- remotecommand --------------------------------------------------------------------


def test_exec_echoes_stdin_through_flow_control() -> None:
    async def test() -> None:
        async with harness() as h:
            h.targets["/exec/echo"] = exec_target("echo")
            payload = bytes(range(256)) * 1200  # 300 KiB: several windows' worth
            out, err = Collect(), Collect()
            outcome = await spdy_exec(h.url("/exec/echo"), stdin=feeder(payload), stdout=out,
                                      stderr=err, tty=False)
            assert outcome == Outcome()
            assert bytes(out.data) == payload
            assert err.data == b""
    run(test)


def test_exec_large_output() -> None:
    async def test() -> None:
        async with harness() as h:
            h.targets["/exec/big"] = exec_target("big", "100", stdin=False)
            out = Collect()
            outcome = await spdy_exec(h.url("/exec/big"), stdin=None, stdout=out,
                                      stderr=Collect(), tty=False)
            assert outcome == Outcome()
            assert len(out.data) == 1_000_000
            assert out.data[-1] == 99
    run(test)


def test_exec_exit_code_and_status_json() -> None:
    async def test() -> None:
        async with harness() as h:
            h.targets["/exec/exit"] = exec_target("exit", "3", stdin=False)
            out, err = Collect(), Collect()
            outcome = await spdy_exec(h.url("/exec/exit"), stdin=None, stdout=out, stderr=err,
                                      tty=False)
            assert outcome == Outcome(exit_code=3)
            assert err.data == b"failing\n"
            chosen, raw = await raw_error_stream(h.url("/exec/exit"), "v4.channel.k8s.io",
                                                 ["error", "stdout", "stderr"])
            assert chosen == "v4.channel.k8s.io"
            status = json.loads(raw)
            assert status["status"] == "Failure"
            assert status["reason"] == "NonZeroExitCode"
            assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    run(test)


def test_exec_backend_failure_is_reported() -> None:
    async def test() -> None:
        async with harness() as h:
            h.targets["/exec/fail"] = exec_target("fail", stdin=False)
            outcome = await spdy_exec(h.url("/exec/fail"), stdin=None, stdout=Collect(),
                                      stderr=Collect(), tty=False)
            assert "the runtime broke" in outcome.error
    run(test)


def test_tty_with_resize() -> None:
    async def test() -> None:
        async with harness() as h:
            h.targets["/exec/resize"] = exec_target("resize", "2", tty=True)
            sizes: asyncio.Queue[TerminalSize] = asyncio.Queue()
            sizes.put_nowait(TerminalSize(80, 24))
            sizes.put_nowait(TerminalSize(132, 50))
            stdin = asyncio.StreamReader()  # a terminal: never ends by itself
            out = Collect()
            outcome = await spdy_exec(h.url("/exec/resize"), stdin=stdin, stdout=out,
                                      stderr=Collect(), tty=True, resize=sizes)
            assert outcome == Outcome()
            assert h.backend.resizes == [TerminalSize(80, 24), TerminalSize(132, 50)]
            assert out.data == b"80x24\r\n132x50\r\n"
    run(test)


def test_attach() -> None:
    async def test() -> None:
        async with harness() as h:
            h.targets["/attach/x"] = AttachTarget("c1", tty=False, stdin=False, stdout=True,
                                                  stderr=True)
            out = Collect()
            outcome = await spdy_exec(h.url("/attach/x"), stdin=None, stdout=out,
                                      stderr=Collect(), tty=False)
            assert outcome == Outcome(exit_code=7)
            assert out.data == b"attached\n"
    run(test)


@pytest.mark.parametrize("protocol", ["v3.channel.k8s.io", "v2.channel.k8s.io",
                                      "channel.k8s.io"])
def test_older_protocols_report_failures_as_text(protocol: str) -> None:
    async def test() -> None:
        async with harness() as h:
            h.targets["/exec/exit"] = exec_target("exit", "3", stdin=False)
            outcome = await spdy_exec(h.url("/exec/exit"), stdin=None, stdout=Collect(),
                                      stderr=Collect(), tty=False, protocol=protocol)
            assert outcome == Outcome(exit_code=3)
            chosen, raw = await raw_error_stream(h.url("/exec/exit"), protocol,
                                                 ["error", "stdout", "stderr"])
            assert chosen == protocol
            assert raw.startswith(b"command terminated with non-zero exit code")
            assert raw.endswith(b"exit status 3")
            h.targets["/exec/ok"] = exec_target("echo")
            chosen, raw = await raw_error_stream(h.url("/exec/ok"), protocol,
                                                 ["error", "stdin", "stdout", "stderr"])
            assert raw == b""  # success says nothing before v4
    run(test)


def test_negotiation_takes_the_clients_first_supported_choice() -> None:
    async def test() -> None:
        async with harness() as h:
            h.targets["/exec/exit"] = exec_target("exit", "0", stdin=False)
            outcome = await spdy_exec(h.url("/exec/exit"), stdin=None, stdout=Collect(),
                                      stderr=Collect(), tty=False,
                                      protocol="v9.channel.k8s.io, v2.channel.k8s.io")
            assert outcome == Outcome()
            # v3 with a tty: the resize stream is part of the set the server waits for.
            h.targets["/exec/resize"] = exec_target("resize", "1", tty=True)
            sizes: asyncio.Queue[TerminalSize] = asyncio.Queue()
            sizes.put_nowait(TerminalSize(10, 20))
            outcome = await spdy_exec(h.url("/exec/resize"), stdin=asyncio.StreamReader(),
                                      stdout=Collect(), stderr=None, tty=True, resize=sizes,
                                      protocol="v3.channel.k8s.io")
            assert outcome == Outcome()
            assert h.backend.resizes == [TerminalSize(10, 20)]
    run(test)


def test_no_acceptable_protocol_is_refused() -> None:
    async def test() -> None:
        async with harness() as h:
            h.targets["/exec/x"] = exec_target("echo")
            with pytest.raises(UpgradeError) as info:
                await spdy_exec(h.url("/exec/x"), stdin=None, stdout=Collect(), stderr=None,
                                tty=False, protocol="v9.channel.k8s.io")
            assert info.value.status == 403
            assert "unable to negotiate protocol" in str(info.value)
            with pytest.raises(UpgradeError) as info:
                await upgrade(h.url("/exec/x"), [])
            assert info.value.status == 400
            assert "X-Stream-Protocol-Version is required" in str(info.value)
            h.targets["/pf"] = PortForwardTarget("pod1")
            with pytest.raises(UpgradeError) as info:
                await upgrade(h.url("/pf"), ["v4.channel.k8s.io"])
            assert info.value.status == 403
    run(test)


def test_client_going_away_cancels_the_backend() -> None:
    async def test() -> None:
        async with harness() as h:
            h.targets["/exec/sleep"] = exec_target("sleep", stdin=False)
            task = asyncio.create_task(spdy_exec(
                h.url("/exec/sleep"), stdin=None, stdout=Collect(), stderr=Collect(),
                tty=False))
            await h.backend.started.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.wait_for(h.backend.cancelled.wait(), 5)
            for _ in range(50):
                if h.served:
                    break
                await asyncio.sleep(0.05)
            assert h.served == 1
    run(test)


def test_missing_streams_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spdy_handler, "STREAM_CREATION_TIMEOUT", 0.3)

    async def test() -> None:
        async with harness() as h:
            h.targets["/exec/x"] = exec_target("echo")
            reader, writer, _ = await upgrade(h.url("/exec/x"), ["v4.channel.k8s.io"])
            session = SpdySession(reader, writer, client=True)
            task = session.start()
            await session.create_stream([("streamtype", "error")])
            await asyncio.wait_for(session.closed.wait(), 5)  # the server gave up
            assert session.goaway_received
            task.cancel()
            writer.close()
    run(test)


def test_garbage_after_upgrade_closes_only_that_connection() -> None:
    async def test() -> None:
        async with harness() as h:
            h.targets["/exec/echo"] = exec_target("echo")
            reader, writer, _ = await upgrade(h.url("/exec/echo"), ["v4.channel.k8s.io"])
            writer.write(b"\x80\x02\x00\x01garbage that is not SPDY/3" * 3)
            received = await asyncio.wait_for(reader.read(), 5)  # until the server closes
            # SETTINGS, then GOAWAY with PROTOCOL_ERROR.
            assert b"\x80\x03\x00\x07\x00\x00\x00\x08" + struct.pack(">II", 0, 1) in received
            writer.close()
            out = Collect()
            outcome = await spdy_exec(h.url("/exec/echo"), stdin=feeder(b"still fine"),
                                      stdout=out, stderr=Collect(), tty=False)
            assert outcome == Outcome() and out.data == b"still fine"
    run(test)


def test_client_takes_a_status_ended_by_reset() -> None:
    """Like the kubelet: write the status, then reset every stream and close."""
    async def test() -> None:
        async def kubelet_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                               ) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io"
                         b"\r\n\r\n")
            streams: dict[str, Any] = {}
            arrived = asyncio.Event()

            def on_stream(stream: Any) -> None:
                stream.accept()
                streams[stream.header("streamtype")] = stream
                if len(streams) == 2:
                    arrived.set()

            session = SpdySession(reader, writer, client=False, on_stream=on_stream)
            task = session.start()
            await arrived.wait()
            await streams["stdout"].write(b"output")
            await streams["error"].write(json.dumps({
                "status": "Failure", "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": "9"}]}}).encode())
            for stream in streams.values():
                stream.reset()
            await session.close()
            task.cancel()

        server = await asyncio.start_server(kubelet_like, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        out = Collect()
        outcome = await spdy_exec(f"http://127.0.0.1:{port}/exec/x", stdin=None, stdout=out,
                                  stderr=None, tty=False)
        assert outcome == Outcome(exit_code=9)
        assert out.data == b"output"
        server.close()
    run(test)


def test_client_reports_a_connection_lost_before_the_status() -> None:
    async def test() -> None:
        async def vanishing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                            ) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io"
                         b"\r\n\r\n")
            session = SpdySession(reader, writer, client=False,
                                  on_stream=lambda stream: stream.accept())
            task = session.start()
            while len(session.streams) < 2:
                await asyncio.sleep(0.01)
            writer.transport.abort()
            await task

        server = await asyncio.start_server(vanishing, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ConnectionError, match="before the command's status"):
            await spdy_exec(f"http://127.0.0.1:{port}/exec/x", stdin=None, stdout=Collect(),
                            stderr=None, tty=False)
        server.close()
    run(test)


# --- portforward ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def forwarded_exchange(local_port: int, message: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", local_port)
    writer.write(message)
    await writer.drain()
    writer.write_eof()
    reply = await reader.read()
    writer.close()
    return reply


def test_port_forward_two_concurrent_connections() -> None:
    async def test() -> None:
        async with harness() as h, echo_server() as echo_port:
            h.backend.ports[8080] = echo_port
            h.targets["/pf"] = PortForwardTarget("pod1")
            failures: list[BaseException] = []

            async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                               ) -> None:
                try:
                    await spdy_port_forward(h.url("/pf"), 8080, reader, writer)
                except BaseException as exc:
                    failures.append(exc)
                finally:
                    writer.close()

            local = await asyncio.start_server(accepted, "127.0.0.1", 0)
            local_port = local.sockets[0].getsockname()[1]
            big = b"abc" * 100_000
            replies = await asyncio.gather(forwarded_exchange(local_port, b"hello"),
                                           forwarded_exchange(local_port, big))
            assert list(replies) == [b"HELLO", big.upper()]
            local.close()
            assert failures == []
    run(test)


def test_port_forward_survives_garbage_collection_while_half_closed() -> None:
    """Once the local client half-closed, no socket is read on behalf of the forwarding
    task; it must still not be collected while it waits for a slow pod."""
    async def test() -> None:
        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()
            await asyncio.sleep(0.3)
            writer.write(data[::-1])
            writer.close()

        pod = await asyncio.start_server(slow, "127.0.0.1", 0)
        async with harness() as h:
            h.backend.ports[7000] = pod.sockets[0].getsockname()[1]
            h.targets["/pf"] = PortForwardTarget("pod1")

            async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                               ) -> None:
                try:
                    await spdy_port_forward(h.url("/pf"), 7000, reader, writer)
                finally:
                    writer.close()

            local = await asyncio.start_server(accepted, "127.0.0.1", 0)
            exchange = asyncio.create_task(
                forwarded_exchange(local.sockets[0].getsockname()[1], b"stressed"))
            while not exchange.done():
                gc.collect()
                await asyncio.sleep(0.02)
            assert exchange.result() == b"desserts"
            local.close()
        pod.close()
    run(test)


def test_port_forward_many_requests_on_one_connection() -> None:
    async def test() -> None:
        async with harness() as h, echo_server() as echo_port:
            h.backend.ports[80] = echo_port
            h.targets["/pf"] = PortForwardTarget("pod1", ports=[80, 81])
            reader, writer, chosen = await upgrade(h.url("/pf"), ["portforward.k8s.io"])
            assert chosen == "portforward.k8s.io"
            session = SpdySession(reader, writer, client=True)
            task = session.start()

            async def one(request_id: int, port: int, message: bytes) -> tuple[bytes, bytes]:
                common = [("port", str(port)), ("requestid", str(request_id))]
                error = await session.create_stream([("streamtype", "error"), *common])
                data = await session.create_stream([("streamtype", "data"), *common])
                with contextlib.suppress(ConnectionResetError):  # refused: data is reset
                    await data.write(message)
                    await data.close()
                return await data.read_all(), await error.read_all()

            results = await asyncio.gather(*(one(i, 80, f"msg {i}".encode())
                                             for i in range(5)),
                                           one(9, 81, b"refused"), one(10, 99, b"no"))
            assert results[:5] == [(f"MSG {i}".encode(), b"") for i in range(5)]
            assert results[5][0] == b"" and b"connection refused" in results[5][1]
            assert b"not among the forwarded ports" in results[6][1]
            await session.close()
            task.cancel()
    run(test)


def test_port_forward_error_reaches_the_client() -> None:
    async def test() -> None:
        async with harness() as h:
            h.targets["/pf"] = PortForwardTarget("pod1")
            local_reader = asyncio.StreamReader()
            local_reader.feed_eof()

            class NullWriter:
                def write(self, data: bytes) -> None:
                    pass

                async def drain(self) -> None:
                    pass

                def can_write_eof(self) -> bool:
                    return False

            with pytest.raises(PortForwardError, match="connection refused"):
                await spdy_port_forward(h.url("/pf"), 5555, local_reader,
                                        NullWriter())  # type: ignore[arg-type]
    run(test)


# --- pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "message", "expected"), [
    ("v4.channel.k8s.io", b'{"metadata":{},"status":"Success"}', Outcome()),
    ("v4.channel.k8s.io", b"", Outcome()),
    ("v4.channel.k8s.io", json.dumps({
        "status": "Failure", "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "42"}]}}).encode(),
     Outcome(exit_code=42)),
    ("v4.channel.k8s.io", b'{"status":"Failure","message":"no such container"}',
     Outcome(error="no such container")),
    ("v4.channel.k8s.io", b"not json", None),
    ("v2.channel.k8s.io", b"something broke", Outcome(error="something broke")),
])
def test_decode_error(protocol: str, message: bytes, expected: Any) -> None:
    outcome = decode_error(protocol, message)
    if expected is None:
        assert outcome.error.startswith("error stream protocol error")
    else:
        assert outcome == expected
