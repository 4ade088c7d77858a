"""The exit watcher's parts: inotify event parsing, batching, and the watcher itself on a
real inotify instance over a temporary directory (no root, no conmon)."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Collection
from pathlib import Path

import pytest

from cripy.fsutil import atomic_write
from cripy.oci.inotify import (
    HEADER,
    IN_CLOSE_WRITE,
    IN_IGNORED,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Inotify,
    InotifyEvent,
    parse_events,
)
from cripy.runtime.exits import WATCH_MASK, Batch, ExitWatcher


def raw(wd: int, mask: int, name: str = "", cookie: int = 0, pad: int = 16) -> bytes:
    """One event as the kernel encodes it: the name NUL-padded to a multiple of `pad`."""
    encoded = name.encode()
    length = 0 if not name else (len(encoded) // pad + 1) * pad
    return HEADER.pack(wd, mask, cookie, length) + encoded.ljust(length, b"\0")


# --- parsing ----------------------------------------------------------------------------


def test_events_are_parsed_with_their_names() -> None:
    data = raw(1, IN_MOVED_TO, "a" * 64, cookie=7) + raw(1, IN_CLOSE_WRITE, "b") + \
        raw(-1, IN_Q_OVERFLOW)
    assert parse_events(data) == [
        InotifyEvent(1, IN_MOVED_TO, 7, "a" * 64), InotifyEvent(1, IN_CLOSE_WRITE, 0, "b"),
        InotifyEvent(-1, IN_Q_OVERFLOW, 0, "")]
    assert [e.overflow for e in parse_events(data)] == [False, False, True]
    assert parse_events(b"") == []


def test_a_name_that_is_not_utf8_survives() -> None:
    data = HEADER.pack(1, IN_MOVED_TO, 0, 16) + b"\xffid".ljust(16, b"\0")
    (event,) = parse_events(data)
    assert os.fsencode(event.name) == b"\xffid"


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size + 3])
def test_data_ending_inside_an_event_is_refused(cut: int) -> None:
    data = raw(1, IN_MOVED_TO, "abc")
    with pytest.raises(ValueError, match="inotify"):
        parse_events(data + data[:cut])


def test_the_kernel_reports_a_rename_into_the_directory(tmp_path: Path) -> None:
    inotify = Inotify()
    try:
        wd = inotify.add_watch(tmp_path, WATCH_MASK)
        assert inotify.read() == []  # non-blocking: nothing yet
        atomic_write(tmp_path / "abc", b"0")  # a temporary file, renamed into place
        (tmp_path / "plain").write_text("1")
        events = inotify.read()
        assert all(e.wd == wd for e in events)
        assert [(e.name, e.mask) for e in events if not e.name.startswith(".")] == [
            ("abc", IN_MOVED_TO), ("plain", IN_CLOSE_WRITE)]
    finally:
        inotify.close()
    assert inotify.closed


def test_watching_a_missing_directory_says_which(tmp_path: Path) -> None:
    inotify = Inotify()
    try:
        with pytest.raises(OSError, match="inotify_add_watch .*missing"):
            inotify.add_watch(tmp_path / "missing", WATCH_MASK)
    finally:
        inotify.close()


# --- batching ---------------------------------------------------------------------------


def test_a_batch_collects_written_names_until_taken() -> None:
    batch = Batch()
    assert not batch
    batch.add(parse_events(raw(1, IN_MOVED_TO, "c1") + raw(1, IN_CLOSE_WRITE, "c2") +
                           raw(1, IN_MOVED_TO, "c1")))
    assert batch
    assert batch.take() == {"c1", "c2"}
    assert not batch and batch.take() == set()


def test_an_overflow_or_a_lost_watch_asks_for_everything() -> None:
    for event in (raw(-1, IN_Q_OVERFLOW), raw(1, IN_IGNORED)):
        batch = Batch()
        batch.add(parse_events(raw(1, IN_MOVED_TO, "c1") + event))
        assert batch.take() is None
        assert batch.take() == set()


# --- the watcher ------------------------------------------------------------------------


class Recorder:
    """A notice callback that remembers what it was asked."""

    def __init__(self, fail_first: bool = False) -> None:
        self.calls: list[Collection[str] | None] = []
        self.fail_first = fail_first
        self.called = asyncio.Event()

    async def __call__(self, names: Collection[str] | None) -> None:
        self.calls.append(None if names is None else set(names))
        self.called.set()
        if self.fail_first and len(self.calls) == 2:
            raise RuntimeError("a bad moment")

    async def next_call(self) -> Collection[str] | None:
        self.called.clear()
        await asyncio.wait_for(self.called.wait(), 5)
        return self.calls[-1]

    def names(self) -> set[str]:
        return {n for call in self.calls if call is not None for n in call}


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_the_watcher_scans_once_then_reports_each_exit_file(tmp_path: Path) -> None:
    async def main() -> None:
        (tmp_path / "before").write_text("0")  # written before the watch: the scan's
        fds = open_fds()
        notice = Recorder()
        watcher = ExitWatcher(tmp_path, notice)
        await watcher.start()
        assert watcher.watching
        assert notice.calls == [None]
        atomic_write(tmp_path / "c1", b"3")
        while "c1" not in notice.names():
            await notice.next_call()
        (tmp_path / "c2").write_text("0")
        while "c2" not in notice.names():
            await notice.next_call()
        assert notice.calls.count(None) == 1
        await watcher.close()
        assert open_fds() == fds
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "exit-watcher"]

    asyncio.run(main())


def test_a_failing_notice_does_not_end_the_watch(tmp_path: Path) -> None:
    async def main() -> None:
        notice = Recorder(fail_first=True)
        watcher = ExitWatcher(tmp_path, notice)
        await watcher.start()
        try:
            (tmp_path / "c1").write_text("1")
            await notice.next_call()  # raises inside the watcher, which logs it
            (tmp_path / "c2").write_text("2")
            while "c2" not in notice.names():
                await notice.next_call()
        finally:
            await watcher.close()

    asyncio.run(main())


def test_without_a_watch_the_directory_is_scanned_until_one_can_be_set(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    exits = tmp_path / "exits"

    async def main() -> None:
        notice = Recorder()
        watcher = ExitWatcher(exits, notice, fallback_interval=0.02)
        await watcher.start()
        try:
            assert not watcher.watching
            assert await notice.next_call() is None  # the fallback scan
            exits.mkdir()
            while not watcher.watching:
                await notice.next_call()
            (exits / "c1").write_text("0")
            while "c1" not in notice.names():
                await notice.next_call()
        finally:
            await watcher.close()

    asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cannot watch for container exits" in w and "exits" in w for w in warnings)
    assert len([w for w in warnings if "cannot watch" in w]) == 1  # said once, not per scan


def test_a_removed_directory_falls_back_to_scanning(tmp_path: Path) -> None:
    exits = tmp_path / "exits"
    exits.mkdir()

    async def main() -> None:
        notice = Recorder()
        watcher = ExitWatcher(exits, notice, fallback_interval=0.02)
        await watcher.start()
        try:
            exits.rmdir()
            while watcher.watching:
                await notice.next_call()
            assert await notice.next_call() is None
        finally:
            await watcher.close()

    asyncio.run(main())


def test_the_header_is_the_kernels() -> None:
    # struct inotify_event: int wd; uint32_t mask, cookie, len; char name[].
    assert HEADER.size == struct.calcsize("iIII") == 16
