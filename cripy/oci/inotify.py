"""inotify(7) through ctypes: a non-blocking instance whose fd an event loop can watch,
and the parsing of what it reads (sans-IO, tested on its own).

A read returns whole `struct inotify_event` records, each a header of four native
integers (wd, mask, cookie, len) then `len` bytes of NUL-padded name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

#: The watched directory itself is gone (or no longer watched): its watch is over.
WATCH_ENDED = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED

HEADER = struct.Struct("=iIII")  # wd, mask, cookie, len
#: Room for many events per read; one event is at most HEADER.size + NAME_MAX + 1.
READ_SIZE = 64 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


@dataclass(frozen=True)
class InotifyEvent:
    wd: int  # -1 for IN_Q_OVERFLOW
    mask: int
    cookie: int
    name: str  # the file's name in the watched directory; "" for the directory itself

    @property
    def overflow(self) -> bool:
        """The kernel's queue overflowed: events were lost, so look at everything."""
        return bool(self.mask & IN_Q_OVERFLOW)


def parse_events(data: bytes) -> list[InotifyEvent]:
    """The events in one read's bytes; ValueError when the bytes end inside an event
    (the kernel never returns part of one)."""
    events = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            raise ValueError(f"inotify data ends inside an event header at {offset}")
        wd, mask, cookie, length = HEADER.unpack_from(data, offset)
        start = offset + HEADER.size
        end = start + length
        if end > len(data):
            raise ValueError(f"inotify event name at {start} runs past the data")
        name = os.fsdecode(data[start:end].split(b"\0", 1)[0])
        events.append(InotifyEvent(wd, mask, cookie, name))
        offset = end
    return events


class Inotify:
    """One inotify instance (non-blocking, close-on-exec)."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd: int = int(fd)

    def fileno(self) -> int:
        return self._fd

    def add_watch(self, path: Path, mask: int) -> int:
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return int(wd)

    def read(self) -> list[InotifyEvent]:
        """What has arrived so far; [] when nothing has."""
        try:
            data = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return []
        return parse_events(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0
