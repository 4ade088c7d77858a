"""How long each step of an operation took (a pod's or a container's creation, a pod's
teardown): for PodSandboxStatus / ContainerStatus verbose info and the step histograms.

Steps may run concurrently. A step's figure is then its share of the wall clock: while
several steps run at once, that time is split evenly between them. So the figures of one
operation never add up to more than the time its steps took together, and a step that
ran alone gets exactly its own duration.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TypeVar

T = TypeVar("T")


class Steps:
    """The named steps of one operation, timed with a monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.started = clock()
        self._spans: list[tuple[str, float, float]] = []  # (step, start, end)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block as step `name` (a step run twice adds up); an exception still
        counts the time spent."""
        start = self._clock()
        try:
            yield
        finally:
            self._spans.append((name, start, self._clock()))

    def begin(self, name: str) -> Callable[[], None]:
        """Start step `name`; the function returned ends it (for a step that is not one
        block of code)."""
        start = self._clock()
        return lambda: self._spans.append((name, start, self._clock()))

    async def timed(self, name: str, awaitable: Awaitable[T]) -> T:
        """Await `awaitable` as step `name`."""
        with self.step(name):
            return await awaitable

    def elapsed(self) -> float:
        """Seconds since this operation started."""
        return self._clock() - self.started

    def durations(self) -> dict[str, float]:
        """Each step's seconds (its share of the wall clock, see the module docstring), in
        the order the steps started."""
        return share_of_wall_clock(self._spans)


def share_of_wall_clock(spans: list[tuple[str, float, float]]) -> dict[str, float]:
    """(step, start, end) spans -> step -> seconds, time that steps overlap split evenly
    between them."""
    order = sorted(range(len(spans)), key=lambda i: spans[i][1])
    result = {spans[i][0]: 0.0 for i in order}
    edges = sorted({t for _, start, end in spans for t in (start, end)})
    for low, high in zip(edges, edges[1:], strict=False):
        active = [name for name, start, end in spans if start <= low and end >= high]
        for name in active:
            result[name] += (high - low) / len(active)
    return result


def merged(steps: Mapping[str, float], more: Mapping[str, float]) -> dict[str, float]:
    """`steps` with `more` added (a later step, such as a container's start)."""
    out = dict(steps)
    for name, seconds in more.items():
        out[name] = out.get(name, 0.0) + seconds
    return out
