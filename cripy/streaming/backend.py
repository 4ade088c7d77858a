"""Exec, Attach and PortForward against real containers: the StreamBackend of the daemon.

Exec runs `runc exec` in the foreground with a process spec made from the container's
own (user, env, capabilities, cwd), so runc's exit status is the command's.

- With a tty, runc insists on handling the container's terminal itself when it does not
  detach (it refuses `--console-socket` then): it receives the container pty's master
  over its own console socket (SCM_RIGHTS) and proxies it to a terminal of its own. That
  terminal is a pty of ours in raw mode: the client's bytes go into our master, runc
  copies the container's output to a pipe we read, and a resize sets our master's size
  and sends runc SIGWINCH, which makes runc copy the size onto the container's pty.
  End of stdin is Ctrl-D (that is what ends a shell). Output lines end in CR NL.
- Without a tty, stdin/stdout/stderr are pipes (only the requested ones).

runc logs to a file of its own, so its messages never mix with the command's output.
When the caller goes away (cancellation), the exec'd process group is killed by the pid
runc wrote to `--pid-file`.

Attach talks to the container's conmon on `<bundle>/attach` (SOCK_SEQPACKET): each
message from conmon is one stream byte (2 stdout, 3 stderr: conmon's stdpipe_t) and the
data; what we send is stdin. Resizes go to conmon's control fifo `<bundle>/ctl` as
"1 HEIGHT WIDTH\\n". The attach ends with the container (its exit code) or the caller.

PortForward connects to localhost:PORT inside the pod's network namespace: a short-lived
thread enters the pinned netns (setns), creates and connects the socket, and ends; the
socket stays in that namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import stat
import struct
import tempfile
import termios
import threading
import tty
from pathlib import Path
from typing import Any

from cripy.errors import (
    CripyError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from cripy.fsutil import remove_tree
from cripy.oci.runtime import (
    OciRuntime,
    exec_process,
    kill_pid_from,
    load_config,
    runc_log_errors,
    runc_message,
)
from cripy.runtime.container import ContainerManager
from cripy.runtime.sandbox import READY, SandboxManager
from cripy.streaming.session import (
    AttachTarget,
    ExecTarget,
    Outcome,
    PortForwardTarget,
    StreamSession,
    StreamSink,
    TerminalSize,
)

log = logging.getLogger(__name__)

CHUNK = 32 * 1024
ATTACH_RECV = 64 * 1024  # conmon sends at most its 8 KiB stdio buffer plus the stream byte
ATTACH_SEND = 8 * 1024  # conmon reads stdin messages into a 32 KiB buffer; stay well below
ATTACH_STDOUT, ATTACH_STDERR = 2, 3  # conmon's STDOUT_PIPE, STDERR_PIPE
CTL_RESIZE = 1  # conmon's WIN_RESIZE_EVENT
CTL_MAX_SIZE = 1000  # conmon ignores larger sizes
CTRL_D = b"\x04"
RUNC_STDERR_LIMIT = 64 * 1024
SOCKET_PATH_MAX = 107

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


class RuntimeStreamBackend:
    """The StreamBackend of the daemon: containers run by `oci`, pods by `sandboxes`."""

    #: After the exec'd command exits, output still arriving within this pause is sent.
    output_grace = 1.0
    #: How long runc may take to exit after its process was killed.
    kill_wait = 10.0
    #: How long a port-forward connection in the pod may take to be accepted.
    connect_timeout = 10.0

    def __init__(
        self, containers: ContainerManager, sandboxes: SandboxManager, oci: OciRuntime
    ) -> None:
        self.containers = containers
        self.sandboxes = sandboxes
        self.oci = oci

    # -- exec ----------------------------------------------------------------------------

    async def exec(self, target: ExecTarget, session: StreamSession) -> Outcome:
        if not target.cmd:
            return Outcome(error="exec needs a command")
        try:
            container = self.containers.get_running(target.container_id)
            bundle = self.containers.run_dir / container.id
            process = exec_process(load_config(bundle), target.cmd, None, None, target.tty)
        except CripyError as exc:
            return Outcome(error=str(exc))
        exec_dir = self.oci.state_dir / "exec"
        exec_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="s", dir=exec_dir))
        try:
            spec = workdir / "process.json"
            spec.write_text(json.dumps(process))
            return await self._exec(container.id, workdir, spec, target, session)
        finally:
            remove_tree(workdir)

    async def _exec(
        self, cid: str, workdir: Path, spec: Path, target: ExecTarget, session: StreamSession
    ) -> Outcome:
        pidfile = workdir / "pid"
        runc_log = workdir / "runc.log"
        argv = self.oci.runc_argv(
            "--log", str(runc_log), "exec", *(["--tty"] if target.tty else []),
            "--process", str(spec), "--pid-file", str(pidfile), cid, container_id=cid,
        )  # fmt: skip
        fds = _FdSet()
        null = asyncio.subprocess.DEVNULL
        child_in = child_out = child_err = null  # runc's stdio
        stdin_fd = -1  # where the client's bytes go
        master = -1
        stdin = session.stdin if target.stdin else None
        stdout = session.stdout if target.stdout else None
        stderr = None if target.tty else session.stderr if target.stderr else None
        runc_errors = _BufferSink(RUNC_STDERR_LIMIT)
        readers: list[tuple[int, StreamSink | None]] = []
        try:
            if target.tty:
                # runc's own terminal: raw, so bytes pass both ways untouched.
                master, slave = os.openpty()
                fds.add(master, slave)
                tty.setraw(slave)
                child_in = slave
                stdin_fd = master
                out_r, child_out = fds.pipe()
                err_r, child_err = fds.pipe()
                readers = [(out_r, None if stdout is None else _CrLf(stdout)), (err_r, runc_errors)]
            else:
                if stdin is not None:
                    child_in, stdin_fd = fds.pipe()
                if stdout is not None:
                    out_r, child_out = fds.pipe()
                    readers.append((out_r, stdout))
                if stderr is not None:
                    err_r, child_err = fds.pipe()
                    readers.append((err_r, stderr))
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=child_in, stdout=child_out, stderr=child_err,
                    start_new_session=True,
                )
            except OSError as exc:
                return Outcome(error=f"cannot run {argv[0]}: {exc}")
            for fd in (child_in, child_out, child_err):
                fds.close(fd)  # ours no longer: runc holds them
            outcome = await self._exec_io(
                cid, proc, pidfile, runc_log, target.tty, stdin, stdin_fd, master,
                session.resize, readers, runc_errors,
            )  # fmt: skip
        finally:
            fds.close_all()
        if not outcome.error:
            for sink in (stdout, stderr):
                if sink is not None:
                    with contextlib.suppress(Exception):
                        await sink.close()
        return outcome

    async def _exec_io(
        self,
        cid: str,
        proc: asyncio.subprocess.Process,
        pidfile: Path,
        runc_log: Path,
        tty_mode: bool,
        stdin: asyncio.Queue[bytes | None] | None,
        stdin_fd: int,
        master: int,
        resize: asyncio.Queue[TerminalSize] | None,
        readers: list[tuple[int, StreamSink | None]],
        runc_errors: _BufferSink,
    ) -> Outcome:
        exited = asyncio.Event()
        pumps = [
            asyncio.create_task(_pump_output(fd, sink, exited, self.output_grace))
            for fd, sink in readers
        ]
        helpers: list[asyncio.Task[None]] = []
        if stdin is not None and stdin_fd >= 0:
            helpers.append(asyncio.create_task(_feed_fd(stdin, stdin_fd, tty_mode)))
        if tty_mode and resize is not None:
            helpers.append(asyncio.create_task(_resize_tty(resize, master, proc.pid)))
        try:
            rc = await proc.wait()
            exited.set()
            await asyncio.gather(*pumps)
        except BaseException:
            if proc.returncode is None:
                await self._kill_exec(proc, pidfile)
            raise
        finally:
            await _cancel(*pumps, *helpers)
        if rc != 0 and not pidfile.exists():
            # runc never started the command: its error is the outcome.
            message = (runc_log_errors(runc_log)
                       or runc_message(bytes(runc_errors.data)) or f"runc exit status {rc}")
            return Outcome(error=f"exec in container {cid}: {message}")
        return Outcome(exit_code=rc if rc >= 0 else 128 - rc)

    async def _kill_exec(self, proc: asyncio.subprocess.Process, pidfile: Path) -> None:
        """SIGKILL the exec'd process (its group), then runc if it lingers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        # runc writes the pid file once the process runs; we may be just before that.
        while not pidfile.exists() and proc.returncode is None and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if proc.returncode is None:
            kill_pid_from(pidfile, group=True)
        try:
            await asyncio.wait_for(proc.wait(), self.kill_wait)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    # -- attach --------------------------------------------------------------------------

    async def attach(self, target: AttachTarget, session: StreamSession) -> Outcome:
        try:
            container = self.containers.get_running(target.container_id)
        except CripyError as exc:
            return Outcome(error=str(exc))
        cid = container.id
        bundle = self.containers.run_dir / cid
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        helpers: list[asyncio.Task[None]] = []
        sinks = {
            ATTACH_STDOUT: session.stdout if target.stdout else None,
            ATTACH_STDERR: session.stderr if target.stderr else None,
        }
        try:
            try:
                await _connect_unix(loop, sock, bundle, "attach")
            except OSError as exc:
                return Outcome(error=f"cannot attach to container {cid}: "
                                     f"{exc.strerror or exc}")
            if target.stdin and session.stdin is not None:
                # As CRI-O: the end of stdin closes the container's stdin only for
                # stdin_once without a tty (conmon closes it when we shut down writing).
                close_on_eof = container.config.stdin_once and not target.tty
                helpers.append(asyncio.create_task(
                    _feed_socket(loop, session.stdin, sock, close_on_eof)))
            if target.tty and session.resize is not None:
                helpers.append(asyncio.create_task(_resize_conmon(session.resize, bundle)))
            while True:
                try:
                    message = await loop.sock_recv(sock, ATTACH_RECV)
                except ConnectionResetError:
                    message = b""
                if not message:
                    break
                sink = sinks.get(message[0])
                if sink is not None and len(message) > 1:
                    await sink.write(message[1:])
        finally:
            await _cancel(*helpers)
            sock.close()
        # conmon closed the socket: it is done, and so is the container.
        try:
            status = await self.oci.wait_exit(cid, self.oci.conmon_grace)
        except CripyError as exc:
            return Outcome(error=str(exc))
        if status is None:
            return Outcome(error=f"conmon of container {cid} closed the attach socket")
        for sink in sinks.values():
            if sink is not None:
                with contextlib.suppress(Exception):
                    await sink.close()
        return Outcome(exit_code=status.exit_code)

    # -- port forward --------------------------------------------------------------------

    async def open_port(
        self, target: PortForwardTarget, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if not 0 < port < 65536:
            raise InvalidArgumentError(f"port {port} is out of range")
        if target.ports and port not in target.ports:
            raise InvalidArgumentError(f"port {port} was not requested for pod "
                                       f"{target.sandbox_id}")
        sandbox = self.sandboxes.get(target.sandbox_id)
        if sandbox.state != READY:
            raise FailedPreconditionError(f"pod sandbox {sandbox.id} is not ready")
        netns = sandbox.namespaces.get("net")  # None: host network, so the host's localhost
        try:
            sock = await _connect_in_netns(netns, port, self.connect_timeout)
        except ConnectionRefusedError:
            raise UnavailableError(
                f"pod {sandbox.id}: connection to localhost:{port} refused "
                "(nothing listens on that port)") from None
        except TimeoutError:
            raise UnavailableError(
                f"pod {sandbox.id}: connection to localhost:{port} timed out") from None
        except OSError as exc:
            raise UnavailableError(
                f"pod {sandbox.id}: cannot connect to localhost:{port}: "
                f"{exc.strerror or exc}") from None
        try:
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise


# -- helpers ----------------------------------------------------------------------------


class _FdSet:
    """File descriptors to close when done."""

    def __init__(self) -> None:
        self._fds: set[int] = set()

    def add(self, *fds: int) -> None:
        self._fds.update(fds)

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        self.add(r, w)
        return r, w

    def close(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            os.close(fd)

    def close_all(self) -> None:
        for fd in list(self._fds):
            self.close(fd)


class _CrLf:
    """Terminal output with every NL as CR NL, as conmon's ONLCR gives containers. runc
    clears ONLCR on an exec's pty, but the command may have read its terminal settings
    before that and restore them later: so only a NL without its CR gets one here."""

    _LONE_NL = re.compile(rb"(?<!\r)\n")

    def __init__(self, sink: StreamSink) -> None:
        self.sink = sink
        self._after_cr = False

    async def write(self, data: bytes) -> None:
        if not data:
            return
        out = self._LONE_NL.sub(b"\r\n", data)
        if self._after_cr and data[:1] == b"\n":
            out = out[1:]  # its CR came at the end of the last chunk
        self._after_cr = data[-1:] == b"\r"
        await self.sink.write(out)

    async def close(self) -> None:
        await self.sink.close()


class _BufferSink:
    """A StreamSink that keeps the first `limit` bytes (runc's own stderr)."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit

    async def write(self, data: bytes) -> None:
        room = self.limit - len(self.data)
        if room > 0:
            self.data += data[:room]

    async def close(self) -> None:
        pass


async def _cancel(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_fd(fd: int, *, write: bool, limit: asyncio.Event | None = None,
                   grace: float = 0.0) -> bool:
    """Wait until `fd` is readable (or writable). Once `limit` is set, wait at most
    `grace` more seconds; False if that ran out."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        if limit is None:
            await ready
            return True
        if not limit.is_set():
            limited = asyncio.create_task(limit.wait())
            try:
                both: set[asyncio.Future[Any]] = {ready, limited}
                await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            finally:
                limited.cancel()
            if ready.done():
                return True
        await asyncio.wait({ready}, timeout=grace)
        return ready.done()
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
        if not ready.done():
            ready.cancel()


async def _pump_output(
    fd: int, sink: StreamSink | None, exited: asyncio.Event, grace: float
) -> None:
    """Copy `fd` to `sink` until EOF, or until it stays quiet for `grace` seconds after
    `exited` is set (children the command left behind may hold it open for ever). If the
    sink fails (the client is gone), the rest is read and dropped: the command must not
    block on a full pipe."""
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, CHUNK)
        except BlockingIOError:
            if not await _wait_fd(fd, write=False, limit=exited, grace=grace):
                return
            continue
        except OSError as exc:
            if exc.errno == errno.EIO:  # a pty whose other side is gone
                return
            raise
        if not chunk:
            return
        if sink is not None:
            try:
                await sink.write(chunk)
            except Exception as exc:
                log.debug("exec output dropped from now on: %s", exc)
                sink = None


async def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await _wait_fd(fd, write=True)
            continue
        view = view[n:]


async def _feed_fd(queue: asyncio.Queue[bytes | None], fd: int, tty_mode: bool) -> None:
    """The client's stdin into a pipe or our pty master; at its end close the pipe, or
    type Ctrl-D on the terminal. After a write fails, input is still taken (and
    dropped), so the transport never waits on us."""
    os.set_blocking(fd, False)
    broken = False
    while True:
        data = await queue.get()
        if broken:
            if data is None:
                return
            continue
        try:
            if data is None:
                if tty_mode:
                    await _write_fd(fd, CTRL_D)
                else:
                    _close_write_end(fd)
                return
            if data:
                await _write_fd(fd, data)
        except OSError:
            broken = True


def _close_write_end(fd: int) -> None:
    """Send EOF through a pipe without giving up the fd number (the _FdSet closes it):
    point it at /dev/null instead."""
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


async def _resize_tty(queue: asyncio.Queue[TerminalSize], master: int, runc_pid: int) -> None:
    """Size our terminal, then have runc copy the size onto the container's (SIGWINCH)."""
    while True:
        size = await queue.get()
        try:
            fcntl.ioctl(master, termios.TIOCSWINSZ,
                        struct.pack("HHHH", size.height, size.width, 0, 0))
            os.kill(runc_pid, signal.SIGWINCH)
        except (OSError, struct.error) as exc:
            log.debug("exec resize failed: %s", exc)


async def _resize_conmon(queue: asyncio.Queue[TerminalSize], bundle: Path) -> None:
    ctl = bundle / "ctl"
    while True:
        size = await queue.get()
        height = min(max(size.height, 0), CTL_MAX_SIZE)
        width = min(max(size.width, 0), CTL_MAX_SIZE)
        try:
            if not stat.S_ISFIFO(os.lstat(ctl).st_mode):
                log.warning("%s is not conmon's control fifo", ctl)
                return
            # Non-blocking: a fifo nobody reads fails with ENXIO instead of hanging.
            fd = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.write(fd, f"{CTL_RESIZE} {height} {width}\n".encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.debug("attach resize failed: %s", exc)


async def _feed_socket(
    loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[bytes | None],
    sock: socket.socket,
    close_on_eof: bool,
) -> None:
    broken = False
    while (data := await queue.get()) is not None:
        if broken:
            continue
        try:
            for i in range(0, len(data), ATTACH_SEND):
                await loop.sock_sendall(sock, data[i:i + ATTACH_SEND])
        except OSError:
            broken = True
    if close_on_eof and not broken:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


async def _connect_unix(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, directory: Path, name: str
) -> None:
    """Connect to directory/name however long the path (through /proc/self/fd)."""
    path = str(directory / name)
    if len(path.encode()) <= SOCKET_PATH_MAX:
        await loop.sock_connect(sock, path)
        return
    dirfd = os.open(directory, os.O_PATH | os.O_CLOEXEC)
    try:
        await loop.sock_connect(sock, f"/proc/self/fd/{dirfd}/{name}")
    finally:
        os.close(dirfd)


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _connect_local(port: int, timeout: float) -> socket.socket:
    """A TCP connection to localhost:port, IPv4 first, then IPv6 if that is refused."""
    refused: OSError | None = None
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError:  # no IPv6 here
            continue
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            if not isinstance(refused, ConnectionRefusedError):
                refused = exc
    assert refused is not None
    raise refused


def _connect_thread(netns: str | None, port: int, timeout: float) -> socket.socket:
    """Runs in a thread of its own, which ends right after: its namespace never matters
    to anyone else, even if switching back failed."""
    if netns is None:
        return _connect_local(port, timeout)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, _CLONE_NEWNET)
        finally:
            os.close(target)
        try:
            return _connect_local(port, timeout)
        finally:
            with contextlib.suppress(OSError):
                _setns(own, _CLONE_NEWNET)
    finally:
        os.close(own)


async def _connect_in_netns(netns: str | None, port: int, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    result: asyncio.Future[socket.socket] = loop.create_future()

    def deliver(sock: socket.socket | None, exc: BaseException | None) -> None:
        if result.done():  # the caller gave up
            if sock is not None:
                sock.close()
        elif exc is not None:
            result.set_exception(exc)
        else:
            result.set_result(sock)  # type: ignore[arg-type]

    def run() -> None:
        sock: socket.socket | None = None
        error: BaseException | None = None
        try:
            sock = _connect_thread(netns, port, timeout)
        except BaseException as exc:  # handed to the event loop
            error = exc
        try:
            loop.call_soon_threadsafe(deliver, sock, error)
        except RuntimeError:  # the loop is closed
            if sock is not None:
                sock.close()

    threading.Thread(target=run, name=f"portforward-{port}", daemon=True).start()
    return await result
