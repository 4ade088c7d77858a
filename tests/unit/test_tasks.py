"""The asyncio helpers: steps run side by side to their end, threads finish first."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from cripy.storage.overlay import mount_flags
from cripy.tasks import all_done, to_thread_to_the_end


def test_all_done_returns_the_results_in_order() -> None:
    async def value(v: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return v

    assert asyncio.run(all_done(value(1, 0.02), value(2, 0.0))) == [1, 2]


def test_all_done_lets_every_step_finish_before_it_raises() -> None:
    finished: list[str] = []

    async def fail() -> None:
        raise ValueError("first")

    async def slow() -> None:
        await asyncio.sleep(0.05)
        finished.append("slow")

    with pytest.raises(ValueError, match="first"):
        asyncio.run(all_done(fail(), slow()))
    assert finished == ["slow"]  # not cancelled: it ran to its end before the error


def test_a_cancelled_caller_still_waits_for_its_steps() -> None:
    finished: list[str] = []

    async def slow() -> None:
        await asyncio.sleep(0.05)
        finished.append("slow")

    async def main() -> None:
        task = asyncio.create_task(all_done(slow()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished == ["slow"]

    asyncio.run(main())


def test_a_cancelled_thread_finishes_before_the_cancellation_goes_on() -> None:
    done = threading.Event()

    def work() -> None:
        time.sleep(0.05)
        done.set()

    async def main() -> None:
        task = asyncio.create_task(to_thread_to_the_end(work))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done.is_set()

    asyncio.run(main())
    assert asyncio.run(to_thread_to_the_end(lambda: 7)) == 7


def test_mount_options_split_into_flags_and_data() -> None:
    assert mount_flags("nosuid,nodev,noexec,mode=1777,size=65536k") == (
        0x2 | 0x4 | 0x8, "mode=1777,size=65536k")
    assert mount_flags("ro") == (0x1, "")
    assert mount_flags("") == (0, "")
