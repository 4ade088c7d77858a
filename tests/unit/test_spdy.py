"""The sans-IO SPDY/3.1 connection: frames, header compression, flow control, errors."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cripy.streaming.spdy import (
    DEFAULT_WINDOW,
    HEADER_DICTIONARY,
    DataReceived,
    Event,
    GoAwayReceived,
    GoAwayStatus,
    HeadersReceived,
    PingAcknowledged,
    PingReceived,
    RstStatus,
    Setting,
    SettingsReceived,
    SpdyConnection,
    SpdyProtocolError,
    SpdyStreamError,
    StreamEnded,
    StreamOpened,
    StreamReplied,
    StreamReset,
    WindowUpdated,
    header_value,
)


def pair(strict: bool = False) -> tuple[SpdyConnection, SpdyConnection]:
    return (SpdyConnection(client=True, strict_flow_control=strict),
            SpdyConnection(client=False, strict_flow_control=strict))


def move(src: SpdyConnection, dst: SpdyConnection) -> list[Event]:
    return dst.receive_data(src.data_to_send())


def control(kind: int, payload: bytes, flags: int = 0, version: int = 3) -> bytes:
    return struct.pack(">HHI", 0x8000 | version, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">II", stream_id, (flags << 24) | len(payload)) + payload


def test_dictionary_is_the_spdy3_one() -> None:
    assert len(HEADER_DICTIONARY) == 1423
    assert HEADER_DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert HEADER_DICTIONARY.endswith(b",*,enq=0.")
    assert zlib.adler32(HEADER_DICTIONARY) == 0xE3C6A7C2


def test_syn_stream_reply_data_fin_round_trip() -> None:
    client, server = pair()
    sid = client.open_stream([("streamType", "stdin"), ("x", "a"), ("x", "b")], priority=3)
    assert sid == 1
    events = move(client, server)
    settings_less = [e for e in events if not isinstance(e, SettingsReceived)]
    assert settings_less == [StreamOpened(1, [("streamtype", "stdin"), ("x", "a"), ("x", "b")],
                                          priority=3)]
    server.reply(1, [("status", "ok")])
    assert move(server, client) == [StreamReplied(1, [("status", "ok")])]
    client.send_data(1, b"hello")
    client.send_data(1, b" world", fin=True)
    assert move(client, server) == [DataReceived(1, b"hello"), DataReceived(1, b" world", True),
                                    StreamEnded(1)]
    server.send_data(1, b"bye", fin=True)
    assert move(server, client) == [DataReceived(1, b"bye", True), StreamEnded(1)]
    assert not client.is_open(1) and not server.is_open(1)


def test_headers_rst_settings_ping_goaway_window_update() -> None:
    client, server = pair()
    client.open_stream([("a", "1")])
    move(client, server)
    server.reply(1)
    move(server, client)
    client.send_headers(1, [("trailer", "yes")], fin=True)
    assert move(client, server) == [HeadersReceived(1, [("trailer", "yes")], True),
                                    StreamEnded(1)]
    server.reset_stream(1, RstStatus.INTERNAL_ERROR)
    assert move(server, client) == [StreamReset(1, RstStatus.INTERNAL_ERROR)]
    server.send_settings({Setting.MAX_CONCURRENT_STREAMS: 10, Setting.INITIAL_WINDOW_SIZE: 1000},
                         clear=True)
    assert move(server, client) == [SettingsReceived(
        {Setting.MAX_CONCURRENT_STREAMS: 10, Setting.INITIAL_WINDOW_SIZE: 1000}, True)]
    ping = client.ping()
    assert ping % 2 == 1
    assert move(client, server) == [PingReceived(ping)]
    assert move(server, client) == [PingAcknowledged(ping)]
    server_ping = server.ping()
    assert server_ping % 2 == 0
    assert move(server, client) == [PingReceived(server_ping)]
    assert move(client, server) == [PingAcknowledged(server_ping)]
    client.open_stream([("b", "2")])
    move(client, server)
    server.send_data(3, b"x")
    move(server, client)
    client.acknowledge_data(3, 1)
    client.goaway(GoAwayStatus.OK)
    assert move(client, server) == [GoAwayReceived(0, GoAwayStatus.OK)]
    with pytest.raises(SpdyStreamError):
        server.open_stream([("c", "3")])
    raw = control(9, struct.pack(">II", 3, 500))
    assert server.receive_data(raw) == [WindowUpdated(3, 500)]


def test_unidirectional_and_fin_on_syn() -> None:
    client, server = pair()
    client.open_stream([("k", "v")], fin=True, unidirectional=True)
    events = [e for e in move(client, server) if not isinstance(e, SettingsReceived)]
    assert events == [StreamOpened(1, [("k", "v")], fin=True, unidirectional=True),
                      StreamEnded(1)]
    assert not server.is_open(1)


def test_header_compression_shares_one_context() -> None:
    client, server = pair()
    sizes = []
    for i in range(200):
        headers = [("streamtype", "data"), ("port", "8080"), ("requestid", str(i))]
        client.open_stream(headers)
        wire = client.data_to_send()
        sizes.append(len(wire))
        events = server.receive_data(wire)
        opened = [e for e in events if isinstance(e, StreamOpened)]
        assert opened[0].headers == headers
        assert header_value(opened[0].headers, "RequestID") == str(i)
    # Later blocks refer back to earlier ones: far smaller than the first.
    assert sizes[-1] < sizes[0] // 2
    # A fresh inflater (no shared context) cannot read a later block on its own.
    client.open_stream([("streamtype", "data")])
    late = client.data_to_send()
    with pytest.raises(SpdyProtocolError):
        SpdyConnection(client=False).receive_data(late)


def test_frames_split_at_every_byte() -> None:
    client, server = pair()
    client.open_stream([("a", "b")])
    client.send_data(1, b"0123456789", fin=True)
    wire = client.data_to_send()
    events: list[Event] = []
    for i in range(len(wire)):
        events += server.receive_data(wire[i:i + 1])
    assert [e for e in events if not isinstance(e, SettingsReceived)] == [
        StreamOpened(1, [("a", "b")]), DataReceived(1, b"0123456789", True), StreamEnded(1)]


def test_sending_past_the_window_waits_for_window_update() -> None:
    client, server = pair(strict=True)
    client.open_stream([("a", "b")])
    move(client, server)
    server.reply(1)
    move(server, client)
    payload = bytes(range(256)) * 1024  # 256 KiB
    client.send_data(1, payload, fin=True)
    got = bytearray()
    fin = False
    rounds = 0
    while not fin:
        rounds += 1
        events = move(client, server)
        received = [e for e in events if isinstance(e, DataReceived)]
        if rounds == 1:
            assert sum(len(e.data) for e in received) == DEFAULT_WINDOW
            assert client.pending_data(1) == len(payload) - DEFAULT_WINDOW
            assert client.data_to_send() == b""  # blocked
        for event in received:
            got += event.data
            fin = fin or event.fin
            server.acknowledge_data(1, len(event.data))
        updates = move(server, client)
        assert updates or fin
        assert all(isinstance(e, WindowUpdated) for e in updates)
    assert bytes(got) == payload
    assert rounds > 3


def test_receiving_emits_window_update_as_data_is_consumed() -> None:
    client, server = pair()
    client.open_stream([("a", "b")])
    move(client, server)
    client.send_data(1, b"x" * 40000)
    move(client, server)
    server.acknowledge_data(1, 20000)
    assert server.data_to_send() == b""  # under half a window: nothing yet
    server.acknowledge_data(1, 20000)
    events = client.receive_data(server.data_to_send())
    assert WindowUpdated(0, 40000) in events and WindowUpdated(1, 40000) in events


def test_lenient_mode_sends_until_the_peer_shows_flow_control() -> None:
    client, server = pair()
    client.open_stream([("a", "b")])
    client.send_data(1, b"y" * 200_000)
    assert client.pending_data(1) == 0  # a peer like spdystream never opens windows
    move(client, server)
    server.send_settings({Setting.INITIAL_WINDOW_SIZE: DEFAULT_WINDOW})
    move(server, client)
    client.send_data(1, b"z" * 10)
    assert client.pending_data(1) == 10  # now honouring: the window is far overdrawn


def test_settings_initial_window_adjusts_open_streams() -> None:
    client, server = pair(strict=True)
    client.open_stream([("a", "b")])
    move(client, server)
    server.send_settings({Setting.INITIAL_WINDOW_SIZE: 100})
    move(server, client)
    assert client.send_window(1) == 100
    client.send_data(1, b"q" * 150)
    assert client.pending_data(1) == 50


def test_strict_receiver_resets_a_stream_that_overruns_its_window() -> None:
    client = SpdyConnection(client=True)
    server = SpdyConnection(client=False, strict_flow_control=True)
    server.send_settings({Setting.INITIAL_WINDOW_SIZE: 10})
    client.open_stream([("a", "b")])
    client.send_data(1, b"x" * 11)
    events = move(client, server)
    assert StreamReset(1, RstStatus.FLOW_CONTROL_ERROR, remote=False) in events


def test_frames_for_closed_streams_are_dropped() -> None:
    client, server = pair()
    client.open_stream([("a", "b")])
    move(client, server)
    server.reset_stream(1)
    client.send_data(1, b"late data")
    assert move(client, server) == []


def _raw_block(raw: bytes) -> bytes:
    deflate = zlib.compressobj(zdict=HEADER_DICTIONARY)
    return deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH)


def _blocks(raw: bytes, count: int) -> list[bytes]:
    """`count` blocks from one compression context, as a peer sends them."""
    deflate = zlib.compressobj(zdict=HEADER_DICTIONARY)
    return [deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH) for _ in range(count)]


NO_HEADERS = _raw_block(struct.pack(">I", 0))


@pytest.mark.parametrize(("wire", "reason"), [
    (control(1, b"\0" * 12, version=2), "version 2"),
    (control(6, b"\0\0\0\1\0"), "PING of 5 bytes"),
    (control(3, b"\0\0\0\1"), "RST_STREAM of 4 bytes"),
    (control(7, b"\0\0\0\0"), "GOAWAY of 4 bytes"),
    (control(9, b"\0\0\0\0\0\0\0\1\0"), "WINDOW_UPDATE of 9 bytes"),
    (control(9, struct.pack(">II", 0, 0)), "WINDOW_UPDATE of 0"),
    (control(4, struct.pack(">I", 2) + b"\0" * 8), "for 2 entries"),
    (control(1, b"\0" * 8), "too short"),
    (control(1, struct.pack(">IIH", 2, 0, 0) + NO_HEADERS), "wrong parity"),
    (control(1, struct.pack(">IIH", 0, 0, 0) + NO_HEADERS), "stream id 0"),
    (control(1, struct.pack(">IIH", 1, 0, 0) + b"not zlib at all"), "does not inflate"),
    (control(2, struct.pack(">I", 7) + NO_HEADERS), "peer opened"),
    (control(2, struct.pack(">I", 8) + NO_HEADERS), "never opened"),
    (data_frame(5, b"abc"), "never opened"),
    (data_frame(0, b"abc"), "stream 0"),
    (control(3, struct.pack(">II", 9, 5)), "never opened"),
    (control(9, struct.pack(">II", 3, 5)), "never opened"),
    (control(8, struct.pack(">I", 3) + NO_HEADERS), "never opened"),
    (struct.pack(">II", 1, 0x00FFFFFF), "exceeds the limit"),
    (b"".join(control(1, struct.pack(">IIH", sid, 0, 0) + block)
              for sid, block in zip((3, 1), _blocks(struct.pack(">I", 0), 2), strict=True)),
     "not above 3"),
])
def test_malformed_input_raises_protocol_error(wire: bytes, reason: str) -> None:
    server = SpdyConnection(client=False)
    with pytest.raises(SpdyProtocolError, match=reason):
        server.receive_data(wire)
    with pytest.raises(SpdyProtocolError):  # the connection stays failed
        server.receive_data(b"")
    server.goaway(GoAwayStatus.PROTOCOL_ERROR)
    assert server.data_to_send().startswith(b"\x80\x03\x00\x07")


@pytest.mark.parametrize("raw", [
    b"",  # no count
    struct.pack(">I", 1),  # count without pairs
    struct.pack(">II", 1, 0) + struct.pack(">I", 0),  # empty name
    struct.pack(">I", 2) + (struct.pack(">I", 1) + b"a" + struct.pack(">I", 1) + b"b") * 2,
    struct.pack(">II", 1, 1) + b"a" + struct.pack(">I", 3) + b"x\0\0",  # empty value part
    struct.pack(">II", 1, 1) + b"a" + struct.pack(">I", 1) + b"bEXTRA",  # trailing bytes
    struct.pack(">II", 1, 100) + b"a",  # name longer than the block
    struct.pack(">I", 0xFFFFFFFF),  # absurd count
])
def test_malformed_header_blocks(raw: bytes) -> None:
    server = SpdyConnection(client=False)
    with pytest.raises(SpdyProtocolError):
        server.receive_data(control(1, struct.pack(">IIH", 1, 0, 0) + _raw_block(raw)))


def test_header_block_inflating_past_the_limit() -> None:
    server = SpdyConnection(client=False, max_header_block=1000)
    raw = struct.pack(">II", 1, 1) + b"a" + struct.pack(">I", 5000) + b"v" * 5000
    with pytest.raises(SpdyProtocolError):
        server.receive_data(control(1, struct.pack(">IIH", 1, 0, 0) + _raw_block(raw)))


def test_truncated_frame_waits_for_more() -> None:
    client, server = pair()
    client.open_stream([("a", "b")])
    client.send_data(1, b"payload")
    wire = client.data_to_send()
    assert [e for e in server.receive_data(wire[:-3]) if isinstance(e, DataReceived)] == []
    assert DataReceived(1, b"payload") in server.receive_data(wire[-3:])


def test_unknown_control_frames_are_ignored() -> None:
    server = SpdyConnection(client=False)
    assert server.receive_data(control(10, b"credential") + control(5, b"")) == []


def test_local_misuse_raises_stream_error() -> None:
    client, server = pair()
    with pytest.raises(SpdyStreamError):
        client.send_data(7, b"x")
    sid = client.open_stream([("a", "b")])
    client.send_data(sid, b"", fin=True)
    with pytest.raises(SpdyStreamError):
        client.send_data(sid, b"more")
    with pytest.raises(SpdyStreamError):
        client.reply(sid)


def _valid_stream() -> bytes:
    client = SpdyConnection(client=True)
    for i in range(5):
        client.open_stream([("streamtype", "data"), ("requestid", str(i))])
        client.send_data(2 * i + 1, bytes([i]) * 100, fin=i % 2 == 0)
    client.ping()
    client.send_settings({Setting.INITIAL_WINDOW_SIZE: 1234})
    client.goaway()
    return client.data_to_send()


def _feed_all(data: bytes, chunk: int) -> None:
    server = SpdyConnection(client=False)
    try:
        for i in range(0, len(data), chunk):
            server.receive_data(data[i:i + chunk])
    except SpdyProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
def test_random_bytes_only_raise_protocol_errors(data: bytes, chunk: int) -> None:
    _feed_all(data, chunk)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_streams_only_raise_protocol_errors(data: st.DataObject) -> None:
    wire = bytearray(_valid_stream())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] = data.draw(st.integers(0, 255))
    _feed_all(bytes(wire), data.draw(st.integers(1, 300)))


def test_random_frame_headers_with_valid_versions() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        kind = rng.choice([1, 2, 3, 4, 6, 7, 8, 9, 10, rng.randrange(65536)])
        payload = rng.randbytes(rng.randrange(0, 40))
        frame = (control(kind, payload, rng.randrange(256)) if rng.random() < 0.7
                 else data_frame(rng.randrange(1 << 31), payload, rng.randrange(256)))
        _feed_all(frame, rng.randrange(1, 16))
