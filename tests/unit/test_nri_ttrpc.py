"""ttrpc framing (sans-IO): header layout, reassembly, limits, envelopes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cripy.nri import ttrpc, ttrpc_pb2
from cripy.nri.ttrpc import (
    ClientStreamIds,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    OversizedMessageError,
    TtrpcProtocolError,
    encode_frame,
)


def test_header_layout_is_big_endian() -> None:
    raw = encode_frame(0x01020304, MessageType.REQUEST, b"abc", flags=0x05)
    # length 3, stream 0x01020304, type 1, flags 5, then the data.
    assert raw == b"\x00\x00\x00\x03\x01\x02\x03\x04\x01\x05abc"
    assert ttrpc.HEADER_LENGTH == 10


def test_round_trip_several_messages() -> None:
    raw = encode_frame(1, MessageType.REQUEST, b"one") + encode_frame(3, MessageType.RESPONSE, b"")
    assert FrameDecoder().feed(raw) == [
        Frame(1, MessageType.REQUEST, 0, b"one"),
        Frame(3, MessageType.RESPONSE, 0, b""),
    ]


def test_partial_reads_byte_by_byte() -> None:
    raw = encode_frame(7, MessageType.DATA, b"x" * 300, flags=ttrpc.FLAG_REMOTE_CLOSED)
    dec = FrameDecoder()
    out: list[Frame | OversizedFrame] = []
    for i in range(len(raw)):
        out += dec.feed(raw[i : i + 1])
        if i < len(raw) - 1:
            assert out == []
            assert dec.in_message
    assert out == [Frame(7, MessageType.DATA, ttrpc.FLAG_REMOTE_CLOSED, b"x" * 300)]
    assert not dec.in_message


@given(st.lists(st.binary(max_size=64), max_size=6), st.integers(min_value=1, max_value=17))
def test_any_chunking_yields_the_same_frames(payloads: list[bytes], chunk: int) -> None:
    raw = b"".join(encode_frame(2 * i + 1, MessageType.REQUEST, p) for i, p in enumerate(payloads))
    dec = FrameDecoder()
    out: list[Frame | OversizedFrame] = []
    for i in range(0, len(raw), chunk):
        out += dec.feed(raw[i : i + chunk])
    assert [f.data for f in out if isinstance(f, Frame)] == payloads


def test_maximum_message_size() -> None:
    assert ttrpc.MAX_MESSAGE_LENGTH == 4 * 1024 * 1024
    encode_frame(1, MessageType.REQUEST, b"\0" * ttrpc.MAX_MESSAGE_LENGTH)
    with pytest.raises(OversizedMessageError, match="exceeds the maximum"):
        encode_frame(1, MessageType.REQUEST, b"\0" * (ttrpc.MAX_MESSAGE_LENGTH + 1))


def test_oversized_incoming_message_is_skipped_and_reported() -> None:
    dec = FrameDecoder(max_length=16)
    big = ttrpc.encode_header(40, 5, MessageType.REQUEST, 0) + b"y" * 40
    after = encode_frame(7, MessageType.REQUEST, b"ok")
    out = dec.feed(big[:25])
    assert out == [OversizedFrame(5, MessageType.REQUEST, 0, 40)]
    assert dec.in_message  # still skipping
    assert dec.feed(big[25:] + after) == [Frame(7, MessageType.REQUEST, 0, b"ok")]


def test_bad_header_first_byte_set_is_oversized() -> None:
    # The protocol reserves the first byte (lengths stay below 16 MiB): a set first
    # byte means a length beyond the maximum, which is refused, not buffered.
    dec = FrameDecoder()
    out = dec.feed(b"\x01\x00\x00\x00\x00\x00\x00\x01\x01\x00")
    assert out == [OversizedFrame(1, 1, 0, 0x01000000)]


def test_unknown_message_type_is_passed_on() -> None:
    assert FrameDecoder().feed(encode_frame(1, 9, b"")) == [Frame(1, 9, 0, b"")]


def test_client_stream_ids_are_odd() -> None:
    ids = ClientStreamIds()
    assert [ids.next() for _ in range(4)] == [1, 3, 5, 7]
    assert ttrpc.is_client_stream(1)
    assert not ttrpc.is_client_stream(2)


def test_request_envelope() -> None:
    data = ttrpc.encode_request(
        "nri.pkg.api.v1alpha1.Plugin", "Configure", b"\x0a\x00", 5_000_000, [("k", "v")]
    )
    req = ttrpc.decode_request(data)
    assert req.service == "nri.pkg.api.v1alpha1.Plugin"
    assert req.method == "Configure"
    assert req.payload == b"\x0a\x00"
    assert req.timeout_nano == 5_000_000
    assert [(kv.key, kv.value) for kv in req.metadata] == [("k", "v")]


def test_response_always_carries_a_status() -> None:
    # Go ttrpc clients reject a response without status, even a successful one.
    data = ttrpc.encode_response(b"")
    assert data == b"\x0a\x00"
    rsp = ttrpc.decode_response(data)
    assert rsp.HasField("status") and rsp.status.code == 0
    err = ttrpc.decode_response(ttrpc.encode_response(code=ttrpc.Code.UNIMPLEMENTED, message="no"))
    assert (err.status.code, err.status.message, err.payload) == (12, "no", b"")


def test_malformed_envelopes() -> None:
    with pytest.raises(TtrpcProtocolError, match="malformed ttrpc request"):
        ttrpc.decode_request(b"\x0a\x05ab")
    with pytest.raises(TtrpcProtocolError, match="malformed ttrpc response"):
        ttrpc.decode_response(b"\xff")


def test_status_details_are_length_delimited() -> None:
    # google.rpc.Status.details is repeated Any (a message): bytes on the wire.
    status = ttrpc_pb2.Status(code=2, message="m", details=[b"\x0a\x01x"])
    assert ttrpc_pb2.Status.FromString(status.SerializeToString()).details == [b"\x0a\x01x"]
