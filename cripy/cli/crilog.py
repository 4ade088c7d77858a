"""CRI container log files: parsing (sans-IO), joining partial lines, tail and follow.

A CRI log file holds one record a line::

    <RFC3339Nano timestamp> <stdout|stderr> <P|F>[:more tags] <content>

``F`` ends a logical line; ``P`` records are fragments of a longer line whose remaining
part follows in later records of the same stream (the writer splits long lines). The
parser is pure: bytes go in, :class:`LogLine` values come out, and malformed records are
counted and skipped, as the kubelet does. :class:`LogFile` and :func:`follow` do the
reading, including noticing that the file was rotated (the path now names a new file)
or truncated.
"""

from __future__ import annotations

import calendar
import datetime
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

STDOUT = "stdout"
STDERR = "stderr"
STREAMS = (STDOUT, STDERR)

_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


class LogFormatError(ValueError):
    """A record that is not in the CRI log format."""


@dataclass(frozen=True)
class Timestamp:
    """An instant with nanosecond precision, and the UTC offset it was written with."""

    nanos: int
    offset: int = 0  # seconds east of UTC

    @classmethod
    def parse(cls, text: str) -> Timestamp:
        """Parse RFC 3339 with up to nine fractional digits (Go's RFC3339Nano)."""
        match = _TIMESTAMP.fullmatch(text)
        if match is None:
            raise LogFormatError(f"bad timestamp {text!r}")
        year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
        fraction, zulu, sign, off_h, off_m = match.groups()[6:]
        try:
            datetime.date(year, month, day)
        except ValueError:
            raise LogFormatError(f"bad timestamp {text!r}") from None
        if hour > 23 or minute > 59 or second > 60:
            raise LogFormatError(f"bad timestamp {text!r}")
        offset = 0
        if not zulu:
            offset = (int(off_h) * 3600 + int(off_m) * 60) * (-1 if sign == "-" else 1)
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
        nanos = int((fraction or "").ljust(9, "0"))
        return cls((seconds - offset) * 1_000_000_000 + nanos, offset)

    def format(self) -> str:
        """RFC3339Nano as Go prints it: trailing zeros of the fraction dropped."""
        seconds, nanos = divmod(self.nanos + self.offset * 1_000_000_000, 1_000_000_000)
        tm = time.gmtime(seconds)
        text = (f"{tm.tm_year:04d}-{tm.tm_mon:02d}-{tm.tm_mday:02d}T"
                f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}")
        if nanos:
            text += "." + f"{nanos:09d}".rstrip("0")
        if self.offset == 0:
            return text + "Z"
        sign = "-" if self.offset < 0 else "+"
        hours, minutes = divmod(abs(self.offset) // 60, 60)
        return f"{text}{sign}{hours:02d}:{minutes:02d}"


@dataclass(frozen=True)
class LogRecord:
    """One record (one line) of a CRI log file."""

    timestamp: Timestamp
    stream: str
    partial: bool
    content: bytes  # without the line's newline


@dataclass(frozen=True)
class LogLine:
    """A logical line: a full record joined with the partial records before it."""

    timestamp: Timestamp  # of its first fragment
    stream: str
    content: bytes  # without newline
    complete: bool = True  # False: the file ended inside the line

    def render(self, timestamps: bool = False) -> bytes:
        prefix = (self.timestamp.format() + " ").encode() if timestamps else b""
        return prefix + self.content + (b"\n" if self.complete else b"")


def parse_record(line: bytes) -> LogRecord:
    """Parse one record; `line` may still end with its newline."""
    if line.endswith(b"\n"):
        line = line[:-1]
    fields = line.split(b" ", 3)
    if len(fields) < 3:
        raise LogFormatError(f"expected 'TIMESTAMP STREAM TAG CONTENT', got {line[:80]!r}")
    try:
        timestamp = Timestamp.parse(fields[0].decode("ascii"))
    except UnicodeDecodeError:
        raise LogFormatError(f"bad timestamp {fields[0][:40]!r}") from None
    stream = fields[1].decode("ascii", "replace")
    if stream not in STREAMS:
        raise LogFormatError(f"unexpected stream {stream!r}")
    tag = fields[2].split(b":", 1)[0]  # more tags may follow; the first says P or F
    if not tag:
        raise LogFormatError("missing log tag")
    content = fields[3] if len(fields) == 4 else b""
    return LogRecord(timestamp, stream, tag == b"P", content)


class LineJoiner:
    """Feed bytes of a log file in any chunking; get complete logical lines back.

    Partial records are held per stream until their full record arrives. Malformed
    records are skipped and counted in :attr:`malformed`.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._pending: dict[str, list[LogRecord]] = {}
        self.malformed = 0

    def feed(self, data: bytes) -> list[LogLine]:
        self._buffer += data
        *records, self._buffer = self._buffer.split(b"\n")
        lines: list[LogLine] = []
        for raw in records:
            line = self._record(raw)
            if line is not None:
                lines.append(line)
        return lines

    def flush(self) -> list[LogLine]:
        """At the end of the log: a last record without newline, then unfinished lines."""
        lines: list[LogLine] = []
        if self._buffer:
            raw, self._buffer = self._buffer, b""
            line = self._record(raw)
            if line is not None:
                lines.append(line)
        pending = sorted(self._pending.values(), key=lambda parts: parts[0].timestamp.nanos)
        self._pending = {}
        for parts in pending:
            lines.append(LogLine(parts[0].timestamp, parts[0].stream,
                                 b"".join(p.content for p in parts), complete=False))
        return lines

    def _record(self, raw: bytes) -> LogLine | None:
        if not raw:
            return None
        try:
            record = parse_record(raw)
        except LogFormatError:
            self.malformed += 1
            return None
        parts = self._pending.setdefault(record.stream, [])
        parts.append(record)
        if record.partial:
            return None
        del self._pending[record.stream]
        return LogLine(parts[0].timestamp, record.stream, b"".join(p.content for p in parts))


def parse_log(data: bytes) -> list[LogLine]:
    """Every logical line of a whole log file's contents."""
    joiner = LineJoiner()
    return joiner.feed(data) + joiner.flush()


def tail(lines: Iterable[LogLine], count: int) -> list[LogLine]:
    """The last `count` lines; all of them when `count` is negative."""
    if count < 0:
        return list(lines)
    if count == 0:
        return []
    return list(deque(lines, maxlen=count))


def select(lines: Iterable[LogLine], *, since_nanos: int | None = None,
           streams: Iterable[str] = STREAMS) -> list[LogLine]:
    """Lines of the given streams written at or after `since_nanos`."""
    wanted = frozenset(streams)
    return [line for line in lines if line.stream in wanted
            and (since_nanos is None or line.timestamp.nanos >= since_nanos)]


# --- reading files --------------------------------------------------------------------


class LogFile:
    """A log file read as it grows, which follows its path when the file is replaced.

    Rotation (the kubelet renames the file and asks the runtime to reopen its log) shows
    as the path naming a different inode: the old file is read to its end, then the new
    one from its start. A file that became shorter than what was read was truncated and
    is read again from its start.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        self._position = 0

    def read(self) -> bytes:
        """Everything written since the last call (possibly nothing)."""
        chunks: list[bytes] = []
        while True:
            data = self._file.readall()
            if data:
                chunks.append(data)
                self._position += len(data)
            change = self._change()
            if change == "truncated":
                self._file.seek(0)
                self._position = 0
            elif change == "replaced":
                try:
                    new = open(self.path, "rb", buffering=0)  # noqa: SIM115
                except FileNotFoundError:
                    break  # renamed away, new file not created yet
                self._file.close()
                self._file, self._position = new, 0
            else:
                break
        return b"".join(chunks)

    def _change(self) -> str | None:
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return None
        opened = os.fstat(self._file.fileno())
        if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
            return "replaced"
        if opened.st_size < self._position:
            return "truncated"
        return None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> LogFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def follow(log: LogFile, is_running: Callable[[], bool], *, poll: float = 0.1,
           check_every: float = 1.0, sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic) -> Iterator[bytes]:
    """Yield what is written to `log` until the container stops, then the rest.

    `is_running` is asked at most every `check_every` seconds, and only when there is
    nothing to read; once it answers False the file is read one last time.
    """
    last_check: float | None = None
    while True:
        data = log.read()
        if data:
            yield data
            continue
        now = clock()
        if last_check is None or now - last_check >= check_every:
            last_check = now
            if not is_running():
                rest = log.read()
                if rest:
                    yield rest
                return
        sleep(poll)
