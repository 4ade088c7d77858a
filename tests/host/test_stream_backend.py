"""RuntimeStreamBackend against the real runc and conmon (busybox-static bundles), and
port forwarding into a real pinned network namespace.

The container and pod managers are small fakes with just what the backend reads; the
transport side is an in-memory StreamSession.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from cripy.api import api_pb2 as pb
from cripy.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from cripy.network.namespaces import pin_namespaces, unpin_namespaces
from cripy.oci import stream as oci_stream
from cripy.oci.runtime import OciRuntime
from cripy.runtime.store import ContainerState, PodState
from cripy.streaming.backend import RuntimeStreamBackend
from cripy.streaming.session import (
    AttachTarget,
    ExecTarget,
    Outcome,
    PortForwardTarget,
    StreamSession,
    TerminalSize,
)
from tests.host.test_oci_runtime import (
    CGROUP_PARENT,
    CONMON,
    RUNC,
    _cgroup_dirs,
    _force_cleanup,
    _live_conmons,
    make_bundle,
)

EXTRA_APPLETS = ["stty", "sh"]


@pytest.fixture(scope="module", autouse=True)
def _remove_cgroup_parent() -> Iterator[None]:
    """The containers here share test_oci_runtime's cgroup parent; drop it at the end."""
    yield
    for parent in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}"):
        with contextlib.suppress(OSError):  # busy: someone else still uses it
            parent.rmdir()


# -- fakes -----------------------------------------------------------------------------


@dataclass
class FakeContainer:
    id: str
    state: ContainerState = ContainerState.RUNNING
    config: pb.ContainerConfig = field(default_factory=pb.ContainerConfig)


class FakeContainers:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.items: dict[str, FakeContainer] = {}

    def get(self, container_id: str) -> FakeContainer:
        try:
            return self.items[container_id]
        except KeyError:
            raise NotFoundError(f"container {container_id!r} not found") from None

    async def get_running(self, container_id: str) -> FakeContainer:
        container = self.get(container_id)
        if container.state != ContainerState.RUNNING:
            raise FailedPreconditionError(f"container {container.id} is not running")
        return container


@dataclass
class FakeSandbox:
    id: str
    namespaces: dict[str, str]
    state: PodState = PodState.READY


class FakeSandboxes:
    def __init__(self) -> None:
        self.items: dict[str, FakeSandbox] = {}

    def get(self, sandbox_id: str) -> FakeSandbox:
        try:
            return self.items[sandbox_id]
        except KeyError:
            raise NotFoundError(f"pod sandbox {sandbox_id!r} not found") from None


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.changed = asyncio.Event()

    async def write(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    async def close(self) -> None:
        self.closed = True

    async def wait_for(self, text: bytes, timeout: float = 10.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while text not in self.data:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise TimeoutError(f"{text!r} not in {bytes(self.data)!r}") from None


def session(*, tty: bool = False, stdin: bool = False) -> tuple[StreamSession, Sink, Sink]:
    out, err = Sink(), Sink()
    s = StreamSession(tty=tty, stdout=out, stderr=None if tty else err)
    if stdin:
        s.stdin = asyncio.Queue()
    if tty:
        s.resize = asyncio.Queue()
    return s, out, err


# -- environment ---------------------------------------------------------------------


@dataclass
class Env:
    tmp: Path
    oci: OciRuntime
    containers: FakeContainers
    sandboxes: FakeSandboxes
    backend: RuntimeStreamBackend
    ids: list[str] = field(default_factory=list)

    async def container(self, args: list[str], *, tty: bool = False, stdin: bool = False,
                        stdin_once: bool = False) -> str:
        """A running container, its bundle at run_dir/ID as the ContainerManager has it."""
        cid = f"s{uuid.uuid4().hex[:12]}"
        self.ids.append(cid)
        built = make_bundle(self.tmp, cid, args, tty=tty)
        for applet in EXTRA_APPLETS:
            link = built / "rootfs" / "bin" / applet
            if not link.is_symlink():
                link.symlink_to("busybox")
        bundle = self.containers.run_dir / cid
        built.rename(bundle)
        await self.oci.create(cid, bundle, self.tmp / "logs" / f"{cid}.log", tty=tty,
                              stdin=stdin, stdin_once=stdin_once)
        await self.oci.start(cid)
        self.containers.items[cid] = FakeContainer(
            cid, config=pb.ContainerConfig(tty=tty, stdin=stdin, stdin_once=stdin_once))
        return cid


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    (tmp_path / "logs").mkdir()
    (tmp_path / "run").mkdir()
    oci = OciRuntime(runtime_path=RUNC, conmon_path=CONMON, state_dir=tmp_path / "state")
    containers = FakeContainers(tmp_path / "run")
    sandboxes = FakeSandboxes()
    backend = RuntimeStreamBackend(cast(Any, containers), cast(Any, sandboxes), oci)
    e = Env(tmp_path, oci, containers, sandboxes, backend)
    try:
        yield e
    finally:
        for cid in e.ids:
            _force_cleanup(oci.state_dir, cid)
        left = _live_conmons(set(e.ids)) + [d for c in e.ids for d in _cgroup_dirs(c)]
        assert not left, f"left behind: {left}"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def exec_target(cid: str, cmd: list[str], *, tty: bool = False, stdin: bool = False,
                stderr: bool = True) -> ExecTarget:
    return ExecTarget(cid, cmd, tty=tty, stdin=stdin, stdout=True, stderr=stderr and not tty)


def processes_named(argv: list[str]) -> list[int]:
    wanted = "\0".join(argv).encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/cmdline").read_bytes().rstrip(b"\0") == wanted:
                    found.append(int(entry))
    return found


# -- exec ------------------------------------------------------------------------------


def test_exec_tty_shell(env: Env) -> None:
    async def body() -> None:
        cid = await env.container(["sleep", "1000"])
        s, out, _ = session(tty=True, stdin=True)
        assert s.stdin is not None
        task = asyncio.create_task(
            env.backend.exec(exec_target(cid, ["sh"], tty=True, stdin=True), s))
        await s.stdin.put(b'echo h""i\n')
        await out.wait_for(b"\nhi\r\n")  # the echoed input reads h""i: this is the output
        await s.stdin.put(b"tty\n")
        await out.wait_for(b"/dev/pts/")
        await s.stdin.put(b"exit 3\n")
        assert await asyncio.wait_for(task, 10) == Outcome(exit_code=3)
        assert out.closed

    run(body())


def test_exec_tty_resize(env: Env) -> None:
    async def body() -> None:
        cid = await env.container(["sleep", "1000"])
        s, out, _ = session(tty=True, stdin=True)
        assert s.stdin is not None and s.resize is not None
        task = asyncio.create_task(
            env.backend.exec(exec_target(cid, ["sh"], tty=True, stdin=True), s))
        await s.resize.put(TerminalSize(width=123, height=45))
        # runc applies the size when it handles our SIGWINCH: ask until it shows.
        for _ in range(40):
            await s.stdin.put(b"stty size\n")
            with contextlib.suppress(TimeoutError):
                await out.wait_for(b"45 123", 0.25)
                break
        assert b"45 123" in out.data
        await s.resize.put(TerminalSize(width=80, height=24))
        for _ in range(40):
            await s.stdin.put(b"stty size\n")
            with contextlib.suppress(TimeoutError):
                await out.wait_for(b"24 80", 0.25)
                break
        assert b"24 80" in out.data
        await s.stdin.put(b"exit 0\n")
        assert await asyncio.wait_for(task, 10) == Outcome(exit_code=0)

    run(body())


def test_exec_tty_stdin_eof_is_ctrl_d(env: Env) -> None:
    async def body() -> None:
        cid = await env.container(["sleep", "1000"])
        s, out, _ = session(tty=True, stdin=True)
        assert s.stdin is not None
        for chunk in (b"abc\n", b"x\ny", b"\n", None):  # Ctrl-D at a line's start is EOF
            s.stdin.put_nowait(chunk)
        outcome = await asyncio.wait_for(
            env.backend.exec(exec_target(cid, ["cat"], tty=True, stdin=True), s), 10)
        assert outcome == Outcome(exit_code=0)
        # What the terminal echoed, and what cat wrote: every line ends in CR NL.
        assert out.data.count(b"abc\r\n") == 2 and out.data.count(b"x\r\n") == 2
        assert out.data.count(b"y\r\n") == 2 and b"\r\r" not in out.data

    run(body())


def test_exec_pipes_keep_stdout_and_stderr_apart(env: Env) -> None:
    async def body() -> None:
        cid = await env.container(["sleep", "1000"])
        s, out, err = session()
        script = "echo out; echo err >&2; echo out2; exit 7"
        outcome = await env.backend.exec(exec_target(cid, ["sh", "-c", script]), s)
        assert outcome == Outcome(exit_code=7)
        assert bytes(out.data) == b"out\nout2\n"
        assert bytes(err.data) == b"err\n"
        assert out.closed and err.closed

    run(body())


def test_exec_stdin_eof_ends_cat(env: Env) -> None:
    async def body() -> None:
        cid = await env.container(["sleep", "1000"])
        s, out, _ = session(stdin=True)
        assert s.stdin is not None
        for chunk in (b"abc", b"def\n", b"x" * 200_000, None):
            s.stdin.put_nowait(chunk)
        outcome = await asyncio.wait_for(
            env.backend.exec(exec_target(cid, ["cat"], stdin=True), s), 20)
        assert outcome == Outcome(exit_code=0)
        assert bytes(out.data) == b"abcdef\n" + b"x" * 200_000

    run(body())


class FailingSink(Sink):
    async def write(self, data: bytes) -> None:
        raise ConnectionResetError("client gone")


def test_exec_runs_on_when_the_client_stops_reading(env: Env) -> None:
    async def body() -> None:
        cid = await env.container(["sleep", "1000"])
        s, _, _ = session()
        s.stdout = FailingSink()
        script = "i=0; while [ $i -lt 2000 ]; do echo line line line line $i; i=$((i+1)); done"
        outcome = await asyncio.wait_for(
            env.backend.exec(exec_target(cid, ["sh", "-c", script + "; exit 2"]), s), 30)
        assert outcome == Outcome(exit_code=2)

    run(body())


def test_exec_without_stdin_gets_eof(env: Env) -> None:
    async def body() -> None:
        cid = await env.container(["sleep", "1000"])
        s, out, _ = session()
        outcome = await asyncio.wait_for(env.backend.exec(exec_target(cid, ["cat"]), s), 10)
        assert outcome == Outcome(exit_code=0) and out.data == b""

    run(body())


def test_exec_errors(env: Env) -> None:
    async def body() -> None:
        cid = await env.container(["sleep", "1000"])
        s, _, _ = session()
        outcome = await env.backend.exec(exec_target(cid, ["no-such-command"]), s)
        assert "no-such-command" in outcome.error
        outcome = await env.backend.exec(exec_target("nope", ["sh"]), s)
        assert "not found" in outcome.error
        env.containers.items[cid].state = ContainerState.EXITED
        outcome = await env.backend.exec(exec_target(cid, ["sh"]), s)
        assert "not running" in outcome.error
        assert list((env.oci.state_dir / "exec").iterdir()) == []

    run(body())


def test_cancelled_exec_kills_the_process(env: Env) -> None:
    async def body() -> None:
        cid = await env.container(["sleep", "1000"])
        sleep = ["sleep", str(100_000 + uuid.uuid4().int % 100_000)]  # ours alone
        for tty in (False, True):
            s, _, _ = session(tty=tty, stdin=True)
            task = asyncio.create_task(
                env.backend.exec(exec_target(cid, sleep, tty=tty, stdin=True), s))
            deadline = time.monotonic() + 10
            while not processes_named(sleep):
                assert time.monotonic() < deadline, "the exec never started"
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert processes_named(sleep) == []
        assert list((env.oci.state_dir / "exec").iterdir()) == []
        # The container itself is untouched.
        state = await env.oci.state(cid)
        assert state is not None and state["status"] == "running"

    run(body())


# -- attach ----------------------------------------------------------------------------


def test_attach_sees_new_output_on_both_streams(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # However long the bundle's path: the socket is reached through /proc/self/fd.
    monkeypatch.setattr(oci_stream, "SOCKET_PATH_MAX", 0)

    async def body() -> None:
        script = "while true; do echo tick; echo tock >&2; sleep 0.2; done"
        cid = await env.container(["sh", "-c", script])
        s, out, err = session()
        task = asyncio.create_task(
            env.backend.attach(AttachTarget(cid, False, False, True, True), s))
        await out.wait_for(b"tick\n")
        await err.wait_for(b"tock\n")
        assert b"tock" not in out.data and b"tick" not in err.data
        await env.oci.kill(cid, signal.SIGKILL)
        assert await asyncio.wait_for(task, 10) == Outcome(exit_code=137)

    run(body())


def test_attach_stdin_once_and_exit_code(env: Env) -> None:
    async def body() -> None:
        cid = await env.container(["sh", "-c", "cat; exit 5"], stdin=True, stdin_once=True)
        s, out, _ = session(stdin=True)
        assert s.stdin is not None
        task = asyncio.create_task(
            env.backend.attach(AttachTarget(cid, False, True, True, False), s))
        await asyncio.sleep(0.2)  # conmon accepts the connection
        await s.stdin.put(b"hello\n")
        await out.wait_for(b"hello\n")
        await s.stdin.put(None)  # stdin_once: the container's stdin closes, cat ends
        assert await asyncio.wait_for(task, 10) == Outcome(exit_code=5)

    run(body())


def test_attach_tty_resize(env: Env) -> None:
    async def body() -> None:
        cid = await env.container(["sh"], tty=True, stdin=True)
        s, out, _ = session(tty=True, stdin=True)
        assert s.stdin is not None and s.resize is not None
        task = asyncio.create_task(
            env.backend.attach(AttachTarget(cid, True, True, True, False), s))
        await s.resize.put(TerminalSize(width=100, height=40))
        for _ in range(40):
            await s.stdin.put(b"stty size\n")
            with contextlib.suppress(TimeoutError):
                await out.wait_for(b"40 100", 0.25)
                break
        assert b"40 100" in out.data
        await s.stdin.put(b"exit 4\n")
        assert await asyncio.wait_for(task, 10) == Outcome(exit_code=4)

    run(body())


def test_attach_cancel_detaches_and_errors(env: Env) -> None:
    async def body() -> None:
        cid = await env.container(["sleep", "1000"])
        s, _, _ = session()
        task = asyncio.create_task(
            env.backend.attach(AttachTarget(cid, False, False, True, True), s))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        state = await env.oci.state(cid)
        assert state is not None and state["status"] == "running"
        outcome = await env.backend.attach(AttachTarget("nope", False, False, True, True), s)
        assert "not found" in outcome.error
        await env.oci.kill(cid, signal.SIGKILL)
        await env.oci.wait_exit(cid, 10)
        outcome = await env.backend.attach(AttachTarget(cid, False, False, True, True), s)
        assert "cannot attach" in outcome.error

    run(body())


# -- port forward ------------------------------------------------------------------------

SERVER = """
import socket, sys, threading
def serve(conn):
    conn.sendall(b"hello\\n")
    while data := conn.recv(4096):
        conn.sendall(data)
    conn.close()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen()
print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused_on_host(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "pod" / "ns"
    pinned = asyncio.run(pin_namespaces(directory, ["net"], None))
    try:
        subprocess.run(["nsenter", f"--net={pinned['net']}", "ip", "link", "set", "lo", "up"],
                       check=True, timeout=30)
        yield pinned["net"]
    finally:
        asyncio.run(unpin_namespaces(directory))


def test_open_port_inside_the_pod_netns(env: Env, netns: Path) -> None:
    own_netns = os.stat("/proc/thread-self/ns/net").st_ino
    port = free_port()
    server = subprocess.Popen(
        ["nsenter", f"--net={netns}", sys.executable, "-c", SERVER, str(port)],
        stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        assert refused_on_host(port)  # only the pod has it
        env.sandboxes.items["pod1"] = FakeSandbox("pod1", {"net": str(netns)})

        async def body() -> None:
            reader, writer = await env.backend.open_port(PortForwardTarget("pod1"), port)
            try:
                assert await asyncio.wait_for(reader.readline(), 10) == b"hello\n"
                writer.write(b"ping\n")
                assert await asyncio.wait_for(reader.readline(), 10) == b"ping\n"
            finally:
                writer.close()
            # Twice at once, and with the port fixed by the request.
            pairs = await asyncio.gather(
                env.backend.open_port(PortForwardTarget("pod1", [port]), port),
                env.backend.open_port(PortForwardTarget("pod1", [port]), port))
            for reader, writer in pairs:
                assert await asyncio.wait_for(reader.readline(), 10) == b"hello\n"
                writer.close()
            other = free_port()
            with pytest.raises(UnavailableError, match="refused"):
                await env.backend.open_port(PortForwardTarget("pod1"), other)
            with pytest.raises(InvalidArgumentError, match="not requested"):
                await env.backend.open_port(PortForwardTarget("pod1", [port]), other)
            for bad in (0, 65536, -1):
                with pytest.raises(InvalidArgumentError):
                    await env.backend.open_port(PortForwardTarget("pod1"), bad)
            with pytest.raises(NotFoundError):
                await env.backend.open_port(PortForwardTarget("nope"), port)

        run(body())
    finally:
        server.kill()
        server.wait()
    # Our own threads never moved: every one is still in our network namespace.
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):
            assert os.stat(f"/proc/self/task/{task}/ns/net").st_ino == own_netns


def test_open_port_host_network(env: Env) -> None:
    env.sandboxes.items["host"] = FakeSandbox("host", {})

    async def body() -> None:
        async def greet(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"host\n")
            await w.drain()
            w.close()

        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await env.backend.open_port(PortForwardTarget("host"), port)
            assert await asyncio.wait_for(reader.readline(), 10) == b"host\n"
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    run(body())
