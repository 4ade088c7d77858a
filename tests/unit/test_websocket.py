"""RFC 6455 framing (sans-IO), the opening handshake and the Kubernetes channel framing."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cripy.streaming.websocket import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    Event,
    HandshakeError,
    Opcode,
    Ping,
    Pong,
    Role,
    State,
    TextMessage,
    WebSocketClosedError,
    WebSocketConnection,
    WebSocketProtocolError,
    accept_key,
    accept_response,
    apply_mask,
    client_handshake_request,
    decode_channel,
    encode_channel,
    encode_frame,
    encode_stream_close,
    error_response,
    make_client_key,
    parse_client_handshake,
    select_subprotocol,
)

MASK = b"\x37\xfa\x21\x3d"


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    return encode_frame(opcode, payload, fin=fin, mask=MASK, rsv=rsv)


def server() -> WebSocketConnection:
    return WebSocketConnection(Role.SERVER)


def parse_server_frames(data: bytes) -> list[Event]:
    """Decode what a server sent, with an independent client-role connection."""
    return WebSocketConnection(Role.CLIENT).receive_data(data)


def protocol_error(conn: WebSocketConnection, data: bytes) -> WebSocketProtocolError:
    with pytest.raises(WebSocketProtocolError) as info:
        conn.receive_data(data)
    return info.value


# --- handshake ------------------------------------------------------------------------


def test_accept_key_rfc_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def good_headers(**extra: str) -> list[tuple[str, str]]:
    headers = {
        "host": "node:10250",
        "upgrade": "websocket",
        "connection": "keep-alive, Upgrade",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        "sec-websocket-version": "13",
    }
    headers.update(extra)
    return list(headers.items())


def test_parse_client_handshake() -> None:
    headers = good_headers() + [
        ("sec-websocket-protocol", "v4.channel.k8s.io, v5.channel.k8s.io"),
        ("Sec-WebSocket-Protocol", "base64.channel.k8s.io"),
    ]
    request = parse_client_handshake(headers)
    assert request.key == "dGhlIHNhbXBsZSBub25jZQ=="
    assert request.protocols == ["v4.channel.k8s.io", "v5.channel.k8s.io", "base64.channel.k8s.io"]


def test_handshake_upgrade_tokens_are_case_insensitive() -> None:
    request = parse_client_handshake(good_headers(upgrade="WebSocket", connection="UPGRADE"))
    assert request.protocols == []


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"upgrade": "h2c"}, 400),
        ({"connection": "keep-alive"}, 400),
        ({"sec-websocket-version": "8"}, 426),
        ({"sec-websocket-key": "c2hvcnQ="}, 400),
        ({"sec-websocket-key": "not base64!!"}, 400),
    ],
)
def test_handshake_rejections(change: dict[str, str], status: int) -> None:
    with pytest.raises(HandshakeError) as info:
        parse_client_handshake(good_headers(**change))
    assert info.value.status == status
    if status == 426:
        assert ("Sec-WebSocket-Version", "13") in info.value.headers


def test_handshake_missing_key_or_two_keys() -> None:
    headers = [h for h in good_headers() if h[0] != "sec-websocket-key"]
    with pytest.raises(HandshakeError):
        parse_client_handshake(headers)
    with pytest.raises(HandshakeError):
        parse_client_handshake(good_headers() + [("sec-websocket-key", make_client_key())])


def test_select_subprotocol_prefers_our_order() -> None:
    ours = ["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"]
    assert select_subprotocol(["channel.k8s.io", "v5.channel.k8s.io"], ours) == "v5.channel.k8s.io"
    assert select_subprotocol(["channel.k8s.io"], ours) == "channel.k8s.io"
    assert select_subprotocol(["chat"], ours) is None


def test_responses() -> None:
    ok = accept_response("dGhlIHNhbXBsZSBub25jZQ==", "v5.channel.k8s.io").decode()
    assert ok.startswith("HTTP/1.1 101 Switching Protocols\r\n")
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in ok
    assert "Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n" in ok
    assert ok.endswith("\r\n\r\n")
    assert "Sec-WebSocket-Protocol" not in accept_response("x", None).decode()
    bad = error_response(400, "no good")
    head, body = bad.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 Bad Request")
    assert body == b"no good\n"
    assert f"Content-Length: {len(body)}".encode() in head


def test_client_handshake_request_is_accepted() -> None:
    key = make_client_key()
    raw = client_handshake_request("h", "/x", key, ["v5.channel.k8s.io"]).decode()
    lines = raw.split("\r\n")
    assert lines[0] == "GET /x HTTP/1.1"
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if line]
    request = parse_client_handshake([(k.lower(), v) for k, v in headers])
    assert request.key == key and request.protocols == ["v5.channel.k8s.io"]


# --- frames ---------------------------------------------------------------------------


def test_masking_is_an_involution() -> None:
    data = os.urandom(1001)
    assert apply_mask(apply_mask(data, MASK), MASK) == data
    assert apply_mask(b"", MASK) == b""
    # RFC 6455 5.7: a masked "Hello"
    assert encode_frame(Opcode.TEXT, b"Hello", mask=b"\x37\xfa\x21\x3d") == bytes.fromhex(
        "818537fa213d7f9f4d5158"
    )


@pytest.mark.parametrize(
    ("size", "header_len"),
    [(0, 2), (1, 2), (125, 2), (126, 4), (65535, 4), (65536, 10), (1 << 20, 10)],
)
def test_frame_lengths_roundtrip(size: int, header_len: int) -> None:
    payload = os.urandom(size)
    frame = encode_frame(Opcode.BINARY, payload)
    assert len(frame) == header_len + size  # unmasked, as a server sends
    assert parse_server_frames(frame) == [BinaryMessage(payload)]
    masked = client_frame(Opcode.BINARY, payload)
    assert len(masked) == header_len + 4 + size
    assert server().receive_data(masked) == [BinaryMessage(payload)]


def test_rfc_unmasked_examples() -> None:
    client = WebSocketConnection(Role.CLIENT)
    assert client.receive_data(bytes.fromhex("810548656c6c6f")) == [TextMessage("Hello")]
    # fragmented: "Hel" + "lo"
    assert client.receive_data(bytes.fromhex("010348656c800" "26c6f")) == [TextMessage("Hello")]
    # unmasked ping "Hello"
    assert client.receive_data(bytes.fromhex("890548656c6c6f")) == [Ping(b"Hello")]


def test_byte_at_a_time_is_need_more_data() -> None:
    conn = server()
    frames = client_frame(Opcode.TEXT, "héllo".encode()) + client_frame(Opcode.BINARY, b"x" * 300)
    events: list[Event] = []
    for i in range(len(frames)):
        events += conn.receive_data(frames[i : i + 1])
    assert events == [TextMessage("héllo"), BinaryMessage(b"x" * 300)]


def test_several_frames_in_one_read() -> None:
    conn = server()
    data = b"".join(client_frame(Opcode.BINARY, bytes([i])) for i in range(10))
    assert conn.receive_data(data) == [BinaryMessage(bytes([i])) for i in range(10)]


def test_fragmented_message_with_interleaved_ping() -> None:
    conn = server()
    events = conn.receive_data(
        client_frame(Opcode.BINARY, b"ab", fin=False)
        + client_frame(Opcode.CONTINUATION, b"cd", fin=False)
        + client_frame(Opcode.PING, b"p")
        + client_frame(Opcode.CONTINUATION, b"ef")
    )
    assert events == [Ping(b"p"), BinaryMessage(b"abcdef")]
    assert parse_server_frames(conn.data_to_send()) == [Pong(b"p")]


def test_fragmented_text_split_inside_a_character() -> None:
    raw = "zß€𝄞".encode()
    conn = server()
    events: list[Event] = []
    for i, piece in enumerate(raw[j : j + 1] for j in range(len(raw))):
        opcode = Opcode.TEXT if i == 0 else Opcode.CONTINUATION
        events += conn.receive_data(client_frame(opcode, piece, fin=i == len(raw) - 1))
    assert events == [TextMessage("zß€𝄞")]


def test_ping_is_answered_pong_is_reported() -> None:
    conn = server()
    assert conn.receive_data(client_frame(Opcode.PING, b"hi")) == [Ping(b"hi")]
    assert conn.data_to_send() == encode_frame(Opcode.PONG, b"hi")
    assert conn.receive_data(client_frame(Opcode.PONG, b"yo")) == [Pong(b"yo")]
    assert conn.data_to_send() == b""


def test_server_sends_unmasked_client_masks() -> None:
    conn = server()
    conn.send(b"\x01data")
    conn.send("1ZGF0YQ==")
    conn.ping(b"x")
    out = conn.data_to_send()
    assert out[1] & 0x80 == 0
    expected = [BinaryMessage(b"\x01data"), TextMessage("1ZGF0YQ=="), Ping(b"x")]
    assert parse_server_frames(out) == expected
    client = WebSocketConnection(Role.CLIENT)
    client.send_binary(b"abc")
    wire = client.data_to_send()
    assert wire[1] & 0x80
    assert server().receive_data(wire) == [BinaryMessage(b"abc")]


# --- close ----------------------------------------------------------------------------


def test_close_initiated_by_client() -> None:
    conn = server()
    events = conn.receive_data(client_frame(Opcode.CLOSE, (1001).to_bytes(2, "big") + b"bye"))
    assert events == [CloseReceived(1001, "bye")]
    assert conn.state is State.CLOSED
    assert parse_server_frames(conn.data_to_send()) == [CloseReceived(1001, "")]
    # after the close, input is ignored and sending is refused
    assert conn.receive_data(client_frame(Opcode.BINARY, b"late")) == []
    with pytest.raises(WebSocketClosedError):
        conn.send_binary(b"x")


def test_close_initiated_by_server() -> None:
    conn = server()
    conn.close(CloseCode.NORMAL, "done")
    state: State = conn.state
    assert state is State.CLOSING
    assert parse_server_frames(conn.data_to_send()) == [CloseReceived(1000, "done")]
    conn.close()  # idempotent
    assert conn.data_to_send() == b""
    # data may still arrive until the client's close
    assert conn.receive_data(client_frame(Opcode.BINARY, b"x")) == [BinaryMessage(b"x")]
    assert conn.receive_data(client_frame(Opcode.CLOSE, b"")) == [CloseReceived(1005, "")]
    assert conn.state is State.CLOSED
    assert conn.data_to_send() == b""  # no second close frame


def test_empty_close_is_echoed_empty() -> None:
    conn = server()
    conn.receive_data(client_frame(Opcode.CLOSE, b""))
    assert conn.data_to_send() == encode_frame(Opcode.CLOSE, b"")


def test_close_rejects_unsendable_codes() -> None:
    conn = server()
    for code in (999, 1004, 1005, 1006, 1015, 2000, 5000):
        with pytest.raises(ValueError):
            conn.close(code)
    with pytest.raises(ValueError):
        conn.close(1000, "x" * 124)


# --- malformed input ------------------------------------------------------------------


def expect_failure(data: bytes, code: int) -> None:
    conn = server()
    error = protocol_error(conn, data)
    assert error.code == code
    assert conn.state is State.CLOSED
    assert parse_server_frames(conn.data_to_send()) == [CloseReceived(code, "")]
    assert conn.receive_data(client_frame(Opcode.BINARY, b"more")) == []


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_reserved_bits(rsv: int) -> None:
    expect_failure(client_frame(Opcode.BINARY, b"x", rsv=rsv), 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcodes(opcode: int) -> None:
    expect_failure(client_frame(opcode, b""), 1002)


def test_unmasked_client_frame() -> None:
    expect_failure(encode_frame(Opcode.BINARY, b"x"), 1002)


def test_masked_server_frame_rejected_by_client() -> None:
    client = WebSocketConnection(Role.CLIENT)
    assert protocol_error(client, client_frame(Opcode.BINARY, b"x")).code == 1002


@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE])
def test_control_frames_too_long_or_fragmented(opcode: int) -> None:
    payload = (1000).to_bytes(2, "big") + b"x" * 124
    expect_failure(client_frame(opcode, payload), 1002)
    expect_failure(client_frame(opcode, b"", fin=False), 1002)


def test_continuation_without_start() -> None:
    expect_failure(client_frame(Opcode.CONTINUATION, b"x"), 1002)


def test_new_message_inside_fragmented_one() -> None:
    data = client_frame(Opcode.TEXT, b"a", fin=False) + client_frame(Opcode.BINARY, b"b")
    expect_failure(data, 1002)


def test_invalid_utf8_text() -> None:
    expect_failure(client_frame(Opcode.TEXT, b"\xff"), 1007)
    expect_failure(client_frame(Opcode.TEXT, b"\xed\xa0\x80"), 1007)  # a surrogate
    expect_failure(client_frame(Opcode.TEXT, b"\xc0\xaf"), 1007)  # overlong
    # truncated at the end of the message
    expect_failure(client_frame(Opcode.TEXT, "€".encode()[:2]), 1007)
    # detected in the first fragment, before the message ends
    expect_failure(client_frame(Opcode.TEXT, b"ok\xfe", fin=False), 1007)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x03", 1002),  # one byte
        ((999).to_bytes(2, "big"), 1002),
        ((1004).to_bytes(2, "big"), 1002),
        ((1005).to_bytes(2, "big"), 1002),
        ((1006).to_bytes(2, "big"), 1002),
        ((1015).to_bytes(2, "big"), 1002),
        ((2999).to_bytes(2, "big"), 1002),
        ((5000).to_bytes(2, "big"), 1002),
        ((1000).to_bytes(2, "big") + b"\xff", 1007),
    ],
)
def test_bad_close_payloads(payload: bytes, code: int) -> None:
    expect_failure(client_frame(Opcode.CLOSE, payload), code)


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999])
def test_valid_close_codes(code: int) -> None:
    conn = server()
    assert conn.receive_data(client_frame(Opcode.CLOSE, code.to_bytes(2, "big"))) == [
        CloseReceived(code, "")
    ]


def test_message_too_big_single_frame_fails_on_the_header() -> None:
    conn = WebSocketConnection(Role.SERVER, max_message_size=1000)
    header = client_frame(Opcode.BINARY, b"x" * 1001)[:8]  # no payload yet
    assert protocol_error(conn, header).code == 1009
    assert parse_server_frames(conn.data_to_send()) == [CloseReceived(1009, "")]


def test_message_too_big_across_fragments() -> None:
    conn = WebSocketConnection(Role.SERVER, max_message_size=1000)
    assert conn.receive_data(client_frame(Opcode.BINARY, b"x" * 600, fin=False)) == []
    error = protocol_error(conn, client_frame(Opcode.CONTINUATION, b"x" * 401))
    assert error.code == 1009
    ok = WebSocketConnection(Role.SERVER, max_message_size=1000)
    ok.receive_data(client_frame(Opcode.BINARY, b"x" * 600, fin=False))
    assert ok.receive_data(client_frame(Opcode.CONTINUATION, b"x" * 400)) == [
        BinaryMessage(b"x" * 1000)
    ]


def test_default_limit_is_16_mib() -> None:
    conn = server()
    header = bytes([0x82, 0xFF]) + (16 * 1024 * 1024 + 1).to_bytes(8, "big")
    assert protocol_error(conn, header).code == 1009


def test_64_bit_length_with_high_bit() -> None:
    expect_failure(bytes([0x82, 0xFF]) + (1 << 63).to_bytes(8, "big") + MASK, 1002)


def test_error_carries_the_events_before_it() -> None:
    conn = server()
    data = client_frame(Opcode.BINARY, b"a") + client_frame(Opcode.PING, b"p")
    error = protocol_error(conn, data + client_frame(Opcode.BINARY, b"b", rsv=1))
    assert error.events == [BinaryMessage(b"a"), Ping(b"p")]
    # the pong was queued before the fault, then the close that reports it
    assert parse_server_frames(conn.data_to_send()) == [Pong(b"p"), CloseReceived(1002, "")]


def test_truncated_frames_are_not_errors() -> None:
    full = client_frame(Opcode.BINARY, b"y" * 70000)
    for cut in (1, 2, 3, 9, 10, 13, 14, 1000, len(full) - 1):
        assert server().receive_data(full[:cut]) == []


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    conn = WebSocketConnection(Role.SERVER, max_message_size=1 << 16)
    try:
        conn.receive_data(data)
    except WebSocketProtocolError as exc:
        assert exc.code in (1002, 1007, 1009)


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_random_chunks_after_a_good_prefix(chunks: list[bytes]) -> None:
    conn = WebSocketConnection(Role.SERVER, max_message_size=1 << 16)
    conn.receive_data(client_frame(Opcode.TEXT, b"ok", fin=False))
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except WebSocketProtocolError:
            break


@settings(max_examples=100)
@given(st.binary(max_size=5000), st.lists(st.integers(1, 5000), max_size=6), st.booleans())
def test_fragmented_roundtrip(payload: bytes, cuts: list[int], text: bool) -> None:
    if text:
        payload = payload.decode("latin-1").encode()
    bounds = sorted({0, len(payload), *(c for c in cuts if c < len(payload))})
    pieces = [payload[a:b] for a, b in zip(bounds, bounds[1:], strict=False)] or [b""]
    data = b""
    for i, piece in enumerate(pieces):
        opcode = (Opcode.TEXT if text else Opcode.BINARY) if i == 0 else Opcode.CONTINUATION
        data += client_frame(opcode, piece, fin=i == len(pieces) - 1)
    expected = TextMessage(payload.decode()) if text else BinaryMessage(payload)
    assert server().receive_data(data) == [expected]


# --- channels -------------------------------------------------------------------------


def test_channel_binary() -> None:
    assert encode_channel(1, b"out") == b"\x01out"
    assert decode_channel(b"\x00in") == (0, b"in")
    assert decode_channel(b"\x04") == (4, b"")
    assert decode_channel("\x00text") == (0, b"text")  # a text frame in a binary protocol
    assert encode_stream_close(0) == b"\xff\x00"
    assert decode_channel(encode_stream_close(0)) == (255, b"\x00")


def test_channel_base64() -> None:
    # the kubelet's documented example: "foo\n" on stdin
    assert decode_channel("0Zm9vCg==", base64=True) == (0, b"foo\n")
    assert encode_channel(1, b"\n", base64=True) == "1Cg=="
    assert encode_channel(3, b"", base64=True) == "3"
    assert decode_channel(b"2aGk=", base64=True) == (2, b"hi")
    data = os.urandom(200)
    assert decode_channel(encode_channel(4, data, base64=True), base64=True) == (4, data)


@pytest.mark.parametrize("bad", ["", "0Zm9v!", "0Zm9vC", "\x01Zm9v", "/Zm9v"])
def test_channel_base64_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_channel(bad, base64=True)


def test_channel_range() -> None:
    with pytest.raises(ValueError):
        decode_channel(b"")
    with pytest.raises(ValueError):
        encode_channel(256, b"")
    with pytest.raises(ValueError):
        encode_channel(80, b"", base64=True)


@given(st.integers(0, 255), st.binary(max_size=200))
def test_channel_roundtrip(channel: int, data: bytes) -> None:
    assert decode_channel(encode_channel(channel, data)) == (channel, data)
    if channel < 80:
        message = encode_channel(channel, data, base64=True)
        assert isinstance(message, str)
        assert decode_channel(message, base64=True) == (channel, data)
        assert base64.b64decode(message[1:]) == data
