"""RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus, ListPodSandbox."""

from __future__ import annotations

import json
import time

from google.protobuf.json_format import MessageToDict

from cripy.api import api_pb2 as pb
from cripy.runtime import pod_resources
from cripy.runtime.sandbox import SandboxManager
from cripy.runtime.store import PodState, Sandbox
from cripy.server.container import STATUSES
from cripy.server.listing import Encodings
from cripy.server.rpc import Context, rpc


def sandbox_state(sandbox: Sandbox) -> pb.PodSandboxState:
    return pb.SANDBOX_READY if sandbox.state == PodState.READY else pb.SANDBOX_NOTREADY


def pod_status(sandbox: Sandbox) -> pb.PodSandboxStatus:
    config, ips = sandbox.config, sandbox.ips
    return pb.PodSandboxStatus(
        id=sandbox.id,
        metadata=config.metadata,
        state=sandbox_state(sandbox),
        created_at=sandbox.created_at,
        network=pb.PodSandboxNetworkStatus(
            ip=ips[0] if ips else "", additional_ips=[pb.PodIP(ip=ip) for ip in ips[1:]]
        ),
        linux=pb.LinuxPodSandboxStatus(
            namespaces=pb.Namespace(options=config.linux.security_context.namespace_options)
        ),
        labels=config.labels,
        annotations=config.annotations,
        runtime_handler=sandbox.runtime_handler,
    )


def sandbox_item(s: Sandbox) -> pb.PodSandbox:
    """The pod as ListPodSandbox lists it."""
    return pb.PodSandbox(
        id=s.id, metadata=s.config.metadata, state=sandbox_state(s),
        created_at=s.created_at, labels=s.config.labels,
        annotations=s.config.annotations, runtime_handler=s.runtime_handler,
    )


_LISTED = Encodings(sandbox_item)
_STATUSES = Encodings(pod_status)


class SandboxRpcs:
    sandboxes: SandboxManager

    @rpc
    async def RunPodSandbox(
        self, request: pb.RunPodSandboxRequest, context: Context
    ) -> pb.RunPodSandboxResponse:
        sandbox = await self.sandboxes.run(request.config, request.runtime_handler)
        return pb.RunPodSandboxResponse(pod_sandbox_id=sandbox.id)

    @rpc
    async def StopPodSandbox(
        self, request: pb.StopPodSandboxRequest, context: Context
    ) -> pb.StopPodSandboxResponse:
        await self.sandboxes.stop(request.pod_sandbox_id)
        return pb.StopPodSandboxResponse()

    @rpc
    async def RemovePodSandbox(
        self, request: pb.RemovePodSandboxRequest, context: Context
    ) -> pb.RemovePodSandboxResponse:
        await self.sandboxes.remove(request.pod_sandbox_id)
        return pb.RemovePodSandboxResponse()

    @rpc
    async def PodSandboxStatus(
        self, request: pb.PodSandboxStatusRequest, context: Context
    ) -> pb.PodSandboxStatusResponse:
        sandbox = self.sandboxes.get(request.pod_sandbox_id)
        config = sandbox.config
        info = {}
        if request.verbose:
            info["info"] = json.dumps({
                "id": sandbox.id,
                "name": sandbox.name,
                "pid": sandbox.infra_pid,
                "namespaces": dict(sandbox.namespaces),
                "config": MessageToDict(config),
                "creationSteps": dict(sandbox.creation_steps),
            })
        response = _STATUSES.response(pb.PodSandboxStatusResponse, "status", (sandbox,))
        response.info.update(info)
        if request.verbose or self.sandboxes.config.runtime.enable_pod_events:
            # Both or neither: a timestamp without statuses tells the kubelet's evented
            # PLEG that the pod has no containers. Taken together, from memory.
            response.timestamp = time.time_ns()
            response.MergeFromString(STATUSES.field(
                pb.PodSandboxStatusResponse, "containers_statuses",
                self.sandboxes.containers.listed_in(sandbox.id)))
        return response

    @rpc
    async def UpdatePodSandboxResources(
        self, request: pb.UpdatePodSandboxResourcesRequest, context: Context
    ) -> pb.UpdatePodSandboxResourcesResponse:
        await pod_resources.update(self.sandboxes, request.pod_sandbox_id, request.overhead,
                                   request.resources)
        return pb.UpdatePodSandboxResourcesResponse()

    @rpc
    async def ListPodSandbox(
        self, request: pb.ListPodSandboxRequest, context: Context
    ) -> pb.ListPodSandboxResponse:
        flt = request.filter if request.HasField("filter") else None
        return _LISTED.response(pb.ListPodSandboxResponse, "items",
                                self.sandboxes.matching(flt))
