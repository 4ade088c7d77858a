from __future__ import annotations

import asyncio

from cripy.runtime.events import CREATED, STOPPED, Event, EventBus


def event(n: int, kind: str = CREATED) -> Event:
    return Event(kind, f"c{n}", "pod", n, None)


def test_every_subscriber_gets_every_event_in_order() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        bus = EventBus()
        first, second = bus.subscribe(), bus.subscribe()
        got_first: list[str] = []
        got_second: list[str] = []

        async def read(stream: object, into: list[str]) -> None:
            async for e in stream:  # type: ignore[attr-defined]
                into.append(e.object_id)
                if len(into) == 3:
                    return

        readers = [asyncio.create_task(read(first, got_first)),
                   asyncio.create_task(read(second, got_second))]
        await asyncio.sleep(0)
        for n in range(3):
            bus.publish(event(n))
        await asyncio.gather(*readers)
        return got_first, got_second

    assert asyncio.run(scenario()) == (["c0", "c1", "c2"], ["c0", "c1", "c2"])


def test_a_slow_subscriber_is_dropped_without_blocking_others() -> None:
    async def scenario() -> tuple[int, list[str], list[str]]:
        bus = EventBus(queue_limit=5)
        slow_got: list[str] = []
        fast_got: list[str] = []
        stuck = asyncio.Event()

        async def read_slow() -> None:
            async for e in bus.subscribe():
                slow_got.append(e.object_id)
                await stuck.wait()  # never reads again

        async def read_fast() -> None:
            async for e in bus.subscribe():
                fast_got.append(e.object_id)
                if len(fast_got) == 20:
                    return

        slow_task = asyncio.create_task(read_slow())
        fast_task = asyncio.create_task(read_fast())
        await asyncio.sleep(0)
        for n in range(20):
            bus.publish(event(n, STOPPED))  # never waits, however far behind slow is
            await asyncio.sleep(0)
        await asyncio.wait_for(fast_task, 5)
        count = bus.subscriber_count
        stuck.set()  # the slow one reads again: what was queued, then its stream ends
        await asyncio.wait_for(slow_task, 5)
        return count, fast_got, slow_got

    count, fast_got, slow_got = asyncio.run(scenario())
    assert fast_got == [f"c{n}" for n in range(20)]
    assert count <= 1  # the slow subscriber was unsubscribed while it lagged
    # It got what fit in its queue and then an end, not the rest of the events.
    assert slow_got == [f"c{n}" for n in range(len(slow_got))]
    assert len(slow_got) == 6  # the one it read, then the five its queue held
