"""Exec, Attach and PortForward against real containers: the StreamBackend of the daemon.

Exec and attach are the OCI runtime's (cripy.oci.stream: runc in the foreground, conmon's
attach socket and control fifo); this checks the container and hands the session over.

PortForward connects to localhost:PORT inside the pod's network namespace: a short-lived
thread enters the pinned netns (setns), creates and connects the socket, and ends; the
socket stays in that namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import socket
import threading

from cripy.errors import (
    CripyError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from cripy.oci.runtime import OciRuntime
from cripy.oci.stream import StreamSessions
from cripy.runtime.container import ContainerManager
from cripy.runtime.sandbox import SandboxManager
from cripy.runtime.store import PodState
from cripy.streaming.session import (
    AttachTarget,
    ExecTarget,
    Outcome,
    PortForwardTarget,
    StreamSession,
)

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


class RuntimeStreamBackend:
    """The StreamBackend of the daemon: containers run by `oci`, pods by `sandboxes`."""

    #: How long a port-forward connection in the pod may take to be accepted.
    connect_timeout = 10.0

    def __init__(
        self, containers: ContainerManager, sandboxes: SandboxManager, oci: OciRuntime
    ) -> None:
        self.containers = containers
        self.sandboxes = sandboxes
        self.oci = oci
        self.sessions = StreamSessions(oci)

    async def exec(self, target: ExecTarget, session: StreamSession) -> Outcome:
        if not target.cmd:
            return Outcome(error="exec needs a command")
        try:
            container = await self.containers.get_running(target.container_id)
        except CripyError as exc:
            return Outcome(error=str(exc))
        return await self.sessions.exec(container.id, target, session)

    async def attach(self, target: AttachTarget, session: StreamSession) -> Outcome:
        try:
            container = await self.containers.get_running(target.container_id)
        except CripyError as exc:
            return Outcome(error=str(exc))
        return await self.sessions.attach(container.id, target, session,
                                          stdin_once=container.config.stdin_once)

    # -- port forward --------------------------------------------------------------------

    async def open_port(
        self, target: PortForwardTarget, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if not 0 < port < 65536:
            raise InvalidArgumentError(f"port {port} is out of range")
        if target.ports and port not in target.ports:
            raise InvalidArgumentError(f"port {port} was not requested for pod "
                                       f"{target.sandbox_id}")
        sandbox = self.sandboxes.get(target.sandbox_id)
        if sandbox.state != PodState.READY:
            raise FailedPreconditionError(f"pod sandbox {sandbox.id} is not ready")
        netns = sandbox.namespaces.get("net")  # None: host network, so the host's localhost
        try:
            sock = await _connect_in_netns(netns, port, self.connect_timeout)
        except ConnectionRefusedError:
            raise UnavailableError(
                f"pod {sandbox.id}: connection to localhost:{port} refused "
                "(nothing listens on that port)") from None
        except TimeoutError:
            raise UnavailableError(
                f"pod {sandbox.id}: connection to localhost:{port} timed out") from None
        except OSError as exc:
            raise UnavailableError(
                f"pod {sandbox.id}: cannot connect to localhost:{port}: "
                f"{exc.strerror or exc}") from None
        try:
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise


# -- helpers ----------------------------------------------------------------------------


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _connect_local(port: int, timeout: float) -> socket.socket:
    """A TCP connection to localhost:port, IPv4 first, then IPv6 if that is refused."""
    refused: OSError | None = None
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError:  # no IPv6 here
            continue
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            if not isinstance(refused, ConnectionRefusedError):
                refused = exc
    assert refused is not None
    raise refused


def _connect_thread(netns: str | None, port: int, timeout: float) -> socket.socket:
    """Runs in a thread of its own, which ends right after: its namespace never matters
    to anyone else, even if switching back failed."""
    if netns is None:
        return _connect_local(port, timeout)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, _CLONE_NEWNET)
        finally:
            os.close(target)
        try:
            return _connect_local(port, timeout)
        finally:
            with contextlib.suppress(OSError):
                _setns(own, _CLONE_NEWNET)
    finally:
        os.close(own)


async def _connect_in_netns(netns: str | None, port: int, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    result: asyncio.Future[socket.socket] = loop.create_future()

    def deliver(sock: socket.socket | None, exc: BaseException | None) -> None:
        if result.done():  # the caller gave up
            if sock is not None:
                sock.close()
        elif exc is not None:
            result.set_exception(exc)
        else:
            result.set_result(sock)  # type: ignore[arg-type]

    def run() -> None:
        sock: socket.socket | None = None
        error: BaseException | None = None
        try:
            sock = _connect_thread(netns, port, timeout)
        except BaseException as exc:  # handed to the event loop
            error = exc
        try:
            loop.call_soon_threadsafe(deliver, sock, error)
        except RuntimeError:  # the loop is closed
            if sock is not None:
                sock.close()

    threading.Thread(target=run, name=f"portforward-{port}", daemon=True).start()
    return await result
