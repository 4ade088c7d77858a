"""NRI's connection multiplexer, sans-IO.

A plugin has one stream socket to the runtime; NRI (pkg/net/multiplex) runs several
logical connections over it. Facts relied on (NRI's multiplexer):

- every frame is an 8-byte header, connection id (uint32) then payload length (uint32),
  big endian, followed by the payload;
- connection id 0 is reserved; id 1 carries the Plugin service (the runtime is the ttrpc
  client, the plugin serves) and id 2 the Runtime service (the plugin is the client:
  RegisterPlugin, UpdateContainers);
- opening a connection sends nothing: both ends just use the agreed ids; frames for ids
  nobody opened are dropped;
- a frame's payload is at most the ttrpc maximum message plus its header (4 MiB + 10);
  a writer refuses larger ones.

Each logical connection is a byte stream (ttrpc messages are reassembled by
`ttrpc.FrameDecoder`), but the Go stub reads a logical connection with a 4096-byte
buffered reader and fails with ENOMEM on a frame that does not fit in what is left of
that buffer. `frames_for_message` therefore cuts a ttrpc message exactly the way the Go
side's own 4096-byte buffered writer does: the header and the first bytes of data up to
4096 bytes in one frame, the rest of the data in a second frame.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cripy.nri import ttrpc

HEADER_LENGTH = 8
RESERVED_CONN = 0
PLUGIN_SERVICE_CONN = 1
RUNTIME_SERVICE_CONN = 2
MAX_PAYLOAD = ttrpc.HEADER_LENGTH + ttrpc.MAX_MESSAGE_LENGTH
# The Go side's bufio buffer size, on both its reading and its writing end.
GO_BUFFER_SIZE = 4096

_HEADER = struct.Struct(">II")


class MuxProtocolError(Exception):
    """The multiplexed stream is broken; the trunk connection must be closed."""


@dataclass(frozen=True)
class MuxFrame:
    conn_id: int
    payload: bytes


def encode_frame(conn_id: int, payload: bytes) -> bytes:
    if conn_id == RESERVED_CONN:
        raise ValueError("mux connection id 0 is reserved")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"mux frame of {len(payload)} bytes exceeds the maximum of {MAX_PAYLOAD}")
    return _HEADER.pack(conn_id, len(payload)) + payload


def frames_for_message(conn_id: int, message: bytes) -> bytes:
    """The mux frames for one whole ttrpc message (header included), cut like the Go
    writer cuts it (see the module docstring)."""
    if len(message) <= GO_BUFFER_SIZE:
        return encode_frame(conn_id, message)
    return encode_frame(conn_id, message[:GO_BUFFER_SIZE]) + encode_frame(
        conn_id, message[GO_BUFFER_SIZE:]
    )


class MuxDecoder:
    """Splits the trunk's byte stream into frames, from arbitrary chunks."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> list[MuxFrame]:
        self._buf += data
        out: list[MuxFrame] = []
        while len(self._buf) >= HEADER_LENGTH:
            conn_id, length = _HEADER.unpack_from(self._buf)
            if length > self._max:
                # A length this large cannot come from a conforming peer: the stream is
                # out of step (or hostile). Refuse rather than buffer it.
                raise MuxProtocolError(
                    f"mux frame for connection {conn_id} announces {length} bytes,"
                    f" more than the maximum of {self._max}"
                )
            end = HEADER_LENGTH + length
            if len(self._buf) < end:
                break
            out.append(MuxFrame(conn_id, bytes(self._buf[HEADER_LENGTH:end])))
            del self._buf[:end]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
