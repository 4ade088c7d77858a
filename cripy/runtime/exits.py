"""Container exits noticed as conmon records them, without polling.

When a container's init process dies, conmon writes its exit code to
`<exit dir>/<container ID>` (into a temporary file renamed into place, or in place: the
watch takes IN_MOVED_TO and IN_CLOSE_WRITE). One inotify watch on that directory names the
container within milliseconds; the controller then reads the exit file, records the exit
and publishes the event, as for any other exit it notices.

A watch sees only what happens after it is set, and the kernel drops events when its queue
overflows. Both are covered by a full scan (every running container's exit file, in one
thread): once right after the watch is set, which also picks up the exits of a daemon
restart, and after every overflow. Should inotify be unavailable (the host's limit of
instances reached), the daemon says so in its log and scans every `fallback_interval`
seconds until a watch can be set.

One task does all the noticing, so a burst of exits (a pod's containers stopped at once)
is handled in one batch, and closing the watcher leaves no task and no descriptor behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

from cripy.oci.inotify import (
    IN_CLOSE_WRITE,
    IN_MOVED_TO,
    IN_ONLYDIR,
    WATCH_ENDED,
    Inotify,
    InotifyEvent,
)

log = logging.getLogger(__name__)

WATCH_MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_ONLYDIR

#: Told the names of files that were written (None: look at every running container).
Notice = Callable[[Collection[str] | None], Awaitable[None]]


class Batch:
    """What a run of inotify events asks for (sans-IO): the names written, or everything."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.everything = False
        self.watch_ended = False

    def add(self, events: list[InotifyEvent]) -> None:
        for event in events:
            if event.overflow:
                self.everything = True
            elif event.mask & WATCH_ENDED:
                self.watch_ended = True
                self.everything = True
            elif event.name and event.mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
                self.names.add(event.name)

    def __bool__(self) -> bool:
        return self.everything or bool(self.names)

    def take(self) -> Collection[str] | None:
        """The request (None: everything), and a fresh start."""
        request = None if self.everything else self.names
        self.names, self.everything, self.watch_ended = set(), False, False
        return request


class ExitWatcher:
    def __init__(self, directory: Path, notice: Notice, *,
                 fallback_interval: float = 1.0) -> None:
        self.directory = directory
        self.fallback_interval = fallback_interval
        self._notice = notice
        self._inotify: Inotify | None = None
        self._batch = Batch()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unwatchable = False  # said so in the log already

    @property
    def watching(self) -> bool:
        """Whether the inotify watch is set (else the fallback scan runs)."""
        return self._inotify is not None

    async def start(self) -> None:
        """Set the watch, then scan for what exited before it; from then on exits are
        noticed as they are written."""
        self._arm()
        if self._inotify is None:
            log.warning("exits are noticed by a scan of %s every %gs", self.directory,
                        self.fallback_interval)
        await self._notice(None)
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name="exit-watcher")

    async def close(self) -> None:
        """Stop watching: the descriptor is closed and the task ends."""
        self._disarm()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _arm(self) -> None:
        """Set the watch if it is not set; leave it unset (and say why) if it cannot be."""
        if self._inotify is not None:
            return
        inotify = None
        try:
            inotify = Inotify()
            inotify.add_watch(self.directory, WATCH_MASK)
        except OSError as exc:
            if inotify is not None:
                inotify.close()
            if not self._unwatchable:
                log.warning("cannot watch for container exits: %s", exc)
            self._unwatchable = True
            return
        asyncio.get_running_loop().add_reader(inotify.fileno(), self._readable)
        self._inotify = inotify
        if self._unwatchable:
            log.info("watching %s for container exits again", self.directory)
        self._unwatchable = False

    def _disarm(self) -> None:
        if self._inotify is None:
            return
        asyncio.get_running_loop().remove_reader(self._inotify.fileno())
        self._inotify.close()
        self._inotify = None

    def _readable(self) -> None:
        assert self._inotify is not None
        try:
            self._batch.add(self._inotify.read())
        except (OSError, ValueError) as exc:
            log.error("reading exit notifications failed (%s): scanning every container",
                      exc)
            self._batch.everything = True
        if self._batch.watch_ended:
            log.error("the watch of %s ended (the directory was removed or unmounted): "
                      "scanning it every %gs until it can be watched again",
                      self.directory, self.fallback_interval)
            self._disarm()
        if self._batch:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            if self._inotify is not None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.fallback_interval)
                self._arm()
                self._batch.everything = True  # with a new watch too: what came before it
            self._wake.clear()
            request = self._batch.take()
            try:
                await self._notice(request)
            except Exception:  # the watcher must outlive any one failure
                log.exception("noticing container exits failed")
