"""Small asyncio helpers shared by the servers and the runtime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks (None entries are skipped) and wait until they have ended."""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    if live:
        await asyncio.gather(*live, return_exceptions=True)


async def to_thread_to_the_end(func: Callable[..., T], *args: Any) -> T:
    """`asyncio.to_thread`, but a cancellation first waits for the thread to finish (its
    work, a mount say, cannot be stopped halfway), so whatever cleans up after the
    cancellation never races it."""
    future = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


async def all_done(*steps: Awaitable[Any]) -> list[Any]:
    """Run `steps` concurrently and let every one finish, even when another fails or the
    caller is cancelled (nothing keeps running behind the cleanup's back); then raise the
    first error, or return the results in order."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    gathered = asyncio.gather(*tasks, return_exceptions=True)
    try:
        results = await asyncio.shield(gathered)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await gathered
        raise
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
