"""Where downloaded blob bytes go: straight into a layer being unpacked, or into memory.

A layer is not saved and then unpacked: each chunk the registry sends is handed to a
worker thread that hashes it (the blob digest), decompresses it, hashes the tar (the diff
ID) and applies it into its own staging directory while the rest is still arriving. The
event loop only moves chunks; a bounded `Feed` between the two keeps memory flat and slows
the download down when unpacking falls behind.

Nothing here decides whether the result is trusted: `finish()` returns the digest of the
bytes received and the caller compares it with the manifest before it asks for the unpack
result (`LayerSink.result()`) and commits the staged directory. An unpack error found
midway (a corrupt tar, a bomb) is held until then, and the rest of the blob is still
hashed, so a blob that does not match its digest is reported as that first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections import deque
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cripy.crashpoints import crash_point
from cripy.errors import CripyError, FailedPreconditionError
from cripy.fsutil import remove_tree

if TYPE_CHECKING:  # the tar and decompressor modules load with the first pull
    from cripy.image.layer import LayerResult

T = TypeVar("T")

FEED_LIMIT = 8 * 1024 * 1024  # bytes buffered per layer between download and unpack


class FeedAborted(Exception):
    """The producer gave up (a failed or cancelled download): stop reading."""


class Feed:
    """Chunks from the event loop to one reading thread, at most `limit` bytes buffered.

    `put()` (async) waits while the buffer is full; `read()` (blocking, in the thread)
    waits for data and returns b"" once `close()` was called and all is read.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = FEED_LIMIT) -> None:
        self._loop = loop
        self._limit = limit
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._closed = False
        self._aborted = False
        self._reader_gone: BaseException | None = None
        self._space = asyncio.Event()
        self._space.set()
        self._producer_waits = False

    # -- event loop side --

    async def put(self, chunk: bytes) -> None:
        while True:
            with self._cond:
                if self._reader_gone is not None:
                    raise RuntimeError("layer unpacking stopped") from self._reader_gone
                if self._buffered < self._limit:
                    self._chunks.append(chunk)
                    self._buffered += len(chunk)
                    self._cond.notify()
                    return
                self._space.clear()
                self._producer_waits = True
            await self._space.wait()

    def close(self) -> None:
        """No more data: the reader sees the end once it has read what is buffered."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def abort(self) -> None:
        """Drop what is buffered; the reader's next read raises FeedAborted."""
        with self._cond:
            self._aborted = True
            self._chunks.clear()
            self._buffered = 0
            self._cond.notify()

    # -- thread side --

    def read(self, size: int, /) -> bytes:
        with self._cond:
            while not self._chunks and not self._closed and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise FeedAborted()
            if not self._chunks:
                return b""
            head = self._chunks[0]
            if len(head) <= size:  # the usual case: whole chunks, no copy
                data = self._chunks.popleft()
            else:
                data, self._chunks[0] = head[:size], head[size:]
            self._buffered -= len(data)
            if self._producer_waits and self._buffered < self._limit:
                self._producer_waits = False
                self._loop.call_soon_threadsafe(self._space.set)
        return data

    def reader_gone(self, error: BaseException) -> None:
        """The reading thread ended unexpectedly: make the producer stop, not wait."""
        with self._cond:
            self._reader_gone = error
            self._loop.call_soon_threadsafe(self._space.set)


class _HashingReader:
    """Reads a Feed, hashing everything read (the blob digest covers the stored bytes)."""

    def __init__(self, feed: Feed) -> None:
        self._feed = feed
        self._sha = hashlib.sha256()

    def read(self, size: int, /) -> bytes:
        data = self._feed.read(size if size > 0 else 1 << 20)
        self._sha.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()


class BytesSink:
    """A small blob (an image config) kept in memory; hashed in a thread at the end."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.data = b""

    async def write(self, chunk: bytes) -> None:
        self._parts.append(chunk)

    async def finish(self) -> str:
        self.data = b"".join(self._parts)
        self._parts = []
        return await asyncio.to_thread(_sha256, self.data)

    async def discard(self) -> None:
        self._parts = []
        self.data = b""


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LayerSink:
    """One download of one layer, unpacked into `stage/diff` as the bytes arrive.

    The sink owns `stage` (an empty directory under the store's tmp/) until the caller
    commits it; `discard()` removes it. Its thread runs on `executor`.
    """

    def __init__(self, stage: Path, media_type: str, *, label: str, size: int,
                 max_bytes: int, allow_devices: bool, executor: Executor) -> None:
        self.stage = stage
        self._media_type = media_type
        self._label = label
        self._size = size
        self._max_bytes = max_bytes
        self._allow_devices = allow_devices
        self._received = 0
        loop = asyncio.get_running_loop()
        self._feed = Feed(loop)
        self._result: LayerResult | None = None
        self._error: CripyError | None = None
        self._work = loop.run_in_executor(executor, self._run)

    def _run(self) -> str:
        from cripy.image.layer import apply_layer_stream
        reader = _HashingReader(self._feed)
        try:
            try:
                try:
                    (self.stage / "diff").mkdir()
                except OSError as e:
                    raise FailedPreconditionError(
                        f"cannot stage {self._label}: {e.strerror}") from e
                self._result = apply_layer_stream(
                    reader, self._media_type, self.stage / "diff", label=self._label,
                    max_bytes=self._max_bytes, allow_devices=self._allow_devices)
            except CripyError as e:
                self._error = e  # reported once the blob digest is known to be right
            reader.drain()
            return reader.digest()
        except BaseException as e:
            self._feed.reader_gone(e)
            raise

    async def write(self, chunk: bytes) -> None:
        before = self._received
        self._received += len(chunk)
        await self._feed.put(chunk)
        if before * 2 < self._size <= self._received * 2:
            crash_point("pull-mid-layer")

    async def finish(self) -> str:
        """The digest of all bytes written, once the unpacking thread has used them."""
        self._feed.close()
        return await to_completion(self._work)

    def result(self) -> LayerResult:
        """What unpacking gave, or the error it met; call after `finish()`."""
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError("LayerSink.result() before finish()")
        return self._result

    async def discard(self) -> None:
        """Stop the thread, wait for it, and remove the staging directory."""
        self._feed.abort()
        with contextlib.suppress(Exception):  # its error no longer matters
            await to_completion(self._work)
        await to_completion(asyncio.ensure_future(asyncio.to_thread(remove_tree, self.stage)))


async def to_completion(work: asyncio.Future[T]) -> T:
    """Await `work`; if cancelled, let it finish first (a thread cannot be stopped, and
    cleanup racing a thread still writing would leave half a layer behind)."""
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        raise

