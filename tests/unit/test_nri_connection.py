"""The NRI connection end to end: cripy's runtime side against the tests' plugin, over a
real socketpair or unix socket, speaking the real multiplexer and ttrpc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cripy.nri import api_pb2, events, mux, ttrpc, ttrpc_pb2
from cripy.nri.connection import (
    PLUGIN_SERVICE,
    NriCallError,
    NriDisconnected,
    NriMessageTooLarge,
    NriTimeout,
    PluginConnection,
    plugin_environment,
    plugin_socketpair,
    start_listener,
)
from tests.support.nri_plugin import NriPlugin

ROOT = Path(__file__).resolve().parents[2]
T = 5.0  # generous per-call timeout: failures show up as errors, not hangs


class Runtime:
    """The runtime's Runtime-service handlers, recording what plugins ask."""

    def __init__(self) -> None:
        self.registrations: list[tuple[str, str]] = []
        self.registered = asyncio.Event()
        self.updates: list[api_pb2.UpdateContainersRequest] = []
        self.refuse_registration = ""

    async def register_plugin(
        self, conn: PluginConnection, req: api_pb2.RegisterPluginRequest
    ) -> None:
        if self.refuse_registration:
            raise NriCallError(ttrpc.Code.INVALID_ARGUMENT, self.refuse_registration)
        self.registrations.append((req.plugin_name, req.plugin_idx))
        self.registered.set()

    async def update_containers(
        self, conn: PluginConnection, req: api_pb2.UpdateContainersRequest
    ) -> api_pb2.UpdateContainersResponse:
        self.updates.append(req)
        return api_pb2.UpdateContainersResponse(
            failed=[u for u in req.update if u.container_id == "missing"]
        )


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(30):
            await coro_fn()

    asyncio.run(guarded())


@contextlib.asynccontextmanager
async def connected(
    plugin: NriPlugin, runtime: Runtime | None = None
) -> AsyncIterator[tuple[PluginConnection, Runtime]]:
    runtime = runtime or Runtime()
    ours, theirs = plugin_socketpair()
    conn = await PluginConnection.from_socket(ours, runtime, label="pre-connected:test")
    conn.start()
    try:
        theirs.setblocking(False)
        await plugin.attach(theirs)
        yield conn, runtime
    finally:
        await plugin.close()
        await conn.close("test over")


def pod(pod_id: str = "pod1") -> api_pb2.PodSandbox:
    return api_pb2.PodSandbox(id=pod_id, name="web", namespace="default", uid="u1")


def container(ctr_id: str = "ctr1", pod_id: str = "pod1") -> api_pb2.Container:
    return api_pb2.Container(
        id=ctr_id, pod_sandbox_id=pod_id, name="app", state=api_pb2.CONTAINER_CREATED
    )


def test_registration_configure_synchronize_and_events() -> None:
    async def main() -> None:
        plugin = NriPlugin("logger", "10", events_mask=events.event_mask(api_pb2.CREATE_CONTAINER))
        plugin.responses["CreateContainer"] = api_pb2.CreateContainerResponse(
            adjust=api_pb2.ContainerAdjustment(env=[api_pb2.KeyValue(key="FOO", value="bar")])
        )
        async with connected(plugin) as (conn, runtime):
            await asyncio.wait_for(runtime.registered.wait(), T)
            assert runtime.registrations == [("logger", "10")]
            assert conn.peer_pid is None  # a socketpair names no peer

            rsp = await conn.configure(
                api_pb2.ConfigureRequest(
                    config="{}",
                    runtime_name="cripy",
                    runtime_version="0.1.0",
                    registration_timeout=5000,
                    request_timeout=2000,
                ),
                T,
            )
            assert events.check_mask(rsp.events) == events.event_mask(api_pb2.CREATE_CONTAINER)
            assert plugin.configure_request is not None
            assert plugin.configure_request.runtime_name == "cripy"
            assert plugin.configure_request.request_timeout == 2000

            sync = await conn.synchronize(
                api_pb2.SynchronizeRequest(pods=[pod()], containers=[container()]), T
            )
            assert list(sync.update) == []
            [sreq] = plugin.requests("Synchronize")
            assert isinstance(sreq, api_pb2.SynchronizeRequest)
            assert [p.id for p in sreq.pods] == ["pod1"]

            created = await conn.create_container(
                api_pb2.CreateContainerRequest(pod=pod(), container=container("c2")), T
            )
            assert [(kv.key, kv.value) for kv in created.adjust.env] == [("FOO", "bar")]
            [creq] = plugin.requests("CreateContainer")
            assert isinstance(creq, api_pb2.CreateContainerRequest)
            assert creq.container.id == "c2" and creq.pod.name == "web"

            await conn.event(api_pb2.START_CONTAINER, pod(), container("c2"), T)
            await conn.event(api_pb2.RUN_POD_SANDBOX, pod("pod2"), None, T)
            assert plugin.event_names() == [
                "Configure",
                "Synchronize",
                "CreateContainer",
                "StartContainer",
                "RunPodSandbox",
            ]
            assert plugin.calls[-1][0] == "RunPodSandbox"  # the v0.12 per-event RPC
            assert not conn.legacy_events

            await conn.shutdown(T)
            assert plugin.event_names()[-1] == "Shutdown"

    run(main)


def test_events_fall_back_to_state_change_for_older_plugins() -> None:
    async def main() -> None:
        plugin = NriPlugin(legacy=True)
        async with connected(plugin) as (conn, _):
            await conn.event(api_pb2.POST_START_CONTAINER, pod(), container(), T)
            await conn.event(api_pb2.REMOVE_POD_SANDBOX, pod(), None, T)
            assert conn.legacy_events
            methods = [m for m, _ in plugin.calls]
            assert methods == ["StateChange", "StateChange"]
            assert plugin.event_names() == ["PostStartContainer", "RemovePodSandbox"]
            first, second = (r for _, r in plugin.calls)
            assert isinstance(first, api_pb2.StateChangeEvent)
            assert isinstance(second, api_pb2.StateChangeEvent)
            assert first.event == api_pb2.POST_START_CONTAINER
            assert first.container.id == "ctr1" and first.pod.id == "pod1"
            assert second.event == api_pb2.REMOVE_POD_SANDBOX
            assert not second.HasField("container")
            with pytest.raises(ValueError, match="not a notification"):
                await conn.event(api_pb2.CREATE_CONTAINER, pod(), container(), T)

    run(main)


def test_plugin_error_is_reported_with_its_message() -> None:
    async def main() -> None:
        plugin = NriPlugin()
        plugin.errors["CreateContainer"] = "no GPUs left"
        async with connected(plugin) as (conn, _):
            with pytest.raises(NriCallError) as info:
                await conn.create_container(
                    api_pb2.CreateContainerRequest(pod=pod(), container=container()), T
                )
            assert info.value.code == ttrpc.Code.UNKNOWN
            assert info.value.message == "no GPUs left"
            assert not conn.closed  # an error answer is no reason to disconnect

    run(main)


def test_timeout_leaves_the_connection_usable() -> None:
    async def main() -> None:
        plugin = NriPlugin()
        plugin.delays["StopContainer"] = 1.0
        async with connected(plugin) as (conn, _):
            req = api_pb2.StopContainerRequest(pod=pod(), container=container())
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(NriTimeout, match="StopContainer: no answer within 0.2s"):
                await conn.stop_container(req, 0.2)
            assert loop.time() - started < 0.9
            [sreq] = await plugin.wait_for("StopContainer")
            # The late answer arrives and is dropped; the next call still works.
            await asyncio.sleep(1.0)
            await conn.update_pod_sandbox(api_pb2.UpdatePodSandboxRequest(pod=pod()), T)
            assert plugin.event_names()[-1] == "UpdatePodSandbox"

    run(main)


async def raw_call(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    stream_id: int = 1,
) -> ttrpc_pb2.Response:
    """Send one ttrpc request on the Runtime-service connection by hand; read its answer."""
    frame = ttrpc.encode_frame(stream_id, ttrpc.MessageType.REQUEST, request)
    writer.write(mux.frames_for_message(mux.RUNTIME_SERVICE_CONN, frame))
    await writer.drain()
    muxdec, dec = mux.MuxDecoder(), ttrpc.FrameDecoder()
    while True:
        data = await reader.read(65536)
        assert data, "connection closed before the answer"
        for f in muxdec.feed(data):
            assert f.conn_id == mux.RUNTIME_SERVICE_CONN
            for m in dec.feed(f.payload):
                assert isinstance(m, ttrpc.Frame)
                assert (m.stream_id, m.type, m.flags) == (stream_id, ttrpc.MessageType.RESPONSE, 0)
                return ttrpc.decode_response(m.data)


@contextlib.asynccontextmanager
async def raw_plugin(
    runtime: Runtime,
) -> AsyncIterator[tuple[PluginConnection, asyncio.StreamReader, asyncio.StreamWriter]]:
    """The runtime's connection, and the bare other end of its socket."""
    ours, theirs = plugin_socketpair()
    conn = await PluginConnection.from_socket(ours, runtime)
    conn.start()
    theirs.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    try:
        yield conn, reader, writer
    finally:
        writer.close()
        await conn.close()


def register_request(name: str, idx: str, timeout_nano: int = 0) -> bytes:
    return ttrpc.encode_request(
        "nri.pkg.api.v1alpha1.Runtime",
        "RegisterPlugin",
        api_pb2.RegisterPluginRequest(plugin_name=name, plugin_idx=idx).SerializeToString(),
        timeout_nano=timeout_nano,
    )


def test_runtime_honours_the_callers_deadline() -> None:
    async def main() -> None:
        runtime = Runtime()
        entered = asyncio.Event()

        async def slow_register(conn: PluginConnection, req: Any) -> None:
            entered.set()
            await asyncio.sleep(10)

        runtime.register_plugin = slow_register  # type: ignore[method-assign]
        async with raw_plugin(runtime) as (conn, reader, writer):
            request = register_request("x", "01", timeout_nano=200_000_000)
            rsp = await asyncio.wait_for(raw_call(reader, writer, request), T)
            assert entered.is_set()
            assert rsp.status.code == ttrpc.Code.DEADLINE_EXCEEDED
            assert not conn.closed

    run(main)


def test_successful_answer_on_the_wire() -> None:
    async def main() -> None:
        runtime = Runtime()
        async with raw_plugin(runtime) as (_, reader, writer):
            request = register_request("raw", "05")
            rsp = await asyncio.wait_for(raw_call(reader, writer, request, stream_id=7), T)
            # Status present with code 0 (what Go clients require), empty Empty payload.
            assert rsp.HasField("status") and rsp.status.code == 0
            assert rsp.payload == b""
            assert runtime.registrations == [("raw", "05")]

    run(main)


def test_disconnect_fails_pending_calls_and_runs_callbacks() -> None:
    async def main() -> None:
        plugin = NriPlugin()
        plugin.delays["UpdateContainer"] = 30
        async with connected(plugin) as (conn, _):
            closed: list[str] = []
            conn.add_close_callback(lambda c: closed.append(c.close_reason))
            call = asyncio.create_task(
                conn.update_container(
                    api_pb2.UpdateContainerRequest(pod=pod(), container=container()), 30
                )
            )
            await plugin.wait_for("UpdateContainer")
            await plugin.close()  # the plugin goes away mid-call
            with pytest.raises(NriDisconnected, match="closed by peer"):
                await call
            await asyncio.wait_for(conn.wait_closed(), T)
            assert conn.closed
            assert closed == ["connection closed by peer"]
            with pytest.raises(NriDisconnected):
                await conn.shutdown(T)
            conn.add_close_callback(lambda c: closed.append("late"))
            assert closed[-1] == "late"

    run(main)


def test_runtime_close_is_seen_by_the_plugin() -> None:
    async def main() -> None:
        plugin = NriPlugin()
        async with connected(plugin) as (conn, _):
            await conn.close("plugin timed out")
            await conn.close("again")  # idempotent
            assert conn.close_reason == "plugin timed out"
            await asyncio.wait_for(plugin.wait_closed(), T)

    run(main)


def test_unsolicited_update_containers() -> None:
    async def main() -> None:
        plugin = NriPlugin()
        async with connected(plugin) as (_, runtime):
            req = api_pb2.UpdateContainersRequest(
                update=[
                    api_pb2.ContainerUpdate(container_id="ctr1"),
                    api_pb2.ContainerUpdate(container_id="missing"),
                ]
            )
            rsp = await plugin.update_containers(req)
            assert [u.container_id for u in rsp.failed] == ["missing"]
            assert [u.container_id for u in runtime.updates[0].update] == ["ctr1", "missing"]

    run(main)


def test_refused_registration_reaches_the_plugin() -> None:
    async def main() -> None:
        runtime = Runtime()
        runtime.refuse_registration = "invalid plugin index"
        plugin = NriPlugin(idx="x")
        with pytest.raises(NriCallError) as info:
            async with connected(plugin, runtime):
                pass
        assert info.value.code == ttrpc.Code.INVALID_ARGUMENT
        assert info.value.message == "invalid plugin index"

    run(main)


def test_unknown_method_is_unimplemented() -> None:
    async def main() -> None:
        plugin = NriPlugin()
        async with connected(plugin) as (conn, _):
            with pytest.raises(NriCallError) as info:
                await conn.call(PLUGIN_SERVICE, "Frobnicate", api_pb2.Empty(), api_pb2.Empty, T)
            assert info.value.code == ttrpc.Code.UNIMPLEMENTED
            assert info.value.message == "method Frobnicate not found"
            with pytest.raises(NriCallError, match="service nope.Svc not found"):
                await conn.call("nope.Svc", "X", api_pb2.Empty(), api_pb2.Empty, T)

    run(main)


def test_large_synchronize_crosses_many_frames() -> None:
    async def main() -> None:
        plugin = NriPlugin()
        async with connected(plugin) as (conn, _):
            pods = [
                api_pb2.PodSandbox(id=f"pod{i}", annotations={"a": "x" * 1000}) for i in range(300)
            ]
            await conn.synchronize(api_pb2.SynchronizeRequest(pods=pods), T)
            [req] = plugin.requests("Synchronize")
            assert isinstance(req, api_pb2.SynchronizeRequest)
            assert len(req.pods) == 300 and req.pods[299].annotations["a"] == "x" * 1000

    run(main)


def test_oversized_request_is_refused_before_sending() -> None:
    async def main() -> None:
        plugin = NriPlugin()
        async with connected(plugin) as (conn, _):
            pods = [api_pb2.PodSandbox(id="p", annotations={"a": "x" * (5 << 20)})]
            with pytest.raises(NriMessageTooLarge) as info:
                await conn.synchronize(api_pb2.SynchronizeRequest(pods=pods), T)
            assert info.value.code == ttrpc.Code.RESOURCE_EXHAUSTED
            assert info.value.length > (5 << 20)
            assert info.value.maximum == 4 << 20
            assert not conn.closed
            await conn.synchronize(api_pb2.SynchronizeRequest(), T)

    run(main)


def test_request_on_an_even_stream_is_refused_on_that_stream() -> None:
    async def main() -> None:
        runtime = Runtime()
        async with raw_plugin(runtime) as (conn, reader, writer):
            # Only clients open streams, with odd ids.
            rsp = await asyncio.wait_for(
                raw_call(reader, writer, register_request("ev", "01"), stream_id=2), T
            )
            assert rsp.status.code == ttrpc.Code.INVALID_ARGUMENT
            assert rsp.status.message == "StreamID must be odd for client initiated streams"
            assert runtime.registrations == []
            assert not conn.closed

    run(main)


def test_malformed_request_closes_the_connection() -> None:
    async def main() -> None:
        async with raw_plugin(Runtime()) as (conn, reader, writer):
            bad = ttrpc.encode_frame(1, ttrpc.MessageType.REQUEST, b"\x0a\x05ab")
            writer.write(mux.frames_for_message(mux.RUNTIME_SERVICE_CONN, bad))
            await writer.drain()
            await asyncio.wait_for(conn.wait_closed(), T)
            assert conn.close_reason.startswith("protocol error: malformed ttrpc request")
            assert await reader.read() == b""  # we hung up

    run(main)


def test_garbage_mux_header_closes_the_connection() -> None:
    async def main() -> None:
        async with raw_plugin(Runtime()) as (conn, _, writer):
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(conn.wait_closed(), T)
            assert conn.close_reason.startswith("protocol error: mux frame")

    run(main)


def test_eof_in_the_middle_of_a_message_is_a_disconnect() -> None:
    async def main() -> None:
        async with raw_plugin(Runtime()) as (conn, _, writer):
            frame = mux.frames_for_message(mux.RUNTIME_SERVICE_CONN, b"\0" * 20)
            writer.write(frame[:12])
            await writer.drain()
            writer.close()
            await asyncio.wait_for(conn.wait_closed(), T)
            assert conn.close_reason == "connection closed by peer in the middle of a message"

    run(main)


def test_frames_for_unknown_connections_are_ignored() -> None:
    async def main() -> None:
        plugin = NriPlugin()
        async with connected(plugin) as (conn, _):
            plugin.peer._writer.write(mux.encode_frame(9, b"whatever"))
            await conn.shutdown(T)
            assert not conn.closed

    run(main)


def test_external_plugin_over_the_listener(tmp_path: Path) -> None:
    async def main() -> None:
        path = str(tmp_path / "run" / "nri.sock")
        runtime = Runtime()
        accepted: asyncio.Queue[PluginConnection] = asyncio.Queue()

        async def on_connect(conn: PluginConnection) -> None:
            await accepted.put(conn)

        server = await start_listener(path, runtime, on_connect)
        plugin = NriPlugin("ext", "90")
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
            await plugin.connect(path)
            conn = await asyncio.wait_for(accepted.get(), T)
            assert conn.label == "external"
            assert conn.peer_pid is None  # the plugin is this very process here
            assert runtime.registrations == [("ext", "90")]
            rsp = await conn.configure(api_pb2.ConfigureRequest(runtime_name="cripy"), T)
            assert events.check_mask(rsp.events) == events.ALL_EVENTS
            await plugin.close()
            await asyncio.wait_for(conn.wait_closed(), T)
        finally:
            await plugin.close()
            server.close()
            await server.wait_closed()

    run(main)


def test_listener_replaces_a_stale_socket_but_not_a_file(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "nri.sock"
        path.write_text("not a socket")
        with pytest.raises(FileExistsError, match="is not a socket"):
            await start_listener(str(path), Runtime(), lambda c: asyncio.sleep(0))
        path.unlink()
        first = await start_listener(str(path), Runtime(), lambda c: asyncio.sleep(0))
        first.close()
        await first.wait_closed()
        second = await start_listener(str(path), Runtime(), lambda c: asyncio.sleep(0))
        second.close()
        await second.wait_closed()

    run(main)


def _plugin_process_env(name: str, idx: str, fd: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update(plugin_environment(name, idx, fd))
    return env


def test_executable_plugin_with_an_inherited_socket(tmp_path: Path) -> None:
    async def main() -> None:
        record = tmp_path / "calls.jsonl"
        runtime = Runtime()
        ours, theirs = plugin_socketpair()
        conn = await PluginConnection.from_socket(ours, runtime, label="pre-connected:20-exe")
        conn.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.nri_plugin",
            "--record",
            str(record),
            pass_fds=(theirs.fileno(),),
            env=_plugin_process_env("exe", "20", theirs.fileno()),
            cwd=ROOT,
        )
        theirs.close()
        try:
            await asyncio.wait_for(runtime.registered.wait(), 20)
            assert runtime.registrations == [("exe", "20")]
            behaviour = {
                "events": ["CreateContainer", "RemoveContainer"],
                "adjust": {"env": {"INJECTED": "1"}, "memory_limit": 64 << 20},
                "exit_on": "RemoveContainer",
            }
            rsp = await conn.configure(
                api_pb2.ConfigureRequest(config=json.dumps(behaviour), runtime_name="cripy"), T
            )
            assert events.event_names(rsp.events) == ["CreateContainer", "RemoveContainer"]
            created = await conn.create_container(
                api_pb2.CreateContainerRequest(pod=pod(), container=container()), T
            )
            assert [(kv.key, kv.value) for kv in created.adjust.env] == [("INJECTED", "1")]
            assert created.adjust.linux.resources.memory.limit.value == 64 << 20
            # The plugin crashes on RemoveContainer: the call fails, the connection closes.
            with pytest.raises(NriDisconnected):
                await conn.event(api_pb2.REMOVE_CONTAINER, pod(), container(), T)
            await asyncio.wait_for(conn.wait_closed(), T)
            assert await asyncio.wait_for(proc.wait(), T) == 1
            lines = [json.loads(line) for line in record.read_text().splitlines()]
            assert [line["event"] for line in lines] == [
                "Configure",
                "CreateContainer",
                "RemoveContainer",
            ]
            assert lines[0]["runtime_name"] == "cripy"
            assert lines[1]["container"] == {
                "id": "ctr1",
                "name": "app",
                "state": "CONTAINER_CREATED",
                "exit_code": 0,
            }
            assert {line["pid"] for line in lines} == {proc.pid}
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await conn.close()

    run(main)


def test_executable_plugin_dialing_the_socket(tmp_path: Path) -> None:
    async def main() -> None:
        path = str(tmp_path / "nri.sock")
        runtime = Runtime()
        accepted: asyncio.Queue[PluginConnection] = asyncio.Queue()

        async def on_connect(conn: PluginConnection) -> None:
            await accepted.put(conn)

        server = await start_listener(path, runtime, on_connect)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for key in ("NRI_PLUGIN_SOCKET", "NRI_PLUGIN_NAME", "NRI_PLUGIN_IDX"):
            env.pop(key, None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.nri_plugin",
            "--socket",
            path,
            "--name",
            "dialer",
            "--idx",
            "30",
            "--events",
            "StopContainer",
            env=env,
            cwd=ROOT,
        )
        try:
            conn = await asyncio.wait_for(accepted.get(), 20)
            await asyncio.wait_for(runtime.registered.wait(), 20)
            assert runtime.registrations == [("dialer", "30")]
            assert conn.peer_pid == proc.pid
            rsp = await conn.configure(api_pb2.ConfigureRequest(runtime_name="cripy"), T)
            assert events.event_names(rsp.events) == ["StopContainer"]
            # The runtime closes the connection: the plugin exits cleanly.
            await conn.close("runtime shutting down")
            assert await asyncio.wait_for(proc.wait(), T) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            server.close()
            await server.wait_closed()

    run(main)


def test_a_plugin_that_stops_reading_cannot_hang_calls_or_close() -> None:
    async def main() -> None:
        async with raw_plugin(Runtime()) as (conn, _, _writer):
            # Nobody reads the other end: a large request fills the socket buffers.
            pods = [api_pb2.PodSandbox(id="p", annotations={"a": "x" * (3 << 20)})]
            with pytest.raises(NriTimeout):
                await conn.synchronize(api_pb2.SynchronizeRequest(pods=pods), 0.3)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await conn.close("plugin stuck")
            assert loop.time() - started < 3
            assert conn.close_reason == "plugin stuck"

    run(main)


def test_random_bytes_never_break_the_runtime_side() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        leaked: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: leaked.append(ctx))
        rng = random.Random(1234)
        valid = mux.frames_for_message(
            mux.RUNTIME_SERVICE_CONN,
            ttrpc.encode_frame(1, ttrpc.MessageType.REQUEST, register_request("fz", "01")),
        )
        for _ in range(40):
            blob = bytearray(valid * rng.randint(0, 2))
            for _ in range(rng.randint(0, 8)):
                if blob and rng.random() < 0.5:
                    blob[rng.randrange(len(blob))] = rng.randrange(256)
                else:
                    blob += rng.randbytes(rng.randint(1, 40))
            runtime = Runtime()
            async with raw_plugin(runtime) as (conn, _, writer):
                writer.write(bytes(blob))
                await writer.drain()
                writer.close()
                await asyncio.wait_for(conn.wait_closed(), T)
                assert conn.close_reason
        assert leaked == []

    run(main)
