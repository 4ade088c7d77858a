"""The client side of the SPDY streaming protocols, as kubectl and crictl speak them: for
`cripy ctl exec/attach/port-forward` and for tests.

The URL is the one Exec, Attach or PortForward returned; the request is a POST that asks
`Upgrade: SPDY/3.1` with the wanted subprotocols in X-Stream-Protocol-Version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from cripy.streaming.session import Outcome, TerminalSize
from cripy.streaming.spdy_handler import (
    SPDY_PORTFORWARD_PROTOCOLS,
    SPDY_REMOTECOMMAND_PROTOCOLS,
    SpdySession,
    SpdyStream,
    pinned,
)
from cripy.tasks import cancel

Output = Callable[[bytes], Awaitable[None]]

#: How long the server has to send the error stream's end after the output ended.
STATUS_TIMEOUT = 10.0
_HEAD_LIMIT = 64 * 1024
_EXIT_STATUS = re.compile(r"exit (?:status|code) (\d+)\s*$")


class UpgradeError(ConnectionError):
    """The server did not switch to SPDY: `status` is its HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class PortForwardError(Exception):
    """The server reported an error on a forwarded connection's error stream."""


async def _open(url: str, ssl_context: ssl.SSLContext | None
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    secure = parts.scheme == "https"
    if secure and ssl_context is None:
        ssl_context = ssl.create_default_context()
    port = parts.port or (443 if secure else 80)
    reader, writer = await asyncio.open_connection(
        parts.hostname, port, ssl=ssl_context if secure else None, limit=_HEAD_LIMIT)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return reader, writer, f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"


async def upgrade(url: str, protocols: list[str], ssl_context: ssl.SSLContext | None = None
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Connect and switch to SPDY/3.1; returns the stream pair and the subprotocol the
    server chose ("" if it named none)."""
    reader, writer, request = await _open(url, ssl_context)
    try:
        request += "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        request += "".join(f"X-Stream-Protocol-Version: {p}\r\n" for p in protocols)
        writer.write((request + "Content-Length: 0\r\n\r\n").encode())
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise UpgradeError(f"no HTTP answer from {url}: {exc}") from None
        lines = head.decode("latin-1").split("\r\n")
        status_parts = lines[0].split(" ", 2)
        if len(status_parts) < 2 or not status_parts[1].isdigit():
            raise UpgradeError(f"bad HTTP status line {lines[0]!r}")
        status = int(status_parts[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers.setdefault(name.strip().lower(), []).append(value.strip())
        if status != 101:
            body = await _body(reader, headers)
            reason = status_parts[2] if len(status_parts) > 2 else ""
            raise UpgradeError(f"{status} {reason}: {body}".strip().rstrip(":"), status)
        upgraded = [v.lower() for v in headers.get("upgrade", [])]
        if "spdy/3.1" not in upgraded:
            raise UpgradeError(f"the server switched to {upgraded or 'nothing'}, "
                               "not SPDY/3.1", status)
        chosen = headers.get("x-stream-protocol-version", [""])[0]
        return reader, writer, chosen
    except BaseException:
        writer.close()
        raise


async def _body(reader: asyncio.StreamReader, headers: dict[str, list[str]]) -> str:
    length = headers.get("content-length", [""])[0]
    try:
        if length.isdigit():
            data = await asyncio.wait_for(
                reader.readexactly(min(int(length), _HEAD_LIMIT)), 5)
        else:
            data = await asyncio.wait_for(reader.read(_HEAD_LIMIT), 5)
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        data = b""
    return " ".join(data.decode("utf-8", "replace").split())


def decode_error(protocol: str, message: bytes) -> Outcome:
    """What the error stream said, as an Outcome: a metav1.Status (v4), or for older
    protocols the text of a failure (empty: success)."""
    if not message.strip():
        return Outcome()
    if protocol != "v4.channel.k8s.io":
        text = message.decode("utf-8", "replace").strip()
        match = _EXIT_STATUS.search(text)
        return Outcome(exit_code=int(match.group(1))) if match else Outcome(error=text)
    try:
        status = json.loads(message)
    except ValueError as exc:
        return Outcome(error=f"error stream protocol error: {exc} in {message[:200]!r}")
    if not isinstance(status, dict):
        return Outcome(error=f"error stream protocol error: {message[:200]!r}")
    if status.get("status") == "Success":
        return Outcome()
    if status.get("status") != "Failure":
        return Outcome(error="error stream protocol error: unknown error")
    if status.get("reason") == "NonZeroExitCode":
        details = status.get("details")
        causes = details.get("causes") if isinstance(details, dict) else None
        for cause in causes if isinstance(causes, list) else []:
            if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
                code = str(cause.get("message", ""))
                if code.isdigit():
                    return Outcome(exit_code=int(code))
                return Outcome(error=f"error stream protocol error: invalid exit code "
                                     f"value {code!r}")
        return Outcome(error="error stream protocol error: no ExitCode cause given")
    return Outcome(error=str(status.get("message") or "unknown error"))


async def _copy_out(stream: SpdyStream, output: Output) -> None:
    while chunk := await stream.read():
        await output(chunk)


async def _copy_in(source: asyncio.StreamReader, stream: SpdyStream) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await source.read(32 * 1024):
            await stream.write(chunk)
        await stream.close()


async def _send_sizes(queue: asyncio.Queue[TerminalSize], stream: SpdyStream) -> None:
    with contextlib.suppress(ConnectionError):
        while True:
            size = await queue.get()
            await stream.write(json.dumps({"Width": size.width, "Height": size.height}
                                          ).encode() + b"\n")


async def spdy_exec(url: str, *, stdin: asyncio.StreamReader | None, stdout: Output | None,
                    stderr: Output | None, tty: bool,
                    resize: asyncio.Queue[TerminalSize] | None = None,
                    protocol: str = "v4.channel.k8s.io",
                    ssl_context: ssl.SSLContext | None = None) -> Outcome:
    """Run an exec or attach session from its URL (`protocol` may list several, most
    wanted first). stdin is sent until its EOF; with a tty there is no stderr stream."""
    with pinned():
        return await _exec(url, stdin, stdout, stderr, tty, resize, protocol, ssl_context)


async def _exec(url: str, stdin: asyncio.StreamReader | None, stdout: Output | None,
                stderr: Output | None, tty: bool, resize: asyncio.Queue[TerminalSize] | None,
                protocol: str, ssl_context: ssl.SSLContext | None) -> Outcome:
    offered = [p.strip() for p in protocol.split(",") if p.strip()]
    reader, writer, chosen = await upgrade(url, offered, ssl_context)
    chosen = chosen or "channel.k8s.io"  # a server that does not negotiate speaks v1
    if chosen not in offered or chosen not in SPDY_REMOTECOMMAND_PROTOCOLS:
        writer.close()
        raise UpgradeError(f"the server chose protocol {chosen!r}, not one of {offered}")
    session = SpdySession(reader, writer, client=True)
    run = session.start()
    tasks: list[asyncio.Task[Any]] = []
    try:
        def kind(name: str) -> list[tuple[str, str]]:
            return [("streamtype", name)]

        error = await session.create_stream(kind("error"))
        remote_stdin = (await session.create_stream(kind("stdin"))
                        if stdin is not None else None)
        remote_stdout = (await session.create_stream(kind("stdout"))
                         if stdout is not None else None)
        remote_stderr = (await session.create_stream(kind("stderr"))
                         if stderr is not None and not tty else None)
        remote_resize = (await session.create_stream(kind("resize"))
                         if tty and chosen in ("v4.channel.k8s.io", "v3.channel.k8s.io")
                         else None)
        status = asyncio.create_task(error.read_all())
        tasks.append(status)
        if stdin is not None and remote_stdin is not None:
            tasks.append(asyncio.create_task(_copy_in(stdin, remote_stdin)))
        if resize is not None and remote_resize is not None:
            tasks.append(asyncio.create_task(_send_sizes(resize, remote_resize)))
        outputs = [asyncio.create_task(_copy_out(s, out)) for s, out in
                   ((remote_stdout, stdout), (remote_stderr, stderr))
                   if s is not None and out is not None]
        tasks.extend(outputs)
        await asyncio.gather(*outputs)
        try:
            message = await asyncio.wait_for(status, STATUS_TIMEOUT)
        except TimeoutError:
            raise ConnectionError("the server did not report how the command ended") from None
        # The kubelet's server resets every stream after writing the status; only a
        # connection that died with nothing said is a failure.
        if not message and not error.fin_received and error.reset_status is None:
            raise ConnectionError("the streaming connection closed before the command's "
                                  "status arrived")
        return decode_error(chosen, message)
    finally:
        await cancel(*tasks)
        await session.close()
        await cancel(run)


async def spdy_port_forward(url: str, port: int, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter, *,
                            ssl_context: ssl.SSLContext | None = None,
                            request_id: int = 0) -> None:
    """Forward one local connection (`reader`/`writer`) to `port` in the pod, over a SPDY
    connection of its own; returns when the pod's side ends (then the local side gets
    EOF; closing `writer` is left to the caller). Raises PortForwardError with what the
    server reported."""
    with pinned():
        await _port_forward(url, port, reader, writer, ssl_context, request_id)


async def _port_forward(url: str, port: int, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, ssl_context: ssl.SSLContext | None,
                        request_id: int) -> None:
    r, w, chosen = await upgrade(url, SPDY_PORTFORWARD_PROTOCOLS, ssl_context)
    if chosen != SPDY_PORTFORWARD_PROTOCOLS[0]:
        w.close()
        raise UpgradeError(f"unable to negotiate protocol: client supports "
                           f"{SPDY_PORTFORWARD_PROTOCOLS[0]!r}, server returned {chosen!r}")
    session = SpdySession(r, w, client=True)
    run = session.start()
    up: asyncio.Task[None] | None = None
    status: asyncio.Task[bytes] | None = None
    try:
        common = [("port", str(port)), ("requestid", str(request_id))]
        error = await session.create_stream([("streamtype", "error"), *common])
        await error.close()  # nothing to say on it
        data = await session.create_stream([("streamtype", "data"), *common])
        status = asyncio.create_task(error.read_all())

        async def local_to_remote() -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(32 * 1024):
                    await data.write(chunk)
                await data.close()

        up = asyncio.create_task(local_to_remote())
        while chunk := await data.read():
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()
        try:
            message = await asyncio.wait_for(status, STATUS_TIMEOUT)
        except TimeoutError:
            message = b""
        if message:
            raise PortForwardError(f"an error occurred forwarding to port {port}: "
                                   f"{message.decode('utf-8', 'replace').strip()}")
    finally:
        await cancel(up, status)
        await session.close()
        await cancel(run)
