"""CRI log parsing (sans-IO), partial-line joining, tail, and the follow reader."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cripy.cli.crilog import (
    LineJoiner,
    LogFile,
    LogFormatError,
    LogLine,
    Timestamp,
    follow,
    parse_log,
    parse_record,
    select,
    tail,
)

T0 = "2024-03-01T10:00:00.000000001Z"
T1 = "2024-03-01T10:00:01.5Z"
T2 = "2024-03-01T10:00:02Z"


def rec(ts: str, stream: str, tag: str, content: str) -> bytes:
    return f"{ts} {stream} {tag} {content}\n".encode()


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


# --- timestamps -----------------------------------------------------------------------


def test_timestamp_parse_and_format_round_trip() -> None:
    ts = Timestamp.parse("2016-10-06T00:17:09.669794202Z")
    assert ts.nanos == 1475713029_669794202
    assert ts.offset == 0
    assert ts.format() == "2016-10-06T00:17:09.669794202Z"


@pytest.mark.parametrize(("text", "formatted"), [
    ("2024-03-01T10:00:00.500000000Z", "2024-03-01T10:00:00.5Z"),
    ("2024-03-01T10:00:00.000000000Z", "2024-03-01T10:00:00Z"),
    ("2024-03-01T10:00:00Z", "2024-03-01T10:00:00Z"),
    ("2024-03-01T10:00:00.123+02:00", "2024-03-01T10:00:00.123+02:00"),
    ("2024-03-01T10:00:00-05:30", "2024-03-01T10:00:00-05:30"),
    ("2024-03-01t10:00:00z", "2024-03-01T10:00:00Z"),
])
def test_timestamp_format_like_go_rfc3339nano(text: str, formatted: str) -> None:
    assert Timestamp.parse(text).format() == formatted


def test_timestamp_offsets_name_the_same_instant() -> None:
    assert (Timestamp.parse("2024-03-01T12:00:00+02:00").nanos
            == Timestamp.parse("2024-03-01T10:00:00Z").nanos)
    assert (Timestamp.parse("2024-03-01T04:30:00-05:30").nanos
            == Timestamp.parse("2024-03-01T10:00:00Z").nanos)


@pytest.mark.parametrize("text", [
    "", "2024-03-01", "2024-03-01T10:00:00", "2024-02-30T10:00:00Z", "2024-03-01T25:00:00Z",
    "2024-03-01T10:00:00.1234567890Z", "yesterday", "2024-03-01 10:00:00Z",
])
def test_bad_timestamps(text: str) -> None:
    with pytest.raises(LogFormatError):
        Timestamp.parse(text)


# --- records --------------------------------------------------------------------------


def test_parse_full_record() -> None:
    record = parse_record(b"2016-10-06T00:17:09.669794202Z stdout F log content 1\n")
    assert record.stream == "stdout"
    assert not record.partial
    assert record.content == b"log content 1"
    assert record.timestamp.format() == "2016-10-06T00:17:09.669794202Z"


def test_parse_partial_stderr_record_with_extra_tags() -> None:
    record = parse_record(rec(T0, "stderr", "P:extra:tags", "  spaced  ").rstrip(b"\n"))
    assert record.stream == "stderr"
    assert record.partial
    assert record.content == b"  spaced  "


def test_parse_keeps_binary_content_and_empty_lines() -> None:
    assert parse_record(f"{T0} stdout F \xff\x00 x".encode("latin-1")).content == b"\xff\x00 x"
    assert parse_record(rec(T0, "stdout", "F", "")).content == b""
    assert parse_record(f"{T0} stdout F".encode()).content == b""


@pytest.mark.parametrize("line", [
    b"", b"garbage", f"{T0} stdout".encode(), f"{T0} stdin F x".encode(),
    b"not-a-time stdout F x", f"{T0} stdout  x".encode(), b"\xff\xfe stdout F x",
])
def test_malformed_records(line: bytes) -> None:
    with pytest.raises(LogFormatError):
        parse_record(line)


# --- joining --------------------------------------------------------------------------


def test_partial_records_join_into_one_line() -> None:
    data = rec(T0, "stdout", "P", "hel") + rec(T1, "stdout", "P", "lo ") + rec(
        T2, "stdout", "F", "world")
    [line] = parse_log(data)
    assert line == LogLine(Timestamp.parse(T0), "stdout", b"hello world")
    assert line.render() == b"hello world\n"
    assert line.render(timestamps=True) == b"2024-03-01T10:00:00.000000001Z hello world\n"


def test_streams_are_joined_separately() -> None:
    data = (rec(T0, "stdout", "P", "out-")
            + rec(T0, "stderr", "P", "err-")
            + rec(T1, "stderr", "F", "done")
            + rec(T2, "stdout", "F", "done"))
    lines = parse_log(data)
    assert [(line.stream, line.content) for line in lines] == [
        ("stderr", b"err-done"), ("stdout", b"out-done")]


def test_any_chunking_gives_the_same_lines() -> None:
    data = (rec(T0, "stdout", "F", "one") + rec(T1, "stderr", "P", "tw")
            + rec(T1, "stderr", "F", "o") + rec(T2, "stdout", "F", "three"))
    expected = parse_log(data)
    for size in (1, 2, 7, 13, 64):
        joiner = LineJoiner()
        got: list[LogLine] = []
        for start in range(0, len(data), size):
            got += joiner.feed(data[start:start + size])
        got += joiner.flush()
        assert got == expected


def test_malformed_lines_are_skipped_and_counted() -> None:
    joiner = LineJoiner()
    data = (rec(T0, "stdout", "F", "ok1") + b"junk line\n" + b"\n"
            + rec(T1, "stdin", "F", "bad stream") + rec(T2, "stdout", "F", "ok2"))
    lines = joiner.feed(data) + joiner.flush()
    assert [line.content for line in lines] == [b"ok1", b"ok2"]
    assert joiner.malformed == 2


def test_unfinished_data_waits_until_flush() -> None:
    joiner = LineJoiner()
    assert joiner.feed(rec(T0, "stdout", "P", "half")) == []
    assert joiner.feed(f"{T1} stdout F no newline yet".encode()) == []
    lines = joiner.flush()
    assert [(line.content, line.complete) for line in lines] == [(b"halfno newline yet", True)]


def test_flush_emits_dangling_partial_without_newline() -> None:
    joiner = LineJoiner()
    joiner.feed(rec(T1, "stderr", "P", "late") + rec(T0, "stdout", "P", "early"))
    lines = joiner.flush()
    assert [(line.stream, line.content, line.complete) for line in lines] == [
        ("stdout", b"early", False), ("stderr", b"late", False)]
    assert lines[0].render() == b"early"
    assert joiner.flush() == []


# --- tail and selection ---------------------------------------------------------------


def _lines(n: int) -> list[LogLine]:
    return [LogLine(Timestamp(i * 1_000_000_000), "stdout" if i % 2 else "stderr",
                    f"line {i}".encode()) for i in range(n)]


def test_tail() -> None:
    lines = _lines(5)
    assert tail(lines, -1) == lines
    assert tail(lines, 0) == []
    assert tail(lines, 2) == lines[3:]
    assert tail(lines, 10) == lines
    assert tail(iter(lines), 1) == lines[4:]


def test_tail_counts_joined_lines_of_both_streams() -> None:
    data = (rec(T0, "stdout", "F", "a") + rec(T1, "stderr", "P", "b1")
            + rec(T1, "stderr", "F", "b2") + rec(T2, "stdout", "F", "c"))
    assert [line.content for line in tail(parse_log(data), 2)] == [b"b1b2", b"c"]


def test_select_by_stream_and_time() -> None:
    lines = _lines(6)
    assert [line.content for line in select(lines, streams=["stdout"])] == [
        b"line 1", b"line 3", b"line 5"]
    assert select(lines, since_nanos=4_000_000_000) == lines[4:]
    assert select(lines, since_nanos=4_000_000_000, streams=["stderr"]) == [lines[4]]


# --- reading files --------------------------------------------------------------------


def test_logfile_reads_growth_rotation_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(rec(T0, "stdout", "F", "one"))
    with LogFile(path) as log:
        assert log.read() == rec(T0, "stdout", "F", "one")
        assert log.read() == b""
        append(path, rec(T1, "stdout", "F", "two"))
        assert log.read() == rec(T1, "stdout", "F", "two")

        # rotation: the old file gets a last line, is renamed, and a new file appears
        append(path, rec(T1, "stdout", "F", "last of old"))
        os.rename(path, tmp_path / "c.log.1")
        assert log.read() == rec(T1, "stdout", "F", "last of old")  # new file not there yet
        path.write_bytes(rec(T2, "stderr", "F", "first of new"))
        assert log.read() == rec(T2, "stderr", "F", "first of new")

        # truncation (copytruncate-style rotation)
        path.write_bytes(b"")
        assert log.read() == b""
        path.write_bytes(rec(T2, "stdout", "F", "x"))
        assert log.read() == rec(T2, "stdout", "F", "x")


def test_follow_reads_until_the_container_stops(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(rec(T0, "stdout", "F", "start"))

    def rotate() -> None:
        os.rename(path, tmp_path / "c.log.1")
        path.write_bytes(rec(T2, "stderr", "F", "rotated"))

    script: list[Callable[[], None]] = [
        lambda: append(path, rec(T1, "stdout", "P", "par")),
        lambda: append(path, rec(T1, "stdout", "F", "tial")),
        rotate,
        lambda: append(path, rec(T2, "stdout", "F", "written before exit")),
    ]
    running = [True]
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        if script:
            script.pop(0)()
        else:
            running[0] = False

    with LogFile(path) as log:
        joiner = LineJoiner()
        lines = joiner.feed(log.read())
        for chunk in follow(log, lambda: running[0], poll=1.0, check_every=0.5, sleep=sleep,
                            clock=lambda: clock[0]):
            lines += joiner.feed(chunk)
        lines += joiner.flush()
    assert [line.content for line in lines] == [
        b"start", b"partial", b"rotated", b"written before exit"]


def test_follow_drains_what_was_written_as_the_container_stopped(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(b"")
    checks: list[int] = []

    def is_running() -> bool:
        checks.append(1)
        append(path, rec(T0, "stdout", "F", "bye"))  # written just as it exits
        return False

    with LogFile(path) as log:
        chunks = list(follow(log, is_running, sleep=lambda _: None))
    assert b"".join(chunks) == rec(T0, "stdout", "F", "bye")
    assert len(checks) == 1


def test_missing_log_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        LogFile(tmp_path / "none.log")
