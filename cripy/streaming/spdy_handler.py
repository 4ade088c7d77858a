"""The SPDY/3.1 side of the streaming server: the kubelet's remotecommand (exec, attach)
and portforward protocols over a `SpdyConnection`, run on an asyncio stream pair.

`SpdySession` and `SpdyStream` are the asyncio glue around the sans-IO connection; the
client (`spdy_client`) uses them too. `serve_spdy` is what the HTTP server calls for a
request that asked `Upgrade: SPDY/3.1`.

remotecommand versions: the client opens an "error" stream, then "stdin", "stdout",
"stderr" (never with a tty) as it was asked to, and from v3 on a "resize" stream with a
tty, carrying JSON objects {"Width": w, "Height": h}. When the command ends, v4 writes a
metav1.Status on the error stream; v1-v3 write only failures, as plain text.

portforward: each forwarded connection is a pair of streams, "error" and "data", with the
same "requestID" and "port" headers; any number of pairs may be open on one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cripy.streaming.remotecommand import ResizeParser, channels_of, error_channel_message
from cripy.streaming.session import (
    AttachTarget,
    ExecTarget,
    Outcome,
    PortForwardTarget,
    StreamBackend,
    StreamSession,
    TerminalSize,
)
from cripy.streaming.spdy import (
    DEFAULT_WINDOW,
    DataReceived,
    Event,
    GoAwayReceived,
    GoAwayStatus,
    Headers,
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
from cripy.tasks import cancel

log = logging.getLogger(__name__)

SPDY_REMOTECOMMAND_PROTOCOLS = ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
                                "channel.k8s.io"]
SPDY_PORTFORWARD_PROTOCOLS = ["portforward.k8s.io"]
PROTOCOL_HEADER = "x-stream-protocol-version"

#: How long the client has to open the streams of a session (or of a port-forward pair).
STREAM_CREATION_TIMEOUT = 30.0
#: After the last frame, how long the peer has to close the connection before we do.
LINGER_TIMEOUT = 10.0
#: Reading from the socket pauses while a stream holds this much unread data.
STREAM_BUFFER_LIMIT = 1 << 20
#: A writer waits while this much of its data waits for the peer's window.
WRITE_HIGH_WATER = 256 * 1024
READ_SIZE = 64 * 1024

# The event loop holds tasks only weakly, and a StreamReaderProtocol its reader too: a
# task that waits on a socket nobody else references (say, a port-forward whose local
# side was half-closed, so its transport left the selector) can be garbage-collected
# mid-flight. Reader loops and the tasks running a session are kept here.
_RUNNING: set[asyncio.Task[Any]] = set()


def _keep(task: asyncio.Task[Any]) -> None:
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """Keep the current task strongly referenced while the block runs."""
    task = asyncio.current_task()
    if task is None:
        yield
        return
    _RUNNING.add(task)
    try:
        yield
    finally:
        _RUNNING.discard(task)


class SpdyStream:
    """One stream of a `SpdySession`, as a byte pipe in each direction."""

    def __init__(self, session: SpdySession, stream_id: int, headers: Headers) -> None:
        self.session = session
        self.id = stream_id
        self.headers = headers
        self.reply_headers: Headers = []
        self.fin_received = False  # the peer ended its side cleanly
        self.reset_status: int | None = None
        self._buffer = bytearray()
        self._eof = False
        self._discard = False
        self._readable = asyncio.Event()
        self._done = asyncio.Event()  # reset, or the connection is gone
        self._replied: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)

    @property
    def terminated(self) -> bool:
        """Reset by either side, or the connection is gone."""
        return self._done.is_set()

    async def wait_terminated(self) -> None:
        await self._done.wait()

    async def wait_reply(self, timeout: float) -> None:
        """For a stream we opened: until the peer's SYN_REPLY (a reset raises)."""
        await asyncio.wait_for(asyncio.shield(self._replied), timeout)

    def accept(self, headers: Headers | None = None) -> None:
        """SYN_REPLY to a stream the peer opened."""
        with contextlib.suppress(SpdyStreamError):
            self.session.conn.reply(self.id, headers or [])
            self.session.flush()

    async def read(self, size: int = READ_SIZE) -> bytes:
        """Up to `size` bytes; b"" once the peer ended the stream (or it is gone)."""
        while not self._buffer and not self._eof:
            self._readable.clear()
            await self._readable.wait()
        if not self._buffer:
            return b""
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        self.session.consumed(self, len(chunk))
        return chunk

    async def read_all(self, limit: int = 1 << 20) -> bytes:
        data = bytearray()
        while chunk := await self.read():
            if len(data) < limit:
                data += chunk[:limit - len(data)]
        return bytes(data)

    async def write(self, data: bytes) -> None:
        """Send data; waits while the peer's window holds too much of ours back."""
        if not data:
            return
        try:
            self.session.conn.send_data(self.id, data)
        except SpdyStreamError as exc:
            raise ConnectionResetError(f"SPDY stream {self.id}: {exc}") from None
        self.session.flush()
        await self.session.wait_writable(self)

    async def close(self) -> None:
        """Half-close: FIN after whatever is queued."""
        if self.session.conn.can_send(self.id):
            self.session.conn.send_data(self.id, b"", fin=True)
            self.session.flush()
            self.session.prune(self)

    def reset(self, status: RstStatus = RstStatus.CANCEL) -> None:
        if not self.terminated:
            self.session.conn.reset_stream(self.id, status)
            self.session.flush()
            self._terminate(int(status))

    def discard(self) -> None:
        """Drop what the peer sends from now on (acknowledged at once)."""
        self._discard = True
        if self._buffer:
            self.session.consumed(self, len(self._buffer))
            self._buffer.clear()

    # called by the session

    def _feed(self, data: bytes) -> None:
        if self._discard:
            self.session.consumed(self, len(data))
            return
        self._buffer += data
        self._readable.set()

    def _end(self) -> None:
        self.fin_received = True
        self._eof = True
        self._readable.set()

    def _terminate(self, status: int | None) -> None:
        if self.reset_status is None:
            self.reset_status = status
        self._eof = True
        self._readable.set()
        self._done.set()
        if not self._replied.done():
            self._replied.set_exception(ConnectionResetError(
                f"SPDY stream {self.id} was reset" if status is not None
                else "the SPDY connection closed"))
            self._replied.exception()  # retrieved: nobody may be waiting

    @property
    def buffered(self) -> int:
        return len(self._buffer)


class SpdySession:
    """A `SpdyConnection` over an asyncio stream pair. `start()` runs the reader loop,
    which ends when the peer closes the connection or breaks the protocol (then it sends
    GOAWAY); `on_stream` is called for each stream the peer opens and must `accept` or
    `reset` it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 client: bool, on_stream: Callable[[SpdyStream], None] | None = None,
                 strict_flow_control: bool = False) -> None:
        self.reader = reader
        self.writer = writer
        self.on_stream = on_stream
        self.conn = SpdyConnection(client=client, strict_flow_control=strict_flow_control)
        self.streams: dict[int, SpdyStream] = {}
        self.error: SpdyProtocolError | None = None
        self.goaway_received = False
        self.closed = asyncio.Event()  # the reader loop ended
        self._can_read = asyncio.Event()
        self._can_read.set()
        self._window = asyncio.Event()  # replaced each time writers are woken
        # Announcing our window tells a peer like us that we do flow control.
        self.conn.send_settings({Setting.INITIAL_WINDOW_SIZE: DEFAULT_WINDOW})
        self.flush()

    def start(self) -> asyncio.Task[None]:
        """The reader loop as a task (cancel it to stop reading)."""
        task = asyncio.create_task(self.run())
        _keep(task)
        return task

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def run(self) -> None:
        try:
            while True:
                await self._can_read.wait()
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                for event in self.conn.receive_data(data):
                    self._dispatch(event)
                self.flush()
        except SpdyProtocolError as exc:
            log.info("SPDY protocol error from the peer: %s", exc)
            self.error = exc
            self.conn.goaway(exc.status)
            self.flush()
            self.writer.close()
        except (ConnectionError, OSError) as exc:
            log.debug("SPDY connection lost: %s", exc)
        finally:
            self._lost()

    def _lost(self) -> None:
        self.closed.set()
        for stream in list(self.streams.values()):
            stream._terminate(None)
        self.streams.clear()
        self._wake_writers()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.conn.acknowledge_data(event.stream_id, len(event.data))
                return
            stream._feed(event.data)
            if stream.buffered > STREAM_BUFFER_LIMIT:
                self._can_read.clear()
        elif isinstance(event, StreamEnded):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream._end()
                self.prune(stream)
        elif isinstance(event, StreamOpened):
            stream = SpdyStream(self, event.stream_id, event.headers)
            self.streams[event.stream_id] = stream
            if self.on_stream is None:
                stream.reset(RstStatus.REFUSED_STREAM)
                return
            self.on_stream(stream)
        elif isinstance(event, StreamReplied):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream.reply_headers = event.headers
                if not stream._replied.done():
                    stream._replied.set_result(None)
        elif isinstance(event, StreamReset):
            if (stream := self.streams.pop(event.stream_id, None)) is not None:
                stream._terminate(event.status)
            self._wake_writers()
        elif isinstance(event, (WindowUpdated, SettingsReceived)):
            self._wake_writers()
        elif isinstance(event, GoAwayReceived):
            self.goaway_received = True

    def prune(self, stream: SpdyStream) -> None:
        """Forget a stream that ended both ways (its object stays readable)."""
        if not self.conn.is_open(stream.id):
            self.streams.pop(stream.id, None)

    def discard_all(self) -> None:
        """Drop unread data on every stream, so that the reader loop runs to the end."""
        for stream in list(self.streams.values()):
            stream.discard()
        self._can_read.set()

    def _wake_writers(self) -> None:
        self._window.set()
        self._window = asyncio.Event()

    def consumed(self, stream: SpdyStream, size: int) -> None:
        """The application took `size` bytes of `stream`: flow-control credit, and the
        reader loop may go on."""
        self.conn.acknowledge_data(stream.id, size)
        self.flush()
        if not self._can_read.is_set() and all(
                s.buffered <= STREAM_BUFFER_LIMIT for s in self.streams.values()):
            self._can_read.set()

    async def wait_writable(self, stream: SpdyStream) -> None:
        while (self.conn.pending_data(stream.id) > WRITE_HIGH_WATER
               and not stream.terminated and not self.closed.is_set()):
            await self._window.wait()
        if stream.terminated:
            raise ConnectionResetError(f"SPDY stream {stream.id} was reset")
        self.prune(stream)
        await self.writer.drain()

    def open_stream(self, headers: Headers, *, fin: bool = False) -> SpdyStream:
        if self.closed.is_set():
            raise ConnectionResetError("the SPDY connection is closed")
        try:
            stream_id = self.conn.open_stream(headers, fin=fin)
        except SpdyStreamError as exc:
            raise ConnectionResetError(str(exc)) from None
        stream = SpdyStream(self, stream_id, headers)
        self.streams[stream_id] = stream
        self.flush()
        return stream

    async def create_stream(self, headers: Headers, timeout: float = STREAM_CREATION_TIMEOUT
                            ) -> SpdyStream:
        """Open a stream and wait for the peer's SYN_REPLY, as the kubelet's clients do."""
        stream = self.open_stream(headers)
        try:
            await stream.wait_reply(timeout)
        except TimeoutError:
            stream.reset()
            raise TimeoutError(f"no reply to SPDY stream {stream.id} within {timeout:g}s"
                               ) from None
        return stream

    async def drain_all(self, timeout: float) -> None:
        """Until everything queued is on the wire (windows permitting), or the timeout."""
        async def wait() -> None:
            while self.conn.total_pending() and not self.closed.is_set():
                await self._window.wait()
            await self.writer.drain()

        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            await asyncio.wait_for(wait(), timeout)

    async def close(self, status: GoAwayStatus = GoAwayStatus.OK, linger: float = 0.0
                    ) -> None:
        """GOAWAY; with `linger`, give the peer that long to close first; then close."""
        self.conn.goaway(status)
        self.flush()
        if linger > 0:
            with contextlib.suppress(TimeoutError, ConnectionError, OSError):
                await self.writer.drain()
                await asyncio.wait_for(self.closed.wait(), linger)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


# --- the HTTP upgrade -----------------------------------------------------------------


def requested_protocols(headers: list[tuple[str, str]]) -> list[str]:
    """X-Stream-Protocol-Version values in order (the header may repeat or hold a list)."""
    found: list[str] = []
    for name, value in headers:
        if name.lower() == PROTOCOL_HEADER:
            found.extend(p.strip() for p in value.split(",") if p.strip())
    return found


def negotiate(offered: list[str], supported: list[str]) -> str | None:
    """The client's most preferred protocol that the server supports."""
    return next((p for p in offered if p in supported), None)


async def _refuse(writer: asyncio.StreamWriter, status: int, reason: str, message: str,
                  accepted: list[str]) -> None:
    body = (message + "\n").encode()
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/plain; charset=utf-8",
             "X-Content-Type-Options: nosniff",
             *(f"X-Accepted-Stream-Protocol-Versions: {p}" for p in accepted),
             f"Content-Length: {len(body)}", "Connection: close"]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()


async def serve_spdy(headers: list[tuple[str, str]], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter,
                     target: ExecTarget | AttachTarget | PortForwardTarget,
                     backend: StreamBackend) -> None:
    """Answer an `Upgrade: SPDY/3.1` request whose head was read from `reader`: the 101
    (or 400/403) response, then the session. Closes the connection before returning."""
    with pinned():
        await _serve(headers, reader, writer, target, backend)


async def _serve(headers: list[tuple[str, str]], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter,
                 target: ExecTarget | AttachTarget | PortForwardTarget,
                 backend: StreamBackend) -> None:
    supported = (SPDY_PORTFORWARD_PROTOCOLS if isinstance(target, PortForwardTarget)
                 else SPDY_REMOTECOMMAND_PROTOCOLS)
    try:
        offered = requested_protocols(headers)
        protocol = negotiate(offered, supported)
        if not offered:
            await _refuse(writer, 400, "Bad Request",
                          "unable to upgrade: X-Stream-Protocol-Version is required", supported)
            return
        if protocol is None:
            await _refuse(writer, 403, "Forbidden",
                          f"unable to upgrade: unable to negotiate protocol: client supports "
                          f"{offered}, server accepts {supported}", supported)
            return
        writer.write(("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                      f"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\n\r\n"
                      ).encode())
        if isinstance(target, PortForwardTarget):
            await _PortForward(reader, writer, target, backend).serve()
        else:
            await _RemoteCommand(reader, writer, protocol, target, backend).serve()
    except (ConnectionError, OSError) as exc:
        log.debug("streaming connection lost: %s", exc)
    except Exception:
        log.exception("SPDY streaming session failed")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)


# --- remotecommand --------------------------------------------------------------------


class _Sink:
    """stdout or stderr of a StreamSession: DATA frames on the stream, FIN on close."""

    def __init__(self, stream: SpdyStream) -> None:
        self.stream = stream

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    async def close(self) -> None:
        await self.stream.close()


@dataclass
class _Streams:
    error: SpdyStream | None = None
    stdin: SpdyStream | None = None
    stdout: SpdyStream | None = None
    stderr: SpdyStream | None = None
    resize: SpdyStream | None = None


class _RemoteCommand:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: str, target: ExecTarget | AttachTarget, backend: StreamBackend
                 ) -> None:
        self.protocol = protocol
        self.target = target
        self.backend = backend
        self.streams = _Streams()
        has_resize = protocol in ("v4.channel.k8s.io", "v3.channel.k8s.io")
        self.expected = {c.stream_type for c in channels_of(target, resize=has_resize)}
        self.arrived: set[str] = set()
        self.all_arrived = asyncio.Event()
        self.session = SpdySession(reader, writer, client=False, on_stream=self._on_stream)

    def _on_stream(self, stream: SpdyStream) -> None:
        kind = stream.header("streamtype")
        if not kind:
            log.info("SPDY stream %d without a streamType header", stream.id)
            stream.reset(RstStatus.PROTOCOL_ERROR)
            return
        stream.accept()
        if kind in self.expected and kind not in self.arrived:
            setattr(self.streams, kind, stream)
            self.arrived.add(kind)
            if self.arrived == self.expected:
                self.all_arrived.set()
        else:
            log.info("unexpected SPDY stream of type %r", kind)
            stream.discard()
        if kind == "error":
            stream.discard()  # the client sends nothing on it

    async def serve(self) -> None:
        session = self.session
        run = session.start()
        pumps: list[asyncio.Task[None]] = []
        backend: asyncio.Task[Outcome] | None = None
        try:
            closed = asyncio.create_task(session.closed.wait())
            arrived = asyncio.create_task(self.all_arrived.wait())
            done, _ = await asyncio.wait({closed, arrived}, timeout=STREAM_CREATION_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
            await cancel(closed, arrived)
            if not self.all_arrived.is_set():
                if not session.closed.is_set():
                    log.info("timed out waiting for the client to create streams "
                             "(have %s, want %s)", sorted(self.arrived), sorted(self.expected))
                    await session.close(GoAwayStatus.OK)
                return
            stream_session, pumps = self._stream_session()
            backend = asyncio.create_task(self._run_backend(stream_session))
            closed = asyncio.create_task(session.closed.wait())
            await asyncio.wait({backend, closed}, return_when=asyncio.FIRST_COMPLETED)
            await cancel(closed)
            if not backend.done():
                log.info("streaming client went away; stopping the %s",
                         "exec" if isinstance(self.target, ExecTarget) else "attach")
                return
            await cancel(*pumps)
            session.discard_all()
            await self._report(backend.result())
            await session.drain_all(LINGER_TIMEOUT)
            await session.close(GoAwayStatus.OK, linger=LINGER_TIMEOUT)
        finally:
            await cancel(backend, *pumps)
            await cancel(run)
            if not session.writer.is_closing():
                session.writer.close()

    def _stream_session(self) -> tuple[StreamSession, list[asyncio.Task[None]]]:
        s = self.streams
        pumps: list[asyncio.Task[None]] = []
        session = StreamSession(tty=self.target.tty)
        if s.stdin is not None:
            session.stdin = asyncio.Queue(maxsize=16)
            pumps.append(asyncio.create_task(self._pump_stdin(s.stdin, session.stdin)))
        if s.stdout is not None:
            session.stdout = _Sink(s.stdout)
        if s.stderr is not None:
            session.stderr = _Sink(s.stderr)
        if s.resize is not None:
            session.resize = asyncio.Queue()
            pumps.append(asyncio.create_task(self._pump_resize(s.resize, session.resize)))
        return session, pumps

    @staticmethod
    async def _pump_stdin(stream: SpdyStream, queue: asyncio.Queue[bytes | None]) -> None:
        while chunk := await stream.read():
            await queue.put(chunk)
        await queue.put(None)

    @staticmethod
    async def _pump_resize(stream: SpdyStream, queue: asyncio.Queue[TerminalSize]) -> None:
        """As the kubelet: the first value that is not a size ends resizing."""
        parser = ResizeParser()
        while chunk := await stream.read():
            try:
                for size in parser.feed(chunk):
                    if size is None:
                        raise ValueError("resize stream: a value that is not a size")
                    queue.put_nowait(size)
            except ValueError as exc:
                log.info("%s; ignoring further resize events", exc)
                stream.discard()
                return

    async def _run_backend(self, session: StreamSession) -> Outcome:
        try:
            if isinstance(self.target, ExecTarget):
                return await self.backend.exec(self.target, session)
            return await self.backend.attach(self.target, session)
        except (ConnectionError, OSError) as exc:
            return Outcome(error=f"streaming connection failed: {exc}")
        except Exception as exc:
            log.exception("streaming backend failed")
            what = "executing command in" if isinstance(self.target, ExecTarget) \
                else "attaching to"
            return Outcome(error=f"error {what} container: {exc or type(exc).__name__}")

    async def _report(self, outcome: Outcome) -> None:
        s = self.streams
        # Our side of every stream ends (client-go waits for that on stdin).
        for stream in (s.stdout, s.stderr, s.stdin, s.resize):
            if stream is not None:
                await stream.close()
        if s.error is None:
            return
        message = error_channel_message(self.protocol, outcome)
        with contextlib.suppress(ConnectionError):
            if message:
                await s.error.write(message)
            await s.error.close()


# --- portforward ----------------------------------------------------------------------


@dataclass
class _Pair:
    request_id: str
    data: SpdyStream | None = None
    error: SpdyStream | None = None
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None


class _PortForward:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 target: PortForwardTarget, backend: StreamBackend) -> None:
        self.target = target
        self.backend = backend
        self.pairs: dict[str, _Pair] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.session = SpdySession(reader, writer, client=False, on_stream=self._on_stream)

    @staticmethod
    def _request_id(stream: SpdyStream, kind: str) -> str:
        request_id = stream.header("requestid")
        if request_id:
            return request_id
        # Clients from before requestID paired the streams by id: error n, data n + 2.
        return str(stream.id if kind == "error" else stream.id - 2)

    def _on_stream(self, stream: SpdyStream) -> None:
        kind = stream.header("streamtype")
        port_text = stream.header("port") or ""
        problem = None
        if kind not in ("data", "error"):
            problem = f"invalid stream type {kind!r}"
        elif not port_text.isdigit() or not 0 < int(port_text) <= 0xFFFF:
            problem = f"invalid port {port_text!r}"
        if problem is not None:
            log.info("port-forward stream %d rejected: %s", stream.id, problem)
            stream.reset(RstStatus.PROTOCOL_ERROR)
            return
        assert kind is not None
        request_id = self._request_id(stream, kind)
        pair = self.pairs.get(request_id)
        if pair is None:
            pair = self.pairs[request_id] = _Pair(request_id)
            pair.timer = asyncio.get_running_loop().call_later(
                STREAM_CREATION_TIMEOUT, self._expire, pair)
        if getattr(pair, kind) is not None:
            log.info("port-forward request %s: a second %s stream", request_id, kind)
            stream.reset(RstStatus.PROTOCOL_ERROR)
            return
        stream.accept()
        setattr(pair, kind, stream)
        if kind == "error":
            stream.discard()
        if pair.data is not None and pair.error is not None:
            if pair.timer is not None:
                pair.timer.cancel()
            pair.task = asyncio.create_task(self._forward(pair))
            _keep(pair.task)
            self.tasks.add(pair.task)
            pair.task.add_done_callback(self.tasks.discard)

    def _expire(self, pair: _Pair) -> None:
        if pair.task is not None or self.pairs.get(pair.request_id) is not pair:
            return
        del self.pairs[pair.request_id]
        if pair.data is not None:
            pair.data.reset()
        if pair.error is not None:
            task = asyncio.create_task(self._fail(
                pair.error, f"timed out waiting for the streams of request {pair.request_id}"))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _fail(stream: SpdyStream, message: str) -> None:
        with contextlib.suppress(ConnectionError):
            await stream.write(message.encode())
            await stream.close()

    async def serve(self) -> None:
        run = self.session.start()
        try:
            await self.session.closed.wait()
        finally:
            for pair in self.pairs.values():
                if pair.timer is not None:
                    pair.timer.cancel()
            await cancel(*self.tasks)
            await cancel(run)
            self.session.writer.close()

    async def _forward(self, pair: _Pair) -> None:
        assert pair.data is not None and pair.error is not None
        data, error = pair.data, pair.error
        port = int(data.header("port") or 0)
        writer: asyncio.StreamWriter | None = None
        try:
            if self.target.ports and port not in self.target.ports:
                raise PermissionError(f"port {port} is not among the forwarded ports")
            try:
                reader, writer = await self.backend.open_port(self.target, port)
            except Exception as exc:
                raise ConnectionError(f"error forwarding port {port} to pod "
                                      f"{self.target.sandbox_id}: {exc}") from exc
            await self._pump(data, reader, writer)
            await error.close()
        except Exception as exc:
            if isinstance(exc, (ConnectionError, OSError)):
                log.info("port-forward request %s: %s", pair.request_id, exc)
            else:
                log.exception("port-forward request %s failed", pair.request_id)
            data.reset()
            await self._fail(error, str(exc) or type(exc).__name__)
        finally:
            data.discard()  # whatever the client still sends has nowhere to go
            if self.pairs.get(pair.request_id) is pair:
                del self.pairs[pair.request_id]
            if writer is not None:
                writer.close()

    @staticmethod
    async def _pump(stream: SpdyStream, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        """Bytes both ways until the pod's side ends (or the client resets the stream);
        the client's FIN half-closes the pod's connection."""
        async def to_pod() -> None:
            while chunk := await stream.read():
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        async def to_client() -> None:
            while chunk := await reader.read(READ_SIZE):
                await stream.write(chunk)
            await stream.close()

        up = asyncio.create_task(to_pod())
        down = asyncio.create_task(to_client())
        gone = asyncio.create_task(stream.wait_terminated())
        try:
            await asyncio.wait({down, gone}, return_when=asyncio.FIRST_COMPLETED)
            if down.done():
                down.result()  # raises what broke it
        finally:
            await cancel(up, down, gone)
