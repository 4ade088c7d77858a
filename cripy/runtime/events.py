"""Container lifecycle events for GetContainerEvents subscribers.

Publishing never waits: each subscriber has a bounded queue, and one that falls that far
behind is dropped (its stream ends) rather than slowing the daemon or the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CREATED, STARTED, STOPPED, DELETED = "created", "started", "stopped", "deleted"
QUEUE_LIMIT = 1000


@dataclass(frozen=True)
class Event:
    kind: str  # one of CREATED, STARTED, STOPPED, DELETED
    object_id: str  # a container ID, or a sandbox ID for the pod's own events
    sandbox_id: str
    created_at: int  # ns
    payload: Any  # what the server turns into the response (status snapshots)


class _Closed:
    """Queued after the last event of a subscriber that fell behind."""


class EventBus:
    def __init__(self, queue_limit: int = QUEUE_LIMIT) -> None:
        self.queue_limit = queue_limit
        self._subscribers: set[asyncio.Queue[Event | _Closed]] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, event: Event) -> None:
        for queue in list(self._subscribers):
            if queue.qsize() < self.queue_limit:
                queue.put_nowait(event)
                continue
            # The queue has one spare slot for the end: the subscriber gets every event
            # up to here, in order, then its stream ends and it can start afresh.
            log.warning("dropping an event subscriber that is %d events behind",
                        self.queue_limit)
            self._subscribers.discard(queue)
            queue.put_nowait(_Closed())

    async def subscribe(self) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event | _Closed] = asyncio.Queue(self.queue_limit + 1)
        self._subscribers.add(queue)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Closed):
                    return
                yield item
        finally:
            self._subscribers.discard(queue)
