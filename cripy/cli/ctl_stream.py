"""`cripy ctl` streaming verbs: interactive `exec -i/-t`, `attach` and `port-forward`.

They ask the runtime for a streaming URL (Exec, Attach, PortForward) and speak SPDY/3.1
to it, like crictl. With a tty the local terminal is put in raw mode (and restored on the
way out), and window size changes (SIGWINCH) are sent as resize events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import stat
import sys
import termios
import threading
import tty
from collections.abc import AsyncIterator, Iterator

from cripy.api import api_pb2 as pb
from cripy.cli.ctl import AddVerb, Client, CtlError
from cripy.cli.ctl_runtime import exit_status, resolve_container, resolve_pod
from cripy.streaming.session import Outcome, TerminalSize
from cripy.streaming.spdy_client import (
    PortForwardError,
    UpgradeError,
    spdy_exec,
    spdy_port_forward,
)

#: What `cripy ctl` offers, most wanted first.
PROTOCOLS = "v4.channel.k8s.io,v3.channel.k8s.io,v2.channel.k8s.io,channel.k8s.io"


# --- the local terminal ---------------------------------------------------------------


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """Raw mode on stdin's terminal for the duration (no-op without one)."""
    fd = sys.stdin.fileno() if enabled else -1
    saved = termios.tcgetattr(fd) if enabled and os.isatty(fd) else None
    if saved is not None:
        tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size() -> TerminalSize | None:
    for stream in (sys.stdout, sys.stdin):
        with contextlib.suppress(OSError, ValueError):
            size = os.get_terminal_size(stream.fileno())
            return TerminalSize(size.columns, size.lines)
    return None


@contextlib.contextmanager
def watch_size(queue: asyncio.Queue[TerminalSize] | None) -> Iterator[None]:
    """The current size now, and again on every SIGWINCH."""
    if queue is None:
        yield
        return
    loop = asyncio.get_running_loop()

    def push() -> None:
        size = terminal_size()
        if size is not None:
            queue.put_nowait(size)

    push()
    loop.add_signal_handler(signal.SIGWINCH, push)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)


@contextlib.asynccontextmanager
async def local_stdin() -> AsyncIterator[asyncio.StreamReader]:
    """Standard input as a StreamReader: through the event loop for pipes, sockets and
    terminals (leaving the descriptor's blocking mode as it was), a thread for anything
    else (files, /dev/null: epoll cannot watch them)."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    reader = asyncio.StreamReader()
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd):
        blocking = os.get_blocking(fd)
        pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            yield reader
        finally:
            transport.close()
            os.set_blocking(fd, blocking)
        return

    def pump() -> None:
        try:
            while data := os.read(fd, 32 * 1024):
                loop.call_soon_threadsafe(reader.feed_data, data)
            loop.call_soon_threadsafe(reader.feed_eof)
        except (OSError, RuntimeError):  # RuntimeError: the loop is gone
            pass

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    yield reader


async def _write_to(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await asyncio.sleep(0.01)
            continue
        view = view[written:]


async def _stdout(data: bytes) -> None:
    await _write_to(sys.stdout.fileno(), data)


async def _stderr(data: bytes) -> None:
    await _write_to(sys.stderr.fileno(), data)


# --- exec and attach ------------------------------------------------------------------


def stream_session(url: str, *, interactive: bool, tty_: bool) -> Outcome:
    """Run an exec or attach session against the local terminal."""
    async def main() -> Outcome:
        sizes: asyncio.Queue[TerminalSize] | None = asyncio.Queue() if tty_ else None
        with watch_size(sizes if sys.stdout.isatty() else None):
            if not interactive:
                return await spdy_exec(url, stdin=None, stdout=_stdout,
                                       stderr=None if tty_ else _stderr, tty=tty_,
                                       resize=sizes, protocol=PROTOCOLS)
            async with local_stdin() as stdin:
                return await spdy_exec(url, stdin=stdin, stdout=_stdout,
                                       stderr=None if tty_ else _stderr, tty=tty_,
                                       resize=sizes, protocol=PROTOCOLS)

    sys.stdout.flush()
    try:
        with raw_terminal(tty_ and interactive):
            return asyncio.run(main())
    except UpgradeError as exc:
        raise CtlError("UNAVAILABLE", f"streaming request failed: {exc}") from None
    except (ConnectionError, OSError, TimeoutError) as exc:
        raise CtlError("UNAVAILABLE", f"streaming connection failed: "
                                      f"{exc or type(exc).__name__}") from None


def _finish(outcome: Outcome) -> int:
    if outcome.error:
        raise CtlError("UNKNOWN", outcome.error)
    return exit_status(outcome.exit_code)


def exec_interactive(client: Client, args: argparse.Namespace) -> int:
    """`exec -i`, `exec -t`, `exec -it`: through Exec and its streaming URL."""
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise CtlError("INVALID_ARGUMENT", "give a command to run")
    container_id = resolve_container(client, args, args.container)
    response = client.runtime.Exec(
        pb.ExecRequest(container_id=container_id, cmd=command, tty=args.tty,
                       stdin=args.interactive, stdout=True, stderr=not args.tty),
        timeout=args.timeout)
    try:
        outcome = stream_session(response.url, interactive=args.interactive, tty_=args.tty)
    except KeyboardInterrupt:
        return 130
    return _finish(outcome)


def cmd_attach(client: Client, args: argparse.Namespace) -> int:
    container_id = resolve_container(client, args, args.container)
    response = client.runtime.Attach(
        pb.AttachRequest(container_id=container_id, stdin=args.stdin, tty=args.tty,
                         stdout=True, stderr=not args.tty),
        timeout=args.timeout)
    try:
        outcome = stream_session(response.url, interactive=args.stdin, tty_=args.tty)
    except KeyboardInterrupt:
        return 130
    return _finish(outcome)


# --- port-forward ---------------------------------------------------------------------


def parse_port_mapping(text: str) -> tuple[int, int]:
    """`LOCAL:REMOTE`, or `PORT` for both; LOCAL may be 0 or empty: any free port."""
    local, sep, remote = text.rpartition(":")
    if not sep:
        local = remote
    try:
        local_port = int(local) if local else 0
        remote_port = int(remote)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOCAL:REMOTE") from None
    if not 0 <= local_port <= 0xFFFF or not 0 < remote_port <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return local_port, remote_port


def cmd_port_forward(client: Client, args: argparse.Namespace) -> int:
    pod_id = resolve_pod(client, args, args.pod)
    remotes = [remote for _, remote in args.ports]

    def new_url() -> str:
        # A fresh URL per connection: a runtime may let each one be used only once.
        response = client.runtime.PortForward(
            pb.PortForwardRequest(pod_sandbox_id=pod_id, port=remotes), timeout=args.timeout)
        return str(response.url)

    new_url()  # fail here, not on the first connection, if the runtime refuses

    async def forward(remote: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            url = await asyncio.to_thread(new_url)
            await spdy_port_forward(url, remote, reader, writer)
        except (PortForwardError, ConnectionError, OSError, TimeoutError) as exc:
            print(f"cripy ctl port-forward: {exc or type(exc).__name__}", file=sys.stderr)
        except Exception as exc:  # e.g. a gRPC error from new_url
            print(f"cripy ctl port-forward: {exc}", file=sys.stderr)
        finally:
            writer.close()

    async def main() -> None:
        servers = []
        for local, remote in args.ports:
            async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               remote: int = remote) -> None:
                await forward(remote, reader, writer)

            try:
                server = await asyncio.start_server(accepted, args.address, local)
            except OSError as exc:
                raise CtlError("UNAVAILABLE", f"cannot listen on {args.address}:{local}: "
                                              f"{exc.strerror}") from None
            servers.append(server)
            bound = server.sockets[0].getsockname()[1]
            print(f"Forwarding from {args.address}:{bound} -> {remote}", flush=True)
        await asyncio.Event().wait()  # until Ctrl-C

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


# --- wiring ---------------------------------------------------------------------------


def add_verbs(verb: AddVerb) -> None:
    attach = verb("attach", cmd_attach, "attach to a running container", ())
    attach.add_argument("-i", "--stdin", action="store_true", help="pass stdin to the container")
    attach.add_argument("-t", "--tty", action="store_true",
                        help="stdin is a tty (must match the container's setting)")
    attach.add_argument("container", metavar="CONTAINER")

    forward = verb("port-forward", cmd_port_forward, "forward local ports to a pod", ())
    forward.add_argument("pod", metavar="POD")
    forward.add_argument("ports", nargs="+", type=parse_port_mapping,
                         metavar="[LOCAL:]REMOTE", help="LOCAL 0 or empty: any free port")
    forward.add_argument("--address", default="127.0.0.1",
                         help="local address to listen on (default 127.0.0.1)")
