"""ttrpc framing, sans-IO: bytes in (`FrameDecoder.feed`), frames out; `encode_frame` and
the envelope helpers make the bytes to send.

ttrpc is the lightweight RPC protocol of containerd that NRI runs on. Facts relied on
(containerd/ttrpc PROTOCOL.md and its channel and request definitions):

- every message is a 10-byte header followed by the data: data length (uint32), stream
  id (uint32), message type (uint8), flags (uint8), all big endian;
- the data length is at most 4 MiB (4 << 20); a larger message is rejected: its data is
  skipped and the receiver answers that stream with status RESOURCE_EXHAUSTED;
- message types: 1 request (opens a stream), 2 response (ends it), 3 data (streaming);
- request flags 0x01 "remote closed" and 0x02 "remote open" mark streaming requests;
  empty flags mean a unary request. Data flag 0x01 is "remote closed". 0x04 is "no data";
- streams opened by the client (the side that connected) have odd ids, server-opened
  ones would be even;
- a request's data is the protobuf message ttrpc.Request {service, method, payload,
  timeout_nano, metadata}; a response's is ttrpc.Response {status, payload}, where status
  is a google.rpc.Status (gRPC code numbers) that a Go client requires to be present,
  also on success.

Only unary calls are used by NRI; data frames are decoded but carry no meaning here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from google.protobuf.message import DecodeError

from cripy.nri import ttrpc_pb2

HEADER_LENGTH = 10
MAX_MESSAGE_LENGTH = 4 << 20
MAX_STREAM_ID = 0xFFFFFFFF

FLAG_REMOTE_CLOSED = 0x01
FLAG_REMOTE_OPEN = 0x02
FLAG_NO_DATA = 0x04

_HEADER = struct.Struct(">IIBB")


class MessageType(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Code(IntEnum):
    """gRPC status codes, as carried in ttrpc responses."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcProtocolError(Exception):
    """The peer broke the protocol; the connection cannot go on."""


class OversizedMessageError(ValueError):
    """A message to send is larger than ttrpc allows."""

    def __init__(self, length: int) -> None:
        super().__init__(
            f"ttrpc message of {length} bytes exceeds the maximum of {MAX_MESSAGE_LENGTH}"
        )
        self.length = length


@dataclass(frozen=True)
class Frame:
    """One received ttrpc message. `type` is the raw byte: unknown types are passed on,
    for the owner to ignore (ttrpc peers skip what they do not know)."""

    stream_id: int
    type: int
    flags: int
    data: bytes


@dataclass(frozen=True)
class OversizedFrame:
    """A message whose length exceeded the maximum; its data was skipped."""

    stream_id: int
    type: int
    flags: int
    length: int


def encode_header(length: int, stream_id: int, type: int, flags: int = 0) -> bytes:
    return _HEADER.pack(length, stream_id, type, flags)


def encode_frame(stream_id: int, type: int, data: bytes, flags: int = 0) -> bytes:
    """Header and data of one message."""
    if len(data) > MAX_MESSAGE_LENGTH:
        raise OversizedMessageError(len(data))
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range")
    return encode_header(len(data), stream_id, type, flags) + data


class FrameDecoder:
    """Reassembles messages from arbitrary chunks of the byte stream."""

    def __init__(self, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        self._buf = bytearray()
        self._max = max_length
        self._skip = 0  # bytes of an oversized message still to drop

    def feed(self, data: bytes) -> list[Frame | OversizedFrame]:
        self._buf += data
        out: list[Frame | OversizedFrame] = []
        while True:
            if self._skip:
                n = min(self._skip, len(self._buf))
                del self._buf[:n]
                self._skip -= n
                if self._skip:
                    return out
            if len(self._buf) < HEADER_LENGTH:
                return out
            length, stream_id, type_, flags = _HEADER.unpack_from(self._buf)
            if length > self._max:
                del self._buf[:HEADER_LENGTH]
                self._skip = length
                out.append(OversizedFrame(stream_id, type_, flags, length))
                continue
            end = HEADER_LENGTH + length
            if len(self._buf) < end:
                return out
            out.append(Frame(stream_id, type_, flags, bytes(self._buf[HEADER_LENGTH:end])))
            del self._buf[:end]

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete message."""
        return len(self._buf)

    @property
    def in_message(self) -> bool:
        """True while a message is partly received (or being skipped)."""
        return bool(self._buf) or self._skip > 0


class ClientStreamIds:
    """Stream ids for calls we initiate as the ttrpc client: 1, 3, 5, ..."""

    def __init__(self) -> None:
        self._next = 1

    def next(self) -> int:
        if self._next > MAX_STREAM_ID:
            raise TtrpcProtocolError("ttrpc stream ids exhausted")
        sid = self._next
        self._next += 2
        return sid


def is_client_stream(stream_id: int) -> bool:
    return stream_id % 2 == 1


# --- the envelope messages ---------------------------------------------------------


def encode_request(
    service: str,
    method: str,
    payload: bytes,
    timeout_nano: int = 0,
    metadata: Iterable[tuple[str, str]] = (),
) -> bytes:
    req = ttrpc_pb2.Request(
        service=service,
        method=method,
        payload=payload,
        timeout_nano=timeout_nano,
        metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in metadata],
    )
    return req.SerializeToString()


def decode_request(data: bytes) -> ttrpc_pb2.Request:
    try:
        return ttrpc_pb2.Request.FromString(data)
    except DecodeError as exc:
        raise TtrpcProtocolError(f"malformed ttrpc request: {exc}") from exc


def encode_response(payload: bytes = b"", code: int = Code.OK, message: str = "") -> bytes:
    # The status is always set: Go clients fail a response without one.
    rsp = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=code, message=message))
    if code == Code.OK:
        rsp.payload = payload
    return rsp.SerializeToString()


def decode_response(data: bytes) -> ttrpc_pb2.Response:
    try:
        return ttrpc_pb2.Response.FromString(data)
    except DecodeError as exc:
        raise TtrpcProtocolError(f"malformed ttrpc response: {exc}") from exc
