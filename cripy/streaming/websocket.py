"""WebSocket (RFC 6455), sans-IO, and the Kubernetes channel framing on top of it.

`WebSocketConnection` is fed the bytes read from the socket (`receive_data`) and returns
events; whatever it wants to write (frames, pongs, close replies) is collected from
`data_to_send()`. No extensions are negotiated, so any reserved bit is an error. A fault
raises `WebSocketProtocolError` carrying the close code, after queueing the close frame
that reports it; truncated input is never an error, only "need more data".

The handshake helpers validate a client's upgrade request and build the response. The
channel helpers implement the kubelet's `channel.k8s.io` family: a binary message's first
byte is the channel number; the `base64.` variants send text messages whose first
character is the channel as an ASCII digit ('0' + n) followed by the data in base64.
"""

from __future__ import annotations

import base64 as b64
import binascii
import codecs
import enum
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from cripy.streaming.remotecommand import STREAM_CLOSE  # v5's "close one channel" signal

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never sent: a close frame without a payload
    ABNORMAL = 1006  # never sent: the connection dropped without a close frame
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011


_OPCODES = frozenset(int(op) for op in Opcode)


def _valid_close_code(code: int) -> bool:
    """A code that may appear in a close frame (RFC 6455 7.4 and the IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class WebSocketProtocolError(Exception):
    """The peer broke RFC 6455; `code` is the close code that reports it. From
    `receive_data`, `events` holds what the same data held before the fault."""

    def __init__(self, message: str, code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code
        self.events: list[Event] = []


class WebSocketClosedError(RuntimeError):
    """A send after this side's close frame."""


class Role(enum.Enum):
    SERVER = "server"
    CLIENT = "client"


class State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"  # our close frame is sent, the peer's has not arrived
    CLOSED = "closed"  # both close frames exchanged, or the connection failed


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TextMessage:
    data: str


@dataclass(frozen=True)
class BinaryMessage:
    data: bytes


@dataclass(frozen=True)
class Ping:
    payload: bytes


@dataclass(frozen=True)
class Pong:
    payload: bytes


@dataclass(frozen=True)
class CloseReceived:
    code: int  # 1005 when the frame carried no code
    reason: str


Event = TextMessage | BinaryMessage | Ping | Pong | CloseReceived


# --- frames -----------------------------------------------------------------------------


def apply_mask(data: bytes, key: bytes) -> bytes:
    """XOR `data` with the 4-byte masking key (masking and unmasking are the same)."""
    n = len(data)
    if n == 0:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little"
    )


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bytes | None = None,
    rsv: int = 0,
) -> bytes:
    """One frame; `mask` (4 bytes) masks it, as a client must. `rsv` (0-7) is only for
    crafting bad frames in tests."""
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)])
    mask_bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head.append(mask_bit | n)
    elif n < 1 << 16:
        head.append(mask_bit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(mask_bit | 127)
        head += n.to_bytes(8, "big")
    if mask is None:
        return bytes(head) + payload
    if len(mask) != 4:
        raise ValueError("masking key must be 4 bytes")
    return bytes(head) + mask + apply_mask(payload, mask)


def close_payload(code: int | None, reason: str = "") -> bytes:
    if code is None:
        if reason:
            raise ValueError("a close reason needs a close code")
        return b""
    if not _valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    raw = reason.encode()
    if len(raw) > 123:
        raise ValueError("close reason longer than 123 bytes")
    return code.to_bytes(2, "big") + raw


# --- the connection ---------------------------------------------------------------------


@dataclass
class _Partial:
    """A data message whose final fragment has not arrived."""

    opcode: int
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    utf8: codecs.IncrementalDecoder | None = None  # text messages only
    text: list[str] = field(default_factory=list)


class WebSocketConnection:
    """One side of an established WebSocket connection (after the HTTP handshake).

    As a server, every received frame must be masked and ours are not; as a client
    (tests) the reverse. Pings are answered automatically and a received close frame is
    echoed, so callers only flush `data_to_send()` after each `receive_data`.
    """

    def __init__(
        self,
        role: Role = Role.SERVER,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.role = role
        self.max_message_size = max_message_size
        self._in = bytearray()
        self._out = bytearray()
        self._partial: _Partial | None = None
        self._close_sent = False
        self._close_received = False
        self._failed = False
        self.close_code: int | None = None  # the peer's, once its close frame arrived
        self.close_reason = ""

    # state

    @property
    def state(self) -> State:
        if self._failed or (self._close_sent and self._close_received):
            return State.CLOSED
        if self._close_sent or self._close_received:
            return State.CLOSING
        return State.OPEN

    @property
    def close_sent(self) -> bool:
        return self._close_sent

    @property
    def close_received(self) -> bool:
        return self._close_received

    # output

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        mask = os.urandom(4) if self.role is Role.CLIENT else None
        self._out += encode_frame(opcode, payload, fin=fin, mask=mask)

    def _check_open(self) -> None:
        if self._close_sent or self._failed:
            raise WebSocketClosedError("the WebSocket is closed")

    def send(self, data: bytes | str) -> None:
        """A text message for str, a binary message for bytes."""
        if isinstance(data, str):
            self.send_text(data)
        else:
            self.send_binary(data)

    def send_text(self, text: str) -> None:
        self._check_open()
        self._frame(Opcode.TEXT, text.encode())

    def send_binary(self, data: bytes) -> None:
        self._check_open()
        self._frame(Opcode.BINARY, bytes(data))

    def ping(self, payload: bytes = b"") -> None:
        self._check_open()
        if len(payload) > 125:
            raise ValueError("ping payload longer than 125 bytes")
        self._frame(Opcode.PING, payload)

    def pong(self, payload: bytes = b"") -> None:
        self._check_open()
        if len(payload) > 125:
            raise ValueError("pong payload longer than 125 bytes")
        self._frame(Opcode.PONG, payload)

    def close(self, code: int | None = CloseCode.NORMAL, reason: str = "") -> None:
        """Start (or finish) the close handshake; a second call does nothing."""
        if self._close_sent or self._failed:
            return
        payload = close_payload(code, reason)
        self._close_sent = True
        self._frame(Opcode.CLOSE, payload)

    # input

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse what arrived; returns the complete events in order.

        After a close frame from the peer (or a protocol error) input is ignored.
        """
        if self._failed or self._close_received:
            return []
        self._in += data
        events: list[Event] = []
        pos = 0
        try:
            while not self._close_received:
                parsed = self._parse_frame(pos)
                if parsed is None:
                    break
                pos, event = parsed
                if event is not None:
                    events.append(event)
        except WebSocketProtocolError as exc:
            self._fail(exc.code)
            exc.events = events
            raise
        if self._close_received:
            self._in.clear()
        else:
            del self._in[:pos]
        return events

    def _fail(self, code: int) -> None:
        if not self._close_sent:
            self._close_sent = True
            self._frame(Opcode.CLOSE, close_payload(code if _valid_close_code(code) else 1002))
        self._failed = True
        self._partial = None
        self._in.clear()

    def _parse_frame(self, start: int) -> tuple[int, Event | None] | None:
        """The frame at `start`: (its end, its event), or None while it is incomplete."""
        buf = self._in
        avail = len(buf) - start
        if avail < 2:
            return None
        b0, b1 = buf[start], buf[start + 1]
        if b0 & 0x70:
            raise WebSocketProtocolError("reserved bits set without a negotiated extension")
        opcode = b0 & 0x0F
        fin = bool(b0 & 0x80)
        if opcode not in _OPCODES:
            raise WebSocketProtocolError(f"unknown opcode {opcode:#x}")
        masked = bool(b1 & 0x80)
        if self.role is Role.SERVER and not masked:
            raise WebSocketProtocolError("client frame is not masked")
        if self.role is Role.CLIENT and masked:
            raise WebSocketProtocolError("server frame is masked")
        length = b1 & 0x7F
        control = opcode >= 0x8
        if control:
            if not fin:
                raise WebSocketProtocolError("fragmented control frame")
            if length > 125:
                raise WebSocketProtocolError("control frame payload longer than 125 bytes")
        elif opcode == Opcode.CONTINUATION:
            if self._partial is None:
                raise WebSocketProtocolError("continuation frame without a message to continue")
        elif self._partial is not None:
            raise WebSocketProtocolError("new message before the previous one was finished")
        head = 2
        if length == 126:
            if avail < 4:
                return None
            length = int.from_bytes(buf[start + 2 : start + 4], "big")
            head = 4
        elif length == 127:
            if avail < 10:
                return None
            length = int.from_bytes(buf[start + 2 : start + 10], "big")
            if length >> 63:
                raise WebSocketProtocolError("64-bit payload length with the high bit set")
            head = 10
        if not control:
            so_far = self._partial.size if self._partial is not None else 0
            if so_far + length > self.max_message_size:
                raise WebSocketProtocolError(
                    f"message larger than {self.max_message_size} bytes",
                    CloseCode.MESSAGE_TOO_BIG,
                )
        key_len = 4 if masked else 0
        end = start + head + key_len + length
        if len(buf) < end:
            return None
        body = start + head + key_len
        payload = bytes(buf[body:end])
        if masked:
            payload = apply_mask(payload, bytes(buf[start + head : body]))
        return end, self._handle_frame(opcode, fin, payload)

    def _handle_frame(self, opcode: int, fin: bool, payload: bytes) -> Event | None:
        if opcode == Opcode.PING:
            if not self._close_sent:
                self._frame(Opcode.PONG, payload)
            return Ping(payload)
        if opcode == Opcode.PONG:
            return Pong(payload)
        if opcode == Opcode.CLOSE:
            return self._handle_close(payload)
        partial = self._partial
        if partial is None:  # first frame of a message
            utf8 = codecs.getincrementaldecoder("utf-8")() if opcode == Opcode.TEXT else None
            partial = _Partial(opcode, utf8=utf8)
            self._partial = partial
        partial.size += len(payload)
        if partial.utf8 is not None:
            try:  # incremental, so bad text fails on its first bad fragment
                partial.text.append(partial.utf8.decode(payload, final=fin))
            except UnicodeDecodeError:
                raise WebSocketProtocolError(
                    "text message is not valid UTF-8", CloseCode.INVALID_DATA
                ) from None
        else:
            partial.parts.append(payload)
        if not fin:
            return None
        self._partial = None
        if partial.utf8 is not None:
            return TextMessage("".join(partial.text))
        return BinaryMessage(b"".join(partial.parts))

    def _handle_close(self, payload: bytes) -> CloseReceived:
        if len(payload) == 1:
            raise WebSocketProtocolError("close frame payload of one byte")
        code = CloseCode.NO_STATUS.value
        reason = ""
        if payload:
            code = int.from_bytes(payload[:2], "big")
            if not _valid_close_code(code):
                raise WebSocketProtocolError(f"invalid close code {code}")
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError:
                raise WebSocketProtocolError(
                    "close reason is not valid UTF-8", CloseCode.INVALID_DATA
                ) from None
        self._close_received = True
        self.close_code = code
        self.close_reason = reason
        if not self._close_sent:  # echo the code, as RFC 6455 5.5.1 suggests
            self._close_sent = True
            self._frame(Opcode.CLOSE, b"" if code == CloseCode.NO_STATUS else payload[:2])
        return CloseReceived(code, reason)


# --- handshake --------------------------------------------------------------------------


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    digest = hashlib.sha1((key + GUID).encode(), usedforsecurity=False).digest()
    return b64.b64encode(digest).decode()


class HandshakeError(Exception):
    """An upgrade request that cannot be accepted: answer with `status` and the message."""

    def __init__(
        self, message: str, status: int = 400, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


@dataclass(frozen=True)
class HandshakeRequest:
    key: str
    protocols: list[str]  # Sec-WebSocket-Protocol, in the client's order


def _values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    """All comma-separated values of a header, however often it appears."""
    out: list[str] = []
    for key, value in headers:
        if key.lower() == name:
            out += [v.strip() for v in value.split(",") if v.strip()]
    return out


def parse_client_handshake(headers: Iterable[tuple[str, str]]) -> HandshakeRequest:
    """Check a client's opening handshake headers (RFC 6455 4.2.1)."""
    headers = list(headers)
    if "websocket" not in (v.lower() for v in _values(headers, "upgrade")):
        raise HandshakeError("missing 'Upgrade: websocket' header")
    if "upgrade" not in (v.lower() for v in _values(headers, "connection")):
        raise HandshakeError("missing 'Connection: Upgrade' header")
    if "13" not in _values(headers, "sec-websocket-version"):
        raise HandshakeError(
            "unsupported Sec-WebSocket-Version (13 is supported)",
            426,
            [("Sec-WebSocket-Version", "13")],
        )
    keys = [v.strip() for k, v in headers if k.lower() == "sec-websocket-key"]
    if len(keys) != 1:
        raise HandshakeError("expected exactly one Sec-WebSocket-Key header")
    try:
        raw = b64.b64decode(keys[0], validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeError("Sec-WebSocket-Key is not 16 bytes in base64")
    return HandshakeRequest(keys[0], _values(headers, "sec-websocket-protocol"))


def select_subprotocol(offered: Iterable[str], supported: Iterable[str]) -> str | None:
    """The first of `supported` (our preference order) that the client offered."""
    wanted = set(offered)
    return next((p for p in supported if p in wanted), None)


def accept_response(key: str, protocol: str | None) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


_REASONS = {400: "Bad Request", 403: "Forbidden", 426: "Upgrade Required"}


def error_response(
    status: int, message: str, headers: Iterable[tuple[str, str]] = ()
) -> bytes:
    body = (message.rstrip("\n") + "\n").encode()
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def make_client_key() -> str:
    return b64.b64encode(os.urandom(16)).decode()


def client_handshake_request(
    host: str, path: str, key: str, protocols: Iterable[str] = ()
) -> bytes:
    """A client's opening handshake (tests)."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    protocols = list(protocols)
    if protocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- Kubernetes channel framing ---------------------------------------------------------


def encode_channel(channel: int, data: bytes, base64: bool = False) -> bytes | str:
    """One message on `channel`: bytes for the binary protocols (a binary message), str
    for the base64 ones (a text message)."""
    if base64:
        if not 0 <= channel <= 79:  # '0' + channel must stay ASCII
            raise ValueError(f"channel {channel} out of range for the base64 protocols")
        return chr(0x30 + channel) + b64.b64encode(data).decode()
    if not 0 <= channel <= 255:
        raise ValueError(f"channel {channel} out of range")
    return bytes([channel]) + data


def decode_channel(message: bytes | str, base64: bool = False) -> tuple[int, bytes]:
    """(channel, data) of one message; ValueError if it is empty or not valid base64."""
    raw = message.encode() if isinstance(message, str) else bytes(message)
    if not raw:
        raise ValueError("empty message has no channel")
    if not base64:
        return raw[0], raw[1:]
    channel = raw[0] - 0x30
    if not 0 <= channel <= 79:
        raise ValueError(f"invalid channel character {raw[:1]!r}")
    try:
        return channel, b64.b64decode(raw[1:], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid base64 data on channel {channel}: {exc}") from None


def encode_stream_close(channel: int) -> bytes:
    """v5.channel.k8s.io: the message saying no more data will come on `channel`."""
    return bytes([STREAM_CLOSE, channel])
