"""Exec, Attach and PortForward over WebSocket, as the kubelet's streaming server does.

Remote command (`channel.k8s.io` family): channel 0 stdin, 1 stdout, 2 stderr, 3 error
(the final status), 4 resize (JSON `{"Width": w, "Height": h}`). v4 and v5 send the
status as metav1.Status JSON; the pre-v4 protocols send only a failure's message. v5
adds the stream close signal: a binary message `[255, stream]`; for stdin it is EOF.
Without v5 the client's stdin ends only with the connection.

Port forward (kubelet WebSocket style): port i of the request uses channel 2i for data
(both ways) and 2i+1 for errors (toward the client); the server opens each channel with
the port as 2 little-endian bytes. The session ends when every port's connection in the
pod has closed, or when the client goes away.

Either way a connection with no Sec-WebSocket-Protocol at all is accepted as the plain
binary protocol, as the kubelet does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from cripy.streaming.remotecommand import (
    STREAM_CLOSE,
    Channel,
    ResizeParser,
    error_channel_message,
)
from cripy.streaming.session import (
    AttachTarget,
    ExecTarget,
    Outcome,
    PortForwardTarget,
    StreamBackend,
    StreamSession,
    TerminalSize,
)
from cripy.streaming.websocket import (
    BinaryMessage,
    CloseCode,
    Event,
    HandshakeError,
    HandshakeRequest,
    Role,
    TextMessage,
    WebSocketConnection,
    WebSocketProtocolError,
    accept_response,
    decode_channel,
    encode_channel,
    error_response,
    parse_client_handshake,
    select_subprotocol,
)
from cripy.tasks import cancel

log = logging.getLogger(__name__)

V5_PROTOCOL = "v5.channel.k8s.io"
WS_REMOTECOMMAND_PROTOCOLS = [
    V5_PROTOCOL,
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
]
# The kubelet's WebSocket port forward speaks only these (plus no protocol at all);
# "portforward.k8s.io" is the SPDY subprotocol.
WS_PORTFORWARD_PROTOCOLS = ["v4.channel.k8s.io", "v4.base64.channel.k8s.io"]
STDIN, STDOUT, STDERR, ERROR, RESIZE = (Channel.STDIN, Channel.STDOUT, Channel.STDERR,
                                       Channel.ERROR, Channel.RESIZE)

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
CHUNK = 32 * 1024  # largest payload per outgoing message, and per socket read
INBOX_DEPTH = 64  # client messages buffered per consumer before reading the socket pauses
RESIZE_DEPTH = 16
MAX_PORTS = 40  # 2 channels each; the base64 protocols' channel characters end at 79
CLOSE_TIMEOUT = 30.0  # for the status, our close frame and the client's reply
SHUTDOWN_TIMEOUT = 5.0

Target = ExecTarget | AttachTarget | PortForwardTarget


async def serve_websocket(
    headers: list[tuple[str, str]],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: Target,
    backend: StreamBackend,
) -> None:
    """Answer an `Upgrade: websocket` request (its head already read) and run the
    session; closes the connection when done. Never raises for the client's faults."""
    try:
        request = parse_client_handshake(headers)
        protocol = _negotiate(request, target)
        _check_target(target)
    except HandshakeError as exc:
        log.info("websocket upgrade refused: %s", exc)
        with contextlib.suppress(OSError):
            writer.write(error_response(exc.status, str(exc), exc.headers))
        await _shutdown(writer)
        return
    peer = _Peer(reader, writer, base64="base64" in protocol)
    try:
        writer.write(accept_response(request.key, protocol or None))
        if isinstance(target, PortForwardTarget):
            await _port_forward(peer, target, backend)
        else:
            await _remote_command(peer, protocol, target, backend)
    except (OSError, TimeoutError) as exc:
        log.info("websocket session ended: %s", exc)
    except Exception:
        log.exception("websocket session failed")
    finally:
        await _shutdown(writer)


def _negotiate(request: HandshakeRequest, target: Target) -> str:
    """The subprotocol to answer with; "" when the client offered none."""
    supported = (
        WS_PORTFORWARD_PROTOCOLS
        if isinstance(target, PortForwardTarget)
        else WS_REMOTECOMMAND_PROTOCOLS
    )
    if not request.protocols:
        return ""
    chosen = select_subprotocol(request.protocols, supported)
    if chosen is None:
        raise HandshakeError(
            f"requested protocol(s) are not supported: {', '.join(request.protocols)}; "
            f"supports {', '.join(supported)}"
        )
    return chosen


def _check_target(target: Target) -> None:
    if isinstance(target, PortForwardTarget):
        if not target.ports:
            raise HandshakeError('query parameter "port" is required')
        if len(target.ports) > MAX_PORTS:
            raise HandshakeError(f"at most {MAX_PORTS} ports per connection")
        for port in target.ports:
            if not 1 <= port <= 65535:
                raise HandshakeError(f"invalid port {port}")
    elif not (target.stdin or target.stdout or target.stderr):
        raise HandshakeError("you must specify at least 1 of stdin, stdout, stderr")


async def _shutdown(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), SHUTDOWN_TIMEOUT)
    except (OSError, TimeoutError):
        writer.transport.abort()


class _Peer:
    """The client end: a server-role WebSocketConnection over the stream pair."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, base64: bool
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.base64 = base64
        self.ws = WebSocketConnection(Role.SERVER, max_message_size=MAX_MESSAGE_SIZE)
        self.broken = False  # the socket failed
        self.gone = asyncio.Event()  # the read loop ended: closed, dropped or malformed

    @property
    def open(self) -> bool:
        return not (self.broken or self.gone.is_set() or self.ws.close_sent)

    async def flush(self) -> None:
        data = self.ws.data_to_send()
        if not data or self.broken:
            return
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError:
            self.broken = True

    async def send(self, channel: int, data: bytes) -> None:
        """`data` on `channel`, in messages of at most CHUNK bytes; dropped once closed."""
        for offset in range(0, max(len(data), 1), CHUNK):
            if not self.open:
                return
            self.ws.send(encode_channel(channel, data[offset : offset + CHUNK], self.base64))
            await self.flush()

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        self.ws.close(code, reason)
        await self.flush()

    async def read_loop(self, on_message: Callable[[int, bytes], Awaitable[None]]) -> None:
        """Feed channel messages to `on_message` until the client closes, the connection
        drops, or a frame (or a stream signal) is malformed: that ends the connection
        with the close code for it. Sets `gone` when done."""
        try:
            await self._read_loop(on_message)
        finally:
            self.gone.set()

    async def _read_loop(self, on_message: Callable[[int, bytes], Awaitable[None]]) -> None:
        while True:
            try:
                data = await self.reader.read(CHUNK)
            except OSError:
                self.broken = True
                return
            if not data:
                return
            try:
                events = self.ws.receive_data(data)
            except WebSocketProtocolError as exc:
                # what came before the bad frame still counts; the close is queued
                log.info("websocket: closing with %d: %s", exc.code, exc)
                await self._dispatch(exc.events, on_message)
                await self.flush()
                return
            if not await self._dispatch(events, on_message):
                return
            await self.flush()
            if self.ws.close_received:
                return

    async def _dispatch(
        self, events: list[Event], on_message: Callable[[int, bytes], Awaitable[None]]
    ) -> bool:
        """Hand the messages on; False if one broke the channel protocol (and so the
        connection is closing)."""
        for event in events:
            if not isinstance(event, TextMessage | BinaryMessage) or not event.data:
                continue  # pings are answered by the connection itself
            try:
                channel, payload = decode_channel(event.data, self.base64)
            except ValueError as exc:  # the kubelet drops such a message too
                log.debug("websocket: dropping message: %s", exc)
                continue
            try:
                await on_message(channel, payload)
            except WebSocketProtocolError as exc:
                log.info("websocket: closing with %d: %s", exc.code, exc)
                if not self.ws.close_sent:
                    self.ws.close(exc.code, str(exc)[:100])
                await self.flush()
                return False
        return True


class _Inbox:
    """Client data for one consumer, ending with None. Bounded, so a consumer that falls
    behind pauses reading the socket; `abandon` when the consumer is gone."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(INBOX_DEPTH)
        self._ended = False
        self._abandoned = False

    async def put(self, data: bytes) -> None:
        if data and not (self._ended or self._abandoned):
            await self.queue.put(data)

    async def end(self) -> None:
        if not (self._ended or self._abandoned):
            self._ended = True
            await self.queue.put(None)

    def abandon(self) -> None:
        self._abandoned = True
        while not self.queue.empty():  # wakes a put() waiting for room
            self.queue.get_nowait()


class _ChannelSink:
    """stdout or stderr toward the client."""

    def __init__(self, peer: _Peer, channel: int) -> None:
        self._peer = peer
        self._channel = channel
        self._closed = False

    async def write(self, data: bytes) -> None:
        if data and not self._closed:
            await self._peer.send(self._channel, data)

    async def close(self) -> None:
        self._closed = True


class _ResizeReader:
    """Terminal sizes from the resize channel into the session's queue (the newest kept
    when it is full); a value that is not a size is skipped."""

    def __init__(self, queue: asyncio.Queue[TerminalSize]) -> None:
        self.queue = queue
        self.parser = ResizeParser()
        self.closed = False  # v5: the client closed the resize channel

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            sizes = self.parser.feed(data)
        except ValueError as exc:
            log.debug("websocket: %s", exc)
            return
        for size in sizes:
            if size is None:
                log.debug("websocket: ignoring a resize that is not a size")
                continue
            if self.queue.full():  # keep the newest sizes
                self.queue.get_nowait()
            self.queue.put_nowait(size)


async def _call_backend(
    backend: StreamBackend, target: ExecTarget | AttachTarget, session: StreamSession
) -> Outcome:
    try:
        if isinstance(target, ExecTarget):
            return await backend.exec(target, session)
        return await backend.attach(target, session)
    except Exception as exc:
        log.exception("websocket: %s failed", type(target).__name__)
        return Outcome(error=str(exc) or type(exc).__name__)


async def _remote_command(
    peer: _Peer, protocol: str, target: ExecTarget | AttachTarget, backend: StreamBackend
) -> None:
    stdin = _Inbox() if target.stdin else None
    resize: _ResizeReader | None = None
    session = StreamSession(tty=target.tty)
    if stdin is not None:
        session.stdin = stdin.queue
    if target.stdout:
        session.stdout = _ChannelSink(peer, STDOUT)
    if target.stderr and not target.tty:  # a terminal has no separate stderr
        session.stderr = _ChannelSink(peer, STDERR)
    if target.tty:
        session.resize = asyncio.Queue(RESIZE_DEPTH)
        resize = _ResizeReader(session.resize)
    v5 = protocol == V5_PROTOCOL

    async def on_message(channel: int, data: bytes) -> None:
        if channel == STDIN:
            if stdin is not None:
                await stdin.put(data)
        elif channel == RESIZE:
            if resize is not None:
                resize.feed(data)
        elif channel == STREAM_CLOSE and v5:
            if len(data) != 1:
                raise WebSocketProtocolError("stream close signal must name one stream")
            if data[0] > RESIZE:
                raise WebSocketProtocolError(f"stream close signal for unknown stream {data[0]}")
            if data[0] == STDIN and stdin is not None:
                await stdin.end()
            elif data[0] == RESIZE and resize is not None:
                resize.closed = True
        # anything else: ignored, as the kubelet does

    async def read() -> None:
        await peer.read_loop(on_message)
        if stdin is not None:  # without v5, the connection's end is stdin's end
            await stdin.end()

    # the kubelet's "connection established": an empty message on the lowest output channel
    first = STDOUT if session.stdout else STDERR if session.stderr else ERROR
    await peer.send(first, b"")

    read_task = asyncio.create_task(read())
    work = asyncio.create_task(_call_backend(backend, target, session))
    gone = asyncio.create_task(peer.gone.wait())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            # The client left: nothing more can reach it. An exec runs on to its end with
            # stdin at EOF, as under the kubelet; an attach detaches.
            await _shutdown(peer.writer)
            if isinstance(target, AttachTarget):
                work.cancel()
            await asyncio.wait({work})
            return
        outcome = work.result()
        if stdin is not None:
            stdin.abandon()
        async with asyncio.timeout(CLOSE_TIMEOUT):
            message = error_channel_message(protocol, outcome)
            if message is not None:
                await peer.send(ERROR, message)
            await peer.close()
            await peer.gone.wait()
    finally:
        await cancel(read_task, work, gone)


async def _port_forward(peer: _Peer, target: PortForwardTarget, backend: StreamBackend) -> None:
    inboxes = [_Inbox() for _ in target.ports]
    for index, port in enumerate(target.ports):
        prefix = port.to_bytes(2, "little")
        await peer.send(2 * index, prefix)
        await peer.send(2 * index + 1, prefix)

    async def on_message(channel: int, data: bytes) -> None:
        index, kind = divmod(channel, 2)
        if kind == 0 and index < len(inboxes):
            await inboxes[index].put(data)
        # error channels are ours to write; other channels are ignored, as the kubelet does

    read_task = asyncio.create_task(peer.read_loop(on_message))
    forwards = [
        asyncio.create_task(_forward_port(peer, target, backend, index, port, inboxes[index]))
        for index, port in enumerate(target.ports)
    ]
    gone = asyncio.create_task(peer.gone.wait())
    try:
        pending: set[asyncio.Task[None]] = set(forwards)
        while pending and not gone.done():
            done, _ = await asyncio.wait({*pending, gone}, return_when=asyncio.FIRST_COMPLETED)
            pending -= done
        if not pending:  # every port finished: close normally
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await peer.close()
                await peer.gone.wait()
    finally:
        await cancel(read_task, gone, *forwards)


async def _forward_port(
    peer: _Peer,
    target: PortForwardTarget,
    backend: StreamBackend,
    index: int,
    port: int,
    inbox: _Inbox,
) -> None:
    """Pump one port until its connection in the pod closes."""
    data_channel, error_channel = 2 * index, 2 * index + 1
    try:
        try:
            pod_reader, pod_writer = await backend.open_port(target, port)
        except Exception as exc:
            await _port_error(peer, target, port, error_channel, exc)
            return
        upstream = asyncio.create_task(_to_pod(inbox, pod_writer))
        try:
            while chunk := await pod_reader.read(CHUNK):
                await peer.send(data_channel, chunk)
                if not peer.open:
                    break
        except OSError as exc:
            await _port_error(peer, target, port, error_channel, exc)
        finally:
            await cancel(upstream)
            pod_writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(pod_writer.wait_closed(), SHUTDOWN_TIMEOUT)
    finally:
        inbox.abandon()


async def _to_pod(inbox: _Inbox, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while (data := await inbox.queue.get()) is not None:
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


async def _port_error(
    peer: _Peer, target: PortForwardTarget, port: int, channel: int, exc: BaseException
) -> None:
    log.info("websocket: port forward to %s:%d failed: %s", target.sandbox_id, port, exc)
    message = f"error forwarding port {port} to pod {target.sandbox_id}: {exc}"
    await peer.send(channel, message.encode())
