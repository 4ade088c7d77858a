"""Exec, Attach and PortForward through the daemon's streaming server, over SPDY (cripy's
client) and over WebSocket (the independent `websockets` library)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import websockets

from cripy.api import api_pb2 as pb
from cripy.streaming.session import Outcome, TerminalSize
from cripy.streaming.spdy_client import spdy_exec, spdy_port_forward
from tests.support.pods import Pods

V5 = "v5.channel.k8s.io"
STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
LOOPBACK_SERVER = ["nc", "-ll", "-p", "8080", "127.0.0.1", "-e", "echo", "hello-from-loopback"]


def exec_url(pods: Pods, cid: str, cmd: list[str], *, tty: bool = False,
             stdin: bool = False) -> str:
    return str(pods.runtime.Exec(pb.ExecRequest(
        container_id=cid, cmd=cmd, tty=tty, stdin=stdin, stdout=True, stderr=not tty)).url)


class Collected:
    def __init__(self) -> None:
        self.stdout = b""
        self.stderr = b""

    async def out(self, data: bytes) -> None:
        self.stdout += data

    async def err(self, data: bytes) -> None:
        self.stderr += data


def stdin_of(data: bytes, delay: float = 0.0) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()

    async def feed() -> None:
        await asyncio.sleep(delay)
        reader.feed_data(data)
        reader.feed_eof()

    asyncio.get_running_loop().create_task(feed())
    return reader


# --- SPDY -----------------------------------------------------------------------------


def spdy(url: str, *, stdin: bytes | None = None, tty: bool = False,
         resize: TerminalSize | None = None, delay: float = 0.0) -> tuple[Outcome, Collected]:
    got = Collected()

    async def run() -> Outcome:
        sizes: asyncio.Queue[TerminalSize] | None = None
        if resize is not None:
            sizes = asyncio.Queue()
            sizes.put_nowait(resize)
        return await spdy_exec(url, stdin=stdin_of(stdin, delay) if stdin is not None else None,
                               stdout=got.out, stderr=None if tty else got.err, tty=tty,
                               resize=sizes)

    return asyncio.run(asyncio.wait_for(run(), 60)), got


def test_spdy_interactive_tty_exec(pods: Pods) -> None:
    cid = pods.create(pods.run("tty"), "c", ["sleep", "300"])
    url = exec_url(pods, cid, ["sh", "-c", "read line; echo got-$line"], tty=True, stdin=True)
    outcome, got = spdy(url, stdin=b"hello\n", tty=True, delay=0.3)
    assert outcome == Outcome(exit_code=0)
    assert b"got-hello" in got.stdout


def test_spdy_resize_changes_stty_size(pods: Pods) -> None:
    cid = pods.create(pods.run("resize"), "c", ["sleep", "300"])
    url = exec_url(pods, cid, ["sh"], tty=True, stdin=True)
    outcome, got = spdy(url, stdin=b"stty size; exit 0\n", tty=True,
                        resize=TerminalSize(width=123, height=45), delay=0.5)
    assert outcome.exit_code == 0
    assert b"45 123" in got.stdout


def test_spdy_failing_command_reports_its_exit_code(pods: Pods) -> None:
    cid = pods.create(pods.run("fail"), "c", ["sleep", "300"])
    outcome, got = spdy(exec_url(pods, cid, ["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert outcome.exit_code == 3
    assert got.stdout == b"out\n" and got.stderr == b"err\n"


def test_spdy_attach_sees_output_after_attaching(pods: Pods) -> None:
    cid = pods.create(pods.run("attach"), "c",
                      ["sh", "-c", "sleep 1.5; echo after-attach; sleep 1; exit 4"])
    url = pods.runtime.Attach(pb.AttachRequest(container_id=cid, stdout=True,
                                               stderr=True)).url
    outcome, got = spdy(url)
    assert b"after-attach" in got.stdout
    assert outcome.exit_code == 4



def test_spdy_port_forward_reaches_a_loopback_only_server(pods: Pods) -> None:
    pod_id = pods.run("pf")
    pods.create(pod_id, "server", LOOPBACK_SERVER)
    ip = pods.runtime.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.network.ip

    async def forward() -> bytes:
        url = pods.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod_id)).url

        async def local(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await spdy_port_forward(url, 8080, reader, writer)
            writer.close()

        server = await asyncio.start_server(local, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        received = await asyncio.wait_for(reader.read(100), 15)
        writer.close()
        server.close()
        return received

    time.sleep(0.5)  # let nc listen
    assert asyncio.run(forward()).strip() == b"hello-from-loopback"
    # The server is up, yet the pod's own address does not reach it: loopback only.
    with pytest.raises(OSError):
        socket.create_connection((ip, 8080), timeout=2).close()


def test_ten_concurrent_execs(pods: Pods) -> None:
    cid = pods.create(pods.run("many"), "c", ["sleep", "300"])

    async def one(i: int) -> tuple[Outcome, bytes]:
        got = Collected()
        url = exec_url(pods, cid, ["sh", "-c", f"sleep 0.5; echo session-{i}; exit {i}"])
        outcome = await spdy_exec(url, stdin=None, stdout=got.out, stderr=got.err, tty=False)
        return outcome, got.stdout

    async def all_of_them() -> list[tuple[Outcome, bytes]]:
        return await asyncio.gather(*(one(i) for i in range(10)))

    results = asyncio.run(asyncio.wait_for(all_of_them(), 60))
    for i, (outcome, stdout) in enumerate(results):
        assert outcome.exit_code == i
        assert stdout == f"session-{i}\n".encode()


# --- WebSocket (an independent client) ------------------------------------------------


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)


async def ws_session(url: str, send: Callable[[Any], Awaitable[None]] | None = None,
                     protocol: str = V5) -> tuple[dict[int, bytes], dict[str, Any]]:
    """Run a remotecommand session; returns output per channel and the final status."""
    output: dict[int, bytes] = {}
    status: dict[str, Any] = {}
    async with websockets.connect(ws_url(url), subprotocols=[protocol],  # type: ignore[list-item]
                                  max_size=None) as ws:
        assert ws.subprotocol == protocol
        if send is not None:
            await send(ws)
        async for message in ws:
            data = message if isinstance(message, bytes) else message.encode()
            if not data:
                continue
            channel, payload = data[0], data[1:]
            if channel == ERROR and payload:
                status = json.loads(payload)
            else:
                output[channel] = output.get(channel, b"") + payload
    return output, status


def test_websocket_exec_with_stdin_close_and_exit_code(pods: Pods) -> None:
    cid = pods.create(pods.run("ws"), "c", ["sleep", "300"])
    url = exec_url(pods, cid, ["sh", "-c", "cat; echo done >&2; exit 3"], stdin=True)

    async def send(ws: Any) -> None:
        await ws.send(bytes([STDIN]) + b"through websocket\n")
        await ws.send(bytes([255, STDIN]))  # v5: stdin is closed

    output, status = asyncio.run(asyncio.wait_for(ws_session(url, send), 60))
    assert output[STDOUT] == b"through websocket\n"
    assert output[STDERR] == b"done\n"
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]


def test_websocket_tty_resize(pods: Pods) -> None:
    cid = pods.create(pods.run("wstty"), "c", ["sleep", "300"])
    url = exec_url(pods, cid, ["sh"], tty=True, stdin=True)

    async def send(ws: Any) -> None:
        await ws.send(bytes([RESIZE]) + json.dumps({"Width": 99, "Height": 33}).encode())
        await asyncio.sleep(0.3)
        await ws.send(bytes([STDIN]) + b"stty size; exit 0\n")

    output, status = asyncio.run(asyncio.wait_for(ws_session(url, send), 60))
    assert b"33 99" in output[STDOUT]
    assert status["status"] == "Success"


def test_websocket_attach(pods: Pods) -> None:
    cid = pods.create(pods.run("wsattach"), "c",
                      ["sh", "-c", "sleep 1.5; echo attached-ws; sleep 1; exit 0"])
    url = pods.runtime.Attach(pb.AttachRequest(container_id=cid, stdout=True)).url
    output, status = asyncio.run(asyncio.wait_for(ws_session(url), 60))
    assert b"attached-ws" in output[STDOUT]
    assert status["status"] == "Success"


def test_websocket_port_forward(pods: Pods) -> None:
    pod_id = pods.run("wspf")
    pods.create(pod_id, "server", LOOPBACK_SERVER)
    time.sleep(0.5)
    url = pods.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod_id)).url

    async def forward() -> bytes:
        data = b""
        async with websockets.connect(ws_url(url) + "?port=8080",
                                      subprotocols=["v4.channel.k8s.io"]) as ws:  # type: ignore[list-item]
            async for message in ws:
                assert isinstance(message, bytes)
                channel, payload = message[0], message[1:]
                if channel == 0:
                    data += payload
                if b"hello-from-loopback" in data:
                    break
        return data

    received = asyncio.run(asyncio.wait_for(forward(), 30))
    assert received[:2] == (8080).to_bytes(2, "little")  # the port announces the channel
    assert b"hello-from-loopback" in received


# --- the URLs -------------------------------------------------------------------------


def test_urls_are_single_use_and_requests_are_validated(pods: Pods) -> None:
    cid = pods.create(pods.run("urls"), "c", ["sleep", "300"])
    url = exec_url(pods, cid, ["true"])
    assert url.startswith("http://127.0.0.1:")
    assert spdy(url)[0].exit_code == 0
    with pytest.raises(Exception, match="404"):
        spdy(url)
    for request in (pb.ExecRequest(container_id=cid, cmd=["true"]),
                    pb.ExecRequest(container_id=cid, cmd=["true"], tty=True, stdout=True,
                                   stderr=True),
                    pb.ExecRequest(container_id=cid, stdout=True)):
        with pytest.raises(grpc.RpcError) as info:
            pods.runtime.Exec(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        pods.runtime.Exec(pb.ExecRequest(container_id="nope", cmd=["true"], stdout=True))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
