"""The seam between a transport (SPDY or WebSocket) and what it connects to.

A transport parses its frames into a `StreamSession` (stdin bytes, resize events, sinks
for stdout/stderr) and hands it to a `StreamBackend`, which runs the exec or attach and
returns how it ended. The transport then reports that on the error stream (as
cripy.streaming.remotecommand encodes it). Port forwarding hands out byte streams instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class TerminalSize:
    width: int
    height: int


class StreamSink(Protocol):
    """Output toward the client (one of stdout, stderr)."""

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


@dataclass
class StreamSession:
    """One exec or attach as the transport sees it.

    `stdin` yields the client's bytes and then None at end of input; it is None when the
    client asked for no stdin. `resize` carries window size changes (tty only). With a tty
    there is no stderr: the terminal merges both streams into stdout.
    """

    tty: bool
    stdin: asyncio.Queue[bytes | None] | None = None
    stdout: StreamSink | None = None
    stderr: StreamSink | None = None
    resize: asyncio.Queue[TerminalSize] | None = None


@dataclass(frozen=True)
class ExecTarget:
    container_id: str
    cmd: list[str]
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True)
class AttachTarget:
    container_id: str
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True)
class PortForwardTarget:
    sandbox_id: str
    ports: list[int] = field(default_factory=list)  # empty: any port the client names


@dataclass(frozen=True)
class Outcome:
    """How an exec or attach ended: an exit code, or an error message."""

    exit_code: int = 0
    error: str = ""


class StreamBackend(Protocol):
    async def exec(self, target: ExecTarget, session: StreamSession) -> Outcome: ...

    async def attach(self, target: AttachTarget, session: StreamSession) -> Outcome: ...

    async def open_port(
        self, target: PortForwardTarget, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to localhost:`port` inside the pod's network namespace."""
        ...
