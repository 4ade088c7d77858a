"""Exec, Attach and PortForward: validate the request, answer with a single-use URL on the
streaming server, where the kubelet (or cripy ctl) then speaks SPDY or WebSocket."""

from __future__ import annotations

from cripy.api import api_pb2 as pb
from cripy.errors import FailedPreconditionError, InvalidArgumentError
from cripy.runtime.container import ContainerManager
from cripy.runtime.sandbox import SandboxManager
from cripy.runtime.store import PodState
from cripy.server.rpc import Context, rpc
from cripy.streaming.server import StreamingServer
from cripy.streaming.session import AttachTarget, ExecTarget, PortForwardTarget


def _streams(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    if not (stdin or stdout or stderr):
        raise InvalidArgumentError("one of stdin, stdout and stderr must be requested")
    if tty and stderr:
        raise InvalidArgumentError("tty and stderr cannot both be true: a terminal merges them")


class StreamingRpcs:
    containers: ContainerManager
    sandboxes: SandboxManager
    streaming: StreamingServer

    @rpc
    async def Exec(self, request: pb.ExecRequest, context: Context) -> pb.ExecResponse:
        _streams(request.tty, request.stdin, request.stdout, request.stderr)
        if not request.cmd:
            raise InvalidArgumentError("exec command is empty")
        container = await self.containers.get_running(request.container_id)
        target = ExecTarget(container.id, list(request.cmd), request.tty, request.stdin,
                            request.stdout, request.stderr)
        return pb.ExecResponse(url=self.streaming.url_for(target))

    @rpc
    async def Attach(self, request: pb.AttachRequest, context: Context) -> pb.AttachResponse:
        _streams(request.tty, request.stdin, request.stdout, request.stderr)
        container = await self.containers.get_running(request.container_id)
        target = AttachTarget(container.id, request.tty, request.stdin, request.stdout,
                              request.stderr)
        return pb.AttachResponse(url=self.streaming.url_for(target))

    @rpc
    async def PortForward(
        self, request: pb.PortForwardRequest, context: Context
    ) -> pb.PortForwardResponse:
        sandbox = self.sandboxes.get(request.pod_sandbox_id)
        if sandbox.state != PodState.READY:
            raise FailedPreconditionError(f"pod sandbox {sandbox.id} is not ready")
        for port in request.port:
            if not 0 < port < 65536:
                raise InvalidArgumentError(f"port {port} is out of range")
        target = PortForwardTarget(sandbox.id, list(request.port))
        return pb.PortForwardResponse(url=self.streaming.url_for(target))
