"""GetContainerEvents: the stream the kubelet's evented PLEG listens to."""

from __future__ import annotations

from collections.abc import AsyncIterator

from cripy.api import api_pb2 as pb
from cripy.runtime.events import CREATED, DELETED, STARTED, STOPPED, Event, EventBus
from cripy.server.container import container_status
from cripy.server.rpc import Context, rpc_stream
from cripy.server.sandbox import pod_status

EVENT_TYPES = {
    CREATED: pb.CONTAINER_CREATED_EVENT,
    STARTED: pb.CONTAINER_STARTED_EVENT,
    STOPPED: pb.CONTAINER_STOPPED_EVENT,
    DELETED: pb.CONTAINER_DELETED_EVENT,
}


def event_response(event: Event) -> pb.ContainerEventResponse:
    sandbox, containers = event.payload
    return pb.ContainerEventResponse(
        container_id=event.object_id,
        container_event_type=EVENT_TYPES[event.kind],
        created_at=event.created_at,
        pod_sandbox_status=pod_status(sandbox) if sandbox is not None else None,
        containers_statuses=[container_status(c) for c in containers],
    )


class EventRpcs:
    events: EventBus

    @rpc_stream
    async def GetContainerEvents(
        self, request: pb.GetEventsRequest, context: Context
    ) -> AsyncIterator[pb.ContainerEventResponse]:
        async for event in self.events.subscribe():
            yield event_response(event)
