"""SPDY/3.1 framing, sans-IO: bytes in (`receive_data`), events out; calls that queue
frames, and `data_to_send` to collect them.

This is the transport the kubelet's remotecommand and portforward protocols run over
(`Upgrade: SPDY/3.1`). It covers the whole SPDY/3.1 framing layer except CREDENTIAL and
server push semantics: SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS,
WINDOW_UPDATE and DATA; name/value header blocks compressed with one zlib context per
direction, seeded with the SPDY/3 dictionary; stream id parity; stream and session flow
control windows.

Flow control and the Go implementations: the SPDY stack the kubelet and kubectl use never
sends WINDOW_UPDATE and ignores the ones it gets. A sender that waited for window updates
from such a peer would stall after 64 KiB. So by default the windows of the peer are
honoured only once the peer has shown that it does flow control (it sent a WINDOW_UPDATE
or announced SETTINGS_INITIAL_WINDOW_SIZE); `strict_flow_control=True` honours them from
the start and also enforces our own receive windows. The accounting is always done, so
switching to honouring mid-way is exact.

Every violation by the peer raises `SpdyProtocolError`; after one, the connection is dead
(`receive_data` raises it again) and the owner should send GOAWAY (`goaway`) and close.
Frames for streams that existed and are closed now are dropped quietly (they may have been
in flight); frames naming stream ids that were never opened are protocol errors.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum

VERSION = 3
DEFAULT_WINDOW = 65536
MAX_WINDOW = 0x7FFFFFFF
MAX_STREAM_ID = 0x7FFFFFFF
MAX_FRAME_LENGTH = 0xFFFFFF  # the 24-bit length field

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_SETTINGS_CLEAR = 0x01

_U32 = struct.Struct(">I")
_U32x2 = struct.Struct(">II")
_MASK31 = 0x7FFFFFFF

#: A header block: names are lowercase; a name given several values appears several times.
Headers = list[tuple[str, str]]


class FrameType(IntEnum):
    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9


class RstStatus(IntEnum):
    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    INVALID_CREDENTIALS = 10
    FRAME_TOO_LARGE = 11


class GoAwayStatus(IntEnum):
    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class Setting(IntEnum):
    UPLOAD_BANDWIDTH = 1
    DOWNLOAD_BANDWIDTH = 2
    ROUND_TRIP_TIME = 3
    MAX_CONCURRENT_STREAMS = 4
    CURRENT_CWND = 5
    DOWNLOAD_RETRANS_RATE = 6
    INITIAL_WINDOW_SIZE = 7
    CLIENT_CERTIFICATE_VECTOR_SIZE = 8


# The SPDY/3 header compression dictionary: length-prefixed words, then a raw tail.
_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding "
    "accept-language accept-ranges age allow authorization cache-control connection "
    "content-base content-encoding content-language content-length content-location "
    "content-md5 content-range content-type date etag expect expires from host if-match "
    "if-modified-since if-none-match if-range if-unmodified-since last-modified location "
    "max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after "
    "server te trailer transfer-encoding upgrade user-agent vary via warning "
    "www-authenticate method get status 200_OK version HTTP/1.1 url public set-cookie "
    "keep-alive origin"
)
_DICTIONARY_WORDS = [w.replace("_", " ") for w in _WORDS.split()]
_DICTIONARY_TAIL = (
    b"100101201202205206300302303304305306307402405406407408409410411412413414415416417"
    b"502504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
    b"400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error"
    b"501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct "
    b"Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,"
    b"image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    b"text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8"
    b"charset=iso-8859-1,utf-,*,enq=0."
)
HEADER_DICTIONARY = b"".join(
    _U32.pack(len(w)) + w.encode("ascii") for w in _DICTIONARY_WORDS) + _DICTIONARY_TAIL
assert len(HEADER_DICTIONARY) == 1423


class SpdyError(Exception):
    """Base of this module's errors."""


class SpdyProtocolError(SpdyError):
    """The peer broke the protocol; the connection must end (GOAWAY with `status`)."""

    def __init__(self, message: str, status: GoAwayStatus = GoAwayStatus.PROTOCOL_ERROR):
        super().__init__(message)
        self.status = status


class SpdyStreamError(SpdyError):
    """A local call named a stream that cannot take it (closed, reset, unknown)."""


def header_value(headers: Headers, name: str) -> str | None:
    """The first value of `name` (case-insensitive), or None."""
    name = name.lower()
    for key, value in headers:
        if key == name:
            return value
    return None


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class StreamOpened(Event):
    """SYN_STREAM: the peer opened a stream; answer with `reply` or `reset_stream`."""

    stream_id: int
    headers: Headers
    fin: bool = False
    unidirectional: bool = False
    associated_id: int = 0
    priority: int = 0


@dataclass(frozen=True)
class StreamReplied(Event):
    """SYN_REPLY to a stream we opened."""

    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True)
class HeadersReceived(Event):
    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True)
class DataReceived(Event):
    """Stream data; acknowledge it with `acknowledge_data` once consumed."""

    stream_id: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True)
class StreamEnded(Event):
    """The peer half-closed the stream (a frame with FIN); it sends nothing more on it."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset(Event):
    """The stream is gone: RST_STREAM from the peer (`remote`), or one we sent for a
    stream error of the peer's."""

    stream_id: int
    status: int
    remote: bool = True


@dataclass(frozen=True)
class SettingsReceived(Event):
    settings: dict[int, int]
    clear: bool = False


@dataclass(frozen=True)
class PingReceived(Event):
    """A PING from the peer; the echo is already queued."""

    ping_id: int


@dataclass(frozen=True)
class PingAcknowledged(Event):
    """The echo of a PING we sent."""

    ping_id: int


@dataclass(frozen=True)
class GoAwayReceived(Event):
    last_good_stream_id: int
    status: int


@dataclass(frozen=True)
class WindowUpdated(Event):
    """The peer opened its window (stream 0: the session window)."""

    stream_id: int
    delta: int


# --- the connection -------------------------------------------------------------------


@dataclass
class _Stream:
    local: bool  # we opened it
    send_window: int
    recv_window: int
    local_open: bool = True  # we may still queue data (no FIN queued, not unidirectional)
    remote_open: bool = True  # the peer may still send
    replied: bool = False  # SYN_REPLY received (ours) or sent (theirs)
    fin_sent: bool = False
    fin_queued: bool = False
    unacked: int = 0  # consumed bytes not yet given back in a WINDOW_UPDATE
    pending: bytearray = field(default_factory=bytearray)


class SpdyConnection:
    """One end of a SPDY/3.1 connection (`client` picks the stream and ping id parity)."""

    def __init__(self, *, client: bool, initial_window: int = DEFAULT_WINDOW,
                 max_frame_size: int = 1 << 20, max_header_block: int = 256 * 1024,
                 data_chunk: int = 32 * 1024, strict_flow_control: bool = False) -> None:
        if not 0 < initial_window <= MAX_WINDOW:
            raise ValueError(f"initial window {initial_window} out of range")
        self.client = client
        self.max_frame_size = min(max_frame_size, MAX_FRAME_LENGTH)
        self.max_header_block = max_header_block
        self.data_chunk = data_chunk
        self.strict_flow_control = strict_flow_control
        #: Whether sends wait for the peer's windows (see the module docstring).
        self.honour_peer_windows = strict_flow_control
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zdict=HEADER_DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=HEADER_DICTIONARY)
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1 if client else 2
        self._last_peer_stream_id = 0
        self._next_ping_id = 1 if client else 2
        self._pings: set[int] = set()
        self._local_initial_window = DEFAULT_WINDOW  # until we announce another
        self._peer_initial_window = DEFAULT_WINDOW
        self.session_send_window = DEFAULT_WINDOW
        self.session_recv_window = DEFAULT_WINDOW
        self._session_unacked = 0
        self.goaway_sent = False
        self.goaway_received = False
        self._failure: SpdyProtocolError | None = None
        if initial_window != DEFAULT_WINDOW:
            self.send_settings({Setting.INITIAL_WINDOW_SIZE: initial_window})

    # --- queries ----------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        data = bytes(self._outbuf)
        self._outbuf.clear()
        return data

    def pending_data(self, stream_id: int) -> int:
        """Bytes queued on the stream that wait for the peer's window."""
        stream = self._streams.get(stream_id)
        return len(stream.pending) if stream else 0

    def total_pending(self) -> int:
        return sum(len(s.pending) for s in self._streams.values())

    def send_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.send_window if stream else 0

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def can_send(self, stream_id: int) -> bool:
        stream = self._streams.get(stream_id)
        return stream is not None and stream.local_open

    @property
    def failed(self) -> bool:
        return self._failure is not None

    # --- receiving --------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse what arrived; a partial frame waits for more bytes."""
        if self._failure is not None:
            raise self._failure
        self._inbuf += data
        events: list[Event] = []
        pos = 0
        try:
            while len(self._inbuf) - pos >= 8:
                head = self._inbuf[pos:pos + 8]
                flags = head[4]
                length = int.from_bytes(head[5:8], "big")
                control = head[0] & 0x80
                if control:
                    version = ((head[0] & 0x7F) << 8) | head[1]
                    if version != VERSION:
                        raise SpdyProtocolError(f"unsupported SPDY version {version}")
                if length > self.max_frame_size:
                    raise SpdyProtocolError(
                        f"frame of {length} bytes exceeds the limit of {self.max_frame_size}")
                if len(self._inbuf) - pos < 8 + length:
                    break
                payload = bytes(self._inbuf[pos + 8:pos + 8 + length])
                pos += 8 + length
                if control:
                    kind = int.from_bytes(head[2:4], "big")
                    self._control_frame(kind, flags, payload, events)
                else:
                    stream_id = int.from_bytes(head[0:4], "big") & _MASK31
                    self._data_frame(stream_id, flags, payload, events)
        except SpdyProtocolError as exc:
            self._failure = exc
            raise
        finally:
            del self._inbuf[:pos]
        return events

    def _control_frame(self, kind: int, flags: int, payload: bytes, events: list[Event]
                       ) -> None:
        length = len(payload)
        if kind == FrameType.SYN_STREAM:
            if length < 10:
                raise SpdyProtocolError(f"SYN_STREAM of {length} bytes is too short")
            stream_id, associated = (v & _MASK31 for v in _U32x2.unpack_from(payload))
            headers = self._decode_headers(payload[10:])
            self._on_syn_stream(stream_id, associated, payload[8] >> 5, flags, headers, events)
        elif kind == FrameType.SYN_REPLY:
            if length < 4:
                raise SpdyProtocolError(f"SYN_REPLY of {length} bytes is too short")
            stream_id = _U32.unpack_from(payload)[0] & _MASK31
            headers = self._decode_headers(payload[4:])
            self._on_syn_reply(stream_id, flags, headers, events)
        elif kind == FrameType.RST_STREAM:
            self._expect_length("RST_STREAM", length, 8)
            stream_id, status = _U32x2.unpack(payload)
            stream_id &= _MASK31
            if self._known_stream(stream_id, "RST_STREAM") and stream_id in self._streams:
                del self._streams[stream_id]
                events.append(StreamReset(stream_id, status, remote=True))
        elif kind == FrameType.SETTINGS:
            self._on_settings(flags, payload, events)
        elif kind == FrameType.PING:
            self._expect_length("PING", length, 4)
            ping_id = _U32.unpack(payload)[0]
            if (ping_id & 1) == (1 if self.client else 0):
                if ping_id in self._pings:
                    self._pings.discard(ping_id)
                    events.append(PingAcknowledged(ping_id))
            else:
                self._frame(FrameType.PING, 0, payload)
                events.append(PingReceived(ping_id))
        elif kind == FrameType.GOAWAY:
            self._expect_length("GOAWAY", length, 8)
            last_good, status = _U32x2.unpack(payload)
            self.goaway_received = True
            events.append(GoAwayReceived(last_good & _MASK31, status))
        elif kind == FrameType.HEADERS:
            if length < 4:
                raise SpdyProtocolError(f"HEADERS of {length} bytes is too short")
            stream_id = _U32.unpack_from(payload)[0] & _MASK31
            headers = self._decode_headers(payload[4:])
            stream = self._streams.get(stream_id) if self._known_stream(
                stream_id, "HEADERS") else None
            if stream is not None and stream.remote_open:
                events.append(HeadersReceived(stream_id, headers, bool(flags & FLAG_FIN)))
                if flags & FLAG_FIN:
                    self._remote_closed(stream_id, stream, events)
        elif kind == FrameType.WINDOW_UPDATE:
            self._expect_length("WINDOW_UPDATE", length, 8)
            stream_id, delta = (v & _MASK31 for v in _U32x2.unpack(payload))
            self._on_window_update(stream_id, delta, events)
        # Unknown control frame types (CREDENTIAL, NOOP, future ones) are ignored.

    @staticmethod
    def _expect_length(name: str, length: int, expected: int) -> None:
        if length != expected:
            raise SpdyProtocolError(f"{name} of {length} bytes (expected {expected})")

    def _is_local_id(self, stream_id: int) -> bool:
        return (stream_id & 1) == (1 if self.client else 0)

    def _known_stream(self, stream_id: int, what: str) -> bool:
        """True for a stream id that was opened at some point; a protocol error for 0 or
        an id never opened."""
        if stream_id == 0:
            raise SpdyProtocolError(f"{what} on stream 0")
        if self._is_local_id(stream_id):
            opened = stream_id < self._next_stream_id
        else:
            opened = stream_id <= self._last_peer_stream_id
        if not opened:
            raise SpdyProtocolError(f"{what} on stream {stream_id}, which was never opened")
        return True

    def _on_syn_stream(self, stream_id: int, associated: int, priority: int, flags: int,
                       headers: Headers, events: list[Event]) -> None:
        if stream_id == 0:
            raise SpdyProtocolError("SYN_STREAM with stream id 0")
        if self._is_local_id(stream_id):
            raise SpdyProtocolError(f"SYN_STREAM with stream id {stream_id} of the wrong "
                                    "parity")
        if stream_id <= self._last_peer_stream_id:
            raise SpdyProtocolError(f"SYN_STREAM with stream id {stream_id}, not above "
                                    f"{self._last_peer_stream_id}")
        self._last_peer_stream_id = stream_id
        if self.goaway_sent:
            return  # new streams after our GOAWAY are ignored
        fin = bool(flags & FLAG_FIN)
        unidirectional = bool(flags & FLAG_UNIDIRECTIONAL)
        stream = _Stream(local=False, send_window=self._peer_initial_window,
                         recv_window=self._local_initial_window,
                         local_open=not unidirectional, remote_open=not fin)
        if unidirectional:
            stream.fin_sent = True
        self._streams[stream_id] = stream
        events.append(StreamOpened(stream_id, headers, fin, unidirectional, associated,
                                   priority))
        if fin:
            self._remote_closed(stream_id, stream, events)

    def _on_syn_reply(self, stream_id: int, flags: int, headers: Headers,
                      events: list[Event]) -> None:
        if stream_id != 0 and not self._is_local_id(stream_id):
            raise SpdyProtocolError(f"SYN_REPLY for stream {stream_id}, which the peer "
                                    "opened")
        self._known_stream(stream_id, "SYN_REPLY")
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.replied:
            self._reset(stream_id, RstStatus.STREAM_IN_USE, events)
            return
        stream.replied = True
        fin = bool(flags & FLAG_FIN)
        events.append(StreamReplied(stream_id, headers, fin))
        if fin:
            self._remote_closed(stream_id, stream, events)

    def _on_settings(self, flags: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) < 4:
            raise SpdyProtocolError(f"SETTINGS of {len(payload)} bytes is too short")
        count = _U32.unpack_from(payload)[0]
        if len(payload) != 4 + 8 * count:
            raise SpdyProtocolError(f"SETTINGS of {len(payload)} bytes for {count} entries")
        settings: dict[int, int] = {}
        for i in range(count):
            id_flags, value = _U32x2.unpack_from(payload, 4 + 8 * i)
            settings[id_flags & 0xFFFFFF] = value
        window = settings.get(Setting.INITIAL_WINDOW_SIZE)
        if window is not None:
            if window > MAX_WINDOW:
                raise SpdyProtocolError(f"SETTINGS_INITIAL_WINDOW_SIZE {window} too large")
            delta = window - self._peer_initial_window
            self._peer_initial_window = window
            for stream in self._streams.values():
                stream.send_window += delta
            self.honour_peer_windows = True
        events.append(SettingsReceived(settings, bool(flags & FLAG_SETTINGS_CLEAR)))
        if window is not None:
            self._flush_all()

    def _on_window_update(self, stream_id: int, delta: int, events: list[Event]) -> None:
        if delta == 0:
            raise SpdyProtocolError(f"WINDOW_UPDATE of 0 on stream {stream_id}")
        self.honour_peer_windows = True
        if stream_id == 0:
            self.session_send_window += delta
            if self.session_send_window > MAX_WINDOW:
                raise SpdyProtocolError("session window grew past 2^31-1")
            events.append(WindowUpdated(0, delta))
            self._flush_all()
            return
        self._known_stream(stream_id, "WINDOW_UPDATE")
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.send_window += delta
        if stream.send_window > MAX_WINDOW:
            self._reset(stream_id, RstStatus.FLOW_CONTROL_ERROR, events)
            return
        events.append(WindowUpdated(stream_id, delta))
        self._flush(stream_id, stream)

    def _data_frame(self, stream_id: int, flags: int, payload: bytes, events: list[Event]
                    ) -> None:
        if stream_id == 0:
            raise SpdyProtocolError("DATA on stream 0")
        self._known_stream(stream_id, "DATA")
        size = len(payload)
        self.session_recv_window -= size
        if self.strict_flow_control and self.session_recv_window < 0:
            raise SpdyProtocolError("the peer overran the session window")
        stream = self._streams.get(stream_id)
        if stream is None or not stream.remote_open:
            self.acknowledge_data(0, size)  # dropped: give the session window back
            return
        stream.recv_window -= size
        if self.strict_flow_control and stream.recv_window < 0:
            self.acknowledge_data(0, size)
            self._reset(stream_id, RstStatus.FLOW_CONTROL_ERROR, events)
            return
        fin = bool(flags & FLAG_FIN)
        events.append(DataReceived(stream_id, payload, fin))
        if fin:
            self._remote_closed(stream_id, stream, events)

    def _remote_closed(self, stream_id: int, stream: _Stream, events: list[Event]) -> None:
        stream.remote_open = False
        events.append(StreamEnded(stream_id))
        self._maybe_forget(stream_id, stream)

    def _maybe_forget(self, stream_id: int, stream: _Stream) -> None:
        if not stream.remote_open and stream.fin_sent and not stream.pending:
            self._streams.pop(stream_id, None)

    def _reset(self, stream_id: int, status: RstStatus, events: list[Event]) -> None:
        self._streams.pop(stream_id, None)
        self._frame(FrameType.RST_STREAM, 0, _U32x2.pack(stream_id, status))
        events.append(StreamReset(stream_id, status, remote=False))

    # --- header blocks ----------------------------------------------------------------

    def _encode_headers(self, headers: Headers) -> bytes:
        grouped: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            key = name.lower().encode("latin-1")
            if not key:
                raise ValueError("empty header name")
            grouped.setdefault(key, []).append(value.encode("latin-1"))
        block = bytearray(_U32.pack(len(grouped)))
        for key, values in grouped.items():
            joined = b"\0".join(values)
            block += _U32.pack(len(key)) + key + _U32.pack(len(joined)) + joined
        return self._deflate.compress(bytes(block)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def _decode_headers(self, block: bytes) -> Headers:
        """Inflate (always: the context is shared by every block) and parse a block."""
        try:
            raw = self._inflate.decompress(block, self.max_header_block + 1)
        except zlib.error as exc:
            raise SpdyProtocolError(f"header block does not inflate: {exc}") from None
        if self._inflate.unconsumed_tail or len(raw) > self.max_header_block:
            raise SpdyProtocolError(
                f"header block inflates past {self.max_header_block} bytes")
        if self._inflate.eof:
            raise SpdyProtocolError("header compression stream ended")
        if len(raw) < 4:
            raise SpdyProtocolError("header block is truncated")
        count = _U32.unpack_from(raw)[0]
        if count * 8 > len(raw) - 4:
            raise SpdyProtocolError(f"header block too short for {count} headers")
        pos = 4
        headers: Headers = []
        seen: set[str] = set()
        for _ in range(count):
            name, pos = self._read_string(raw, pos)
            value, pos = self._read_string(raw, pos)
            if not name:
                raise SpdyProtocolError("empty header name")
            key = name.decode("latin-1").lower()
            if key in seen:
                raise SpdyProtocolError(f"header {key!r} appears twice")
            seen.add(key)
            parts = value.split(b"\0")
            if len(parts) > 1 and not all(parts):
                raise SpdyProtocolError(f"header {key!r} has an empty value")
            headers.extend((key, part.decode("latin-1")) for part in parts)
        if pos != len(raw):
            raise SpdyProtocolError("header block has trailing bytes")
        return headers

    @staticmethod
    def _read_string(raw: bytes, pos: int) -> tuple[bytes, int]:
        if pos + 4 > len(raw):
            raise SpdyProtocolError("header block is truncated")
        size = _U32.unpack_from(raw, pos)[0]
        end = pos + 4 + size
        if end > len(raw):
            raise SpdyProtocolError("header block is truncated")
        return raw[pos + 4:end], end

    # --- sending ----------------------------------------------------------------------

    def _frame(self, kind: FrameType, flags: int, payload: bytes) -> None:
        self._outbuf += struct.pack(">HHI", 0x8000 | VERSION, kind,
                                    (flags << 24) | len(payload)) + payload

    def _data(self, stream_id: int, flags: int, payload: bytes | bytearray) -> None:
        self._outbuf += _U32x2.pack(stream_id, (flags << 24) | len(payload))
        self._outbuf += payload

    def open_stream(self, headers: Headers, *, fin: bool = False,
                    unidirectional: bool = False, associated_id: int = 0,
                    priority: int = 0) -> int:
        """SYN_STREAM; returns the new stream's id."""
        if self.goaway_sent or self.goaway_received:
            raise SpdyStreamError("the connection is going away")
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise SpdyStreamError("stream ids are exhausted")
        self._next_stream_id += 2
        block = self._encode_headers(headers)
        flags = (FLAG_FIN if fin else 0) | (FLAG_UNIDIRECTIONAL if unidirectional else 0)
        self._frame(FrameType.SYN_STREAM, flags,
                    _U32x2.pack(stream_id, associated_id & _MASK31)
                    + bytes([(priority & 7) << 5, 0]) + block)
        stream = _Stream(local=True, send_window=self._peer_initial_window,
                         recv_window=self._local_initial_window,
                         local_open=not fin, remote_open=not unidirectional,
                         fin_sent=fin, fin_queued=fin)
        self._streams[stream_id] = stream
        self._maybe_forget(stream_id, stream)
        return stream_id

    def _stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise SpdyStreamError(f"stream {stream_id} is not open")
        return stream

    def reply(self, stream_id: int, headers: Headers | None = None, *, fin: bool = False
              ) -> None:
        """SYN_REPLY to a stream the peer opened."""
        stream = self._stream(stream_id)
        if stream.local or stream.replied:
            raise SpdyStreamError(f"stream {stream_id} cannot be replied to")
        stream.replied = True
        self._frame(FrameType.SYN_REPLY, FLAG_FIN if fin else 0,
                    _U32.pack(stream_id) + self._encode_headers(headers or []))
        if fin:
            self._local_fin(stream_id, stream)

    def send_headers(self, stream_id: int, headers: Headers, *, fin: bool = False) -> None:
        stream = self._stream(stream_id)
        if not stream.local_open:
            raise SpdyStreamError(f"stream {stream_id} is closed for sending")
        self._frame(FrameType.HEADERS, FLAG_FIN if fin else 0,
                    _U32.pack(stream_id) + self._encode_headers(headers))
        if fin:
            self._local_fin(stream_id, stream)

    def _local_fin(self, stream_id: int, stream: _Stream) -> None:
        stream.local_open = False
        stream.fin_queued = stream.fin_sent = True
        self._maybe_forget(stream_id, stream)

    def send_data(self, stream_id: int, data: bytes, *, fin: bool = False) -> None:
        """Queue data (and FIN); what the peer's windows do not allow yet stays queued
        (`pending_data`) until WINDOW_UPDATEs arrive."""
        stream = self._stream(stream_id)
        if not stream.local_open:
            raise SpdyStreamError(f"stream {stream_id} is closed for sending")
        stream.pending += data
        if fin:
            stream.local_open = False
            stream.fin_queued = True
        self._flush(stream_id, stream)

    def _flush(self, stream_id: int, stream: _Stream) -> None:
        while stream.pending:
            size = min(len(stream.pending), self.data_chunk)
            if self.honour_peer_windows:
                size = min(size, stream.send_window, self.session_send_window)
                if size <= 0:
                    return
            last = size == len(stream.pending)
            fin = stream.fin_queued and last
            self._data(stream_id, FLAG_FIN if fin else 0, stream.pending[:size])
            del stream.pending[:size]
            stream.send_window -= size
            self.session_send_window -= size
            stream.fin_sent = stream.fin_sent or fin
        if stream.fin_queued and not stream.fin_sent:
            self._data(stream_id, FLAG_FIN, b"")
            stream.fin_sent = True
        self._maybe_forget(stream_id, stream)

    def _flush_all(self) -> None:
        for stream_id in sorted(self._streams):
            stream = self._streams.get(stream_id)
            if stream is not None and (stream.pending or stream.fin_queued):
                self._flush(stream_id, stream)

    def acknowledge_data(self, stream_id: int, size: int) -> None:
        """The application consumed `size` bytes of the stream (0: session only); give
        the windows back with WINDOW_UPDATE once half of one is used."""
        if size <= 0:
            return
        self._session_unacked += size
        if self._session_unacked >= DEFAULT_WINDOW // 2 and not self.goaway_sent:
            self._window_update(0, self._session_unacked)
            self.session_recv_window += self._session_unacked
            self._session_unacked = 0
        stream = self._streams.get(stream_id) if stream_id else None
        if stream is None or not stream.remote_open:
            return
        stream.unacked += size
        if stream.unacked >= self._local_initial_window // 2:
            self._window_update(stream_id, stream.unacked)
            stream.recv_window += stream.unacked
            stream.unacked = 0

    def _window_update(self, stream_id: int, delta: int) -> None:
        self._frame(FrameType.WINDOW_UPDATE, 0, _U32x2.pack(stream_id, delta))

    def reset_stream(self, stream_id: int, status: RstStatus = RstStatus.CANCEL) -> None:
        """RST_STREAM: both directions end at once; queued data is dropped."""
        self._streams.pop(stream_id, None)
        if stream_id:
            self._frame(FrameType.RST_STREAM, 0, _U32x2.pack(stream_id & _MASK31, status))

    def send_settings(self, settings: dict[int, int], *, clear: bool = False) -> None:
        window = settings.get(Setting.INITIAL_WINDOW_SIZE)
        if window is not None:
            if not 0 < window <= MAX_WINDOW:
                raise ValueError(f"initial window {window} out of range")
            delta = window - self._local_initial_window
            self._local_initial_window = window
            for stream in self._streams.values():
                stream.recv_window += delta
        payload = bytearray(_U32.pack(len(settings)))
        for key, value in settings.items():
            payload += _U32x2.pack(key & 0xFFFFFF, value & 0xFFFFFFFF)
        self._frame(FrameType.SETTINGS, FLAG_SETTINGS_CLEAR if clear else 0, bytes(payload))

    def ping(self) -> int:
        """Send a PING; its echo arrives as PingAcknowledged with the returned id."""
        ping_id = self._next_ping_id
        self._next_ping_id = (ping_id + 2) & 0xFFFFFFFF or (1 if self.client else 2)
        self._pings.add(ping_id)
        self._frame(FrameType.PING, 0, _U32.pack(ping_id))
        return ping_id

    def goaway(self, status: GoAwayStatus = GoAwayStatus.OK) -> None:
        """GOAWAY (once): no new streams from here on, either way."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self._frame(FrameType.GOAWAY, 0, _U32x2.pack(self._last_peer_stream_id, status))
