"""NRI connection multiplexer (sans-IO): frame layout, reassembly, Go-compatible cuts."""

from __future__ import annotations

import pytest

from cripy.nri import mux, ttrpc
from cripy.nri.mux import MuxDecoder, MuxFrame, MuxProtocolError, encode_frame, frames_for_message


def test_reserved_connection_ids() -> None:
    assert mux.PLUGIN_SERVICE_CONN == 1
    assert mux.RUNTIME_SERVICE_CONN == 2
    with pytest.raises(ValueError, match="reserved"):
        encode_frame(0, b"x")


def test_frame_layout() -> None:
    assert encode_frame(2, b"abc") == b"\x00\x00\x00\x02\x00\x00\x00\x03abc"


def test_round_trip_and_partial_reads() -> None:
    raw = encode_frame(1, b"hello") + encode_frame(2, b"") + encode_frame(7, b"z" * 100)
    dec = MuxDecoder()
    out: list[MuxFrame] = []
    for i in range(0, len(raw), 3):
        out += dec.feed(raw[i : i + 3])
    assert out == [MuxFrame(1, b"hello"), MuxFrame(2, b""), MuxFrame(7, b"z" * 100)]
    assert dec.buffered == 0


def test_oversized_frame_is_refused_both_ways() -> None:
    assert mux.MAX_PAYLOAD == ttrpc.MAX_MESSAGE_LENGTH + ttrpc.HEADER_LENGTH
    with pytest.raises(ValueError, match="exceeds the maximum"):
        encode_frame(1, b"\0" * (mux.MAX_PAYLOAD + 1))
    header = b"\x00\x00\x00\x01" + (mux.MAX_PAYLOAD + 1).to_bytes(4, "big")
    with pytest.raises(MuxProtocolError, match="more than the maximum"):
        MuxDecoder().feed(header)


def test_small_message_is_one_frame() -> None:
    msg = ttrpc.encode_frame(1, ttrpc.MessageType.REQUEST, b"q" * 100)
    assert MuxDecoder().feed(frames_for_message(1, msg)) == [MuxFrame(1, msg)]


@pytest.mark.parametrize("data_len", [4086, 4087, 5000, 8200, 100_000])
def test_large_message_is_cut_like_the_go_writer(data_len: int) -> None:
    # The Go side writes a ttrpc message through a 4096-byte buffer: the header and the
    # first data bytes fill one frame, the rest goes out as one more frame.
    msg = ttrpc.encode_frame(1, ttrpc.MessageType.REQUEST, b"q" * data_len)
    frames = MuxDecoder().feed(frames_for_message(2, msg))
    sizes = [len(f.payload) for f in frames]
    if len(msg) <= mux.GO_BUFFER_SIZE:
        assert sizes == [len(msg)]
    else:
        assert sizes == [mux.GO_BUFFER_SIZE, len(msg) - mux.GO_BUFFER_SIZE]
    assert b"".join(f.payload for f in frames) == msg
    assert {f.conn_id for f in frames} == {2}


def test_interleaved_connections_reassemble_per_connection() -> None:
    a = ttrpc.encode_frame(1, ttrpc.MessageType.REQUEST, b"a" * 6000)
    b = ttrpc.encode_frame(1, ttrpc.MessageType.RESPONSE, b"b")
    raw = frames_for_message(1, a) + frames_for_message(2, b)
    per_conn = {1: ttrpc.FrameDecoder(), 2: ttrpc.FrameDecoder()}
    got: dict[int, list[bytes]] = {1: [], 2: []}
    for frame in MuxDecoder().feed(raw):
        for m in per_conn[frame.conn_id].feed(frame.payload):
            assert isinstance(m, ttrpc.Frame)
            got[frame.conn_id].append(m.data)
    assert got == {1: [b"a" * 6000], 2: [b"b"]}
