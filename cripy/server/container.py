"""The container RPCs: create/start/stop/remove, status and list, update, exec, logs."""

from __future__ import annotations

import json
import time

from cripy.api import api_pb2 as pb
from cripy.errors import DeadlineExceededError, InvalidArgumentError
from cripy.oci import signals
from cripy.runtime.container import ContainerManager
from cripy.runtime.store import Container
from cripy.server.listing import Encodings
from cripy.server.rpc import Context, rpc


def container_status(c: Container) -> pb.ContainerStatus:
    return pb.ContainerStatus(
        id=c.id, metadata=c.config.metadata, state=c.pb_state,
        created_at=c.created_at, started_at=c.started_at, finished_at=c.finished_at,
        exit_code=c.exit_code, image=c.config.image, image_ref=c.image_id,
        reason=c.reason, message=c.message, labels=c.config.labels,
        annotations=c.config.annotations, mounts=c.config.mounts, log_path=c.log_path,
        image_id=c.image_id,
        resources=pb.ContainerResources(linux=c.config.linux.resources),
        stop_signal=c.config.stop_signal or signals.to_pb(c.stop_signal),
        user=pb.ContainerUser(linux=pb.LinuxContainerUser(
            uid=c.user[0], gid=c.user[1], supplemental_groups=c.user[2:])) if c.user else None,
    )


def container_item(c: Container) -> pb.Container:
    """The container as ListContainers lists it."""
    return pb.Container(
        id=c.id, pod_sandbox_id=c.sandbox_id, metadata=c.config.metadata,
        image=c.config.image, image_ref=c.image_id, state=c.pb_state,
        created_at=c.created_at, labels=c.config.labels,
        annotations=c.config.annotations, image_id=c.image_id,
    )


_LISTED = Encodings(container_item)
STATUSES = Encodings(container_status)


class ContainerRpcs:
    containers: ContainerManager

    @rpc
    async def CreateContainer(
        self, request: pb.CreateContainerRequest, context: Context
    ) -> pb.CreateContainerResponse:
        container = await self.containers.create(
            request.pod_sandbox_id, request.config, request.sandbox_config)
        return pb.CreateContainerResponse(container_id=container.id)

    @rpc
    async def StartContainer(
        self, request: pb.StartContainerRequest, context: Context
    ) -> pb.StartContainerResponse:
        await self.containers.start(request.container_id)
        return pb.StartContainerResponse()

    @rpc
    async def StopContainer(
        self, request: pb.StopContainerRequest, context: Context
    ) -> pb.StopContainerResponse:
        await self.containers.stop(request.container_id, request.timeout)
        return pb.StopContainerResponse()

    @rpc
    async def RemoveContainer(
        self, request: pb.RemoveContainerRequest, context: Context
    ) -> pb.RemoveContainerResponse:
        await self.containers.remove(request.container_id)
        return pb.RemoveContainerResponse()

    @rpc
    async def ListContainers(
        self, request: pb.ListContainersRequest, context: Context
    ) -> pb.ListContainersResponse:
        flt = request.filter if request.HasField("filter") else None
        return _LISTED.response(pb.ListContainersResponse, "containers",
                                await self.containers.matching(flt))

    @rpc
    async def ContainerStatus(
        self, request: pb.ContainerStatusRequest, context: Context
    ) -> pb.ContainerStatusResponse:
        c = await self.containers.get(request.container_id)
        info = {}
        if request.verbose:
            info["info"] = json.dumps({
                "id": c.id, "sandboxID": c.sandbox_id, "pid": c.pid, "name": c.name,
                "creationSteps": dict(c.creation_steps),
                "runtimeSpec": await self.containers.runtime_spec(c.id)})
        response = STATUSES.response(pb.ContainerStatusResponse, "status", (c,))
        response.info.update(info)
        return response

    @rpc
    async def UpdateContainerResources(
        self, request: pb.UpdateContainerResourcesRequest, context: Context
    ) -> pb.UpdateContainerResourcesResponse:
        await self.containers.update_resources(request.container_id, request.linux)
        return pb.UpdateContainerResourcesResponse()

    @rpc
    async def ExecSync(
        self, request: pb.ExecSyncRequest, context: Context
    ) -> pb.ExecSyncResponse:
        started = time.monotonic()
        result = await self.containers.exec_sync(
            request.container_id, list(request.cmd), request.timeout or None)
        if result.timed_out:
            raise DeadlineExceededError(
                f"command {list(request.cmd)!r} timed out after "
                f"{time.monotonic() - started:.1f}s (timeout {request.timeout}s)")
        return pb.ExecSyncResponse(
            stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)

    @rpc
    async def CheckpointContainer(
        self, request: pb.CheckpointContainerRequest, context: Context
    ) -> pb.CheckpointContainerResponse:
        if not request.container_id:
            raise InvalidArgumentError("container_id is empty")
        await self.containers.checkpoints.checkpoint(
            request.container_id, request.location, float(request.timeout))
        return pb.CheckpointContainerResponse()

    @rpc
    async def ReopenContainerLog(
        self, request: pb.ReopenContainerLogRequest, context: Context
    ) -> pb.ReopenContainerLogResponse:
        await self.containers.reopen_log(request.container_id)
        return pb.ReopenContainerLogResponse()
