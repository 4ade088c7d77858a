"""NRI events: subscription masks and the Plugin-service method of each event.

Facts relied on (NRI's api package): a subscription mask has bit (event - 1) set for each
subscribed Event; the valid events are those below Event.LAST; a plugin that answers
Configure with an empty mask is subscribed to every event, one with bits outside the valid
ones is refused.
"""

from __future__ import annotations

from cripy.nri import api_pb2

ALL_EVENTS = (1 << (api_pb2.LAST - 1)) - 1

#: The Plugin-service method that delivers each event.
EVENT_METHOD: dict[int, str] = {
    api_pb2.RUN_POD_SANDBOX: "RunPodSandbox",
    api_pb2.STOP_POD_SANDBOX: "StopPodSandbox",
    api_pb2.REMOVE_POD_SANDBOX: "RemovePodSandbox",
    api_pb2.CREATE_CONTAINER: "CreateContainer",
    api_pb2.POST_CREATE_CONTAINER: "PostCreateContainer",
    api_pb2.START_CONTAINER: "StartContainer",
    api_pb2.POST_START_CONTAINER: "PostStartContainer",
    api_pb2.UPDATE_CONTAINER: "UpdateContainer",
    api_pb2.POST_UPDATE_CONTAINER: "PostUpdateContainer",
    api_pb2.STOP_CONTAINER: "StopContainer",
    api_pb2.REMOVE_CONTAINER: "RemoveContainer",
    api_pb2.UPDATE_POD_SANDBOX: "UpdatePodSandbox",
    api_pb2.POST_UPDATE_POD_SANDBOX: "PostUpdatePodSandbox",
    api_pb2.VALIDATE_CONTAINER_ADJUSTMENT: "ValidateContainerAdjustment",
}
METHOD_EVENT: dict[str, int] = {m: e for e, m in EVENT_METHOD.items()}

#: Events that are pure notifications: NRI v0.12 has an RPC for each, and older plugin
#: stubs get them through StateChange (the runtime falls back on UNIMPLEMENTED).
NOTIFICATION_EVENTS = frozenset(
    {
        api_pb2.RUN_POD_SANDBOX,
        api_pb2.STOP_POD_SANDBOX,
        api_pb2.REMOVE_POD_SANDBOX,
        api_pb2.POST_CREATE_CONTAINER,
        api_pb2.START_CONTAINER,
        api_pb2.POST_START_CONTAINER,
        api_pb2.POST_UPDATE_CONTAINER,
        api_pb2.REMOVE_CONTAINER,
        api_pb2.POST_UPDATE_POD_SANDBOX,
    }
)


def event_bit(event: int) -> int:
    if not api_pb2.UNKNOWN < event < api_pb2.LAST:
        raise ValueError(f"not an NRI event: {event}")
    return 1 << (event - 1)


def event_mask(*events: int) -> int:
    mask = 0
    for event in events:
        mask |= event_bit(event)
    return mask


def is_subscribed(mask: int, event: int) -> bool:
    return bool(mask & event_bit(event))


def check_mask(mask: int) -> int:
    """The effective subscription of a ConfigureResponse.events value."""
    if mask == 0:
        return ALL_EVENTS
    extra = mask & ~ALL_EVENTS
    if extra:
        raise ValueError(f"invalid plugin events: 0x{extra:x}")
    return mask


def event_names(mask: int) -> list[str]:
    """Method names of the events in a mask, in event order."""
    return [EVENT_METHOD[e] for e in sorted(EVENT_METHOD) if mask & event_bit(e)]


def parse_events(names: str) -> int:
    """A mask from a comma-separated list of method names (any case) or "all"."""
    mask = 0
    by_lower = {m.lower(): e for m, e in METHOD_EVENT.items()}
    for raw in names.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name == "all":
            mask |= ALL_EVENTS
            continue
        if name not in by_lower:
            raise ValueError(f"unknown NRI event {raw.strip()!r}")
        mask |= event_bit(by_lower[name])
    return mask
