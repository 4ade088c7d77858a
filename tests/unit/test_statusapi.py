"""The status API over a real unix socket, with fake managers and a fake runtime."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import stat
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from cripy import __version__
from cripy.api import api_pb2 as pb
from cripy.cli import status as status_cli
from cripy.config import Config, from_dict
from cripy.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from cripy.httpserver import HTTPConnections, Request, Response, json_response
from cripy.oci.features import Feature, HandlerFeatures
from cripy.oci.handlers import RuntimeHandler
from cripy.oci.runtime import OciRuntime
from cripy.runtime.container import ContainerManager
from cripy.runtime.sandbox import SandboxManager
from cripy.runtime.store import Container, ContainerState, PodState, Sandbox
from cripy.statusapi import StatusServer

POD_ID = "a" * 64
RUNNING_ID = "b1" + "0" * 62
EXITED_ID = "b2" + "0" * 62
PAUSED_ID = "c" * 64


class FakeOci:
    runtime_path = "/usr/sbin/runc"
    handlers = {"runc": RuntimeHandler("runc", "/usr/sbin/runc", Path("/run/x"), "conmon",
                                       "runc", "1.1.5", features=HandlerFeatures(
                                           recursive_read_only=Feature(True)))}

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.status: dict[str, str] = {}  # runc's view
        self.calls: list[tuple[str, str]] = []

    def exit_status(self, cid: str) -> None:
        return None  # nothing exits here

    async def state(self, cid: str) -> dict[str, Any] | None:
        if cid not in self.status:
            return None
        return {"id": cid, "status": self.status[cid]}

    async def pause(self, cid: str) -> None:
        self.calls.append(("pause", cid))
        self.status[cid] = "paused"

    async def resume(self, cid: str) -> None:
        self.calls.append(("resume", cid))
        self.status[cid] = "running"


def make_container(cid: str, state: ContainerState, **kw: Any) -> Container:
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=f"app-{cid[:2]}"),
        image=pb.ImageSpec(image="127.0.0.1:5000/busybox:latest"),
        labels={"io.kubernetes.container.name": "app"}, annotations={"note": "x"})
    return Container(id=cid, sandbox_id=POD_ID, config=config, image_id="sha256:" + "d" * 64,
                     pod_name="web_default_uid_0", created_at=1_700_000_000_000_000_000,
                     log_path=kw.pop("log_path", ""), state=state, **kw)


def make_sandbox(state: PodState = PodState.READY) -> Sandbox:
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web", namespace="default", uid="uid"),
        labels={"app": "web"}, log_directory="/var/log/pods/web")
    config.linux.security_context.namespace_options.network = pb.POD
    return Sandbox(id=POD_ID, config=config, runtime_handler="", created_at=123, state=state,
                   ips=("10.85.0.7",))


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.config = Config(root=str(tmp_path / "root"), runroot=str(tmp_path / "run"))
        self.oci = FakeOci(tmp_path / "run" / "oci")
        oci = cast(Any, self.oci)
        self.sandboxes = SandboxManager(self.config, oci, cast(Any, None))
        self.containers = ContainerManager(self.config, oci, cast(Any, None), self.sandboxes)
        self.sandboxes.containers = self.containers
        self.oci.status = {RUNNING_ID: "running", PAUSED_ID: "paused"}
        self.path = tmp_path / "sock" / "status.sock"
        self.server = StatusServer(self.path, self.config, self.containers, self.sandboxes,
                                   oci)

    async def populate(self) -> None:
        """One pod with a running, an exited and a (runc-)paused container."""
        await self.sandboxes.store.add(make_sandbox())
        for c in (make_container(RUNNING_ID, ContainerState.RUNNING, pid=4242, started_at=5,
                                 log_path="/var/log/pods/web/app/0.log"),
                  make_container(EXITED_ID, ContainerState.EXITED, pid=4243, exit_code=3,
                                 finished_at=9),
                  make_container(PAUSED_ID, ContainerState.RUNNING, pid=4244)):
            await self.containers.store.add(c)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.path)),
                                 base_url="http://cripy", timeout=10)


Scenario = Callable[[World, httpx.AsyncClient], Awaitable[None]]


def serve(tmp_path: Path, scenario: Scenario) -> World:
    world = World(tmp_path)

    async def main() -> None:
        await world.populate()
        await world.server.start()
        try:
            async with world.client() as client:
                await scenario(world, client)
        finally:
            await world.server.stop()

    asyncio.run(main())
    return world


async def raw_exchange(path: Path, data: bytes) -> bytes:
    """Send raw bytes, return everything until the server closes."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


# --- endpoints -----------------------------------------------------------------------


def test_info(tmp_path: Path) -> None:
    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        r = await client.get("/info")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        full = [{"container_id": 0, "host_id": 0, "size": 4294967295}]
        assert r.json() == {
            "storage_driver": "overlay", "storage_root": world.config.root,
            "storage_image": "", "cgroup_driver": "cgroupfs",
            "default_id_mappings": {"uids": full, "gids": full},
            "runroot": world.config.runroot, "runtime": "/usr/sbin/runc",
            "runtime_root": str(world.oci.state_dir / "runc"), "version": __version__,
            # The world's manager was not probed (the daemon probes criu at start).
            "checkpoint_restore": {"available": False, "reason": "not probed", "criu": "",
                                   "version": ""},
            "runtime_handlers": [{
                "name": "runc", "runtime_path": "/usr/sbin/runc", "flavor": "runc",
                "version": "1.1.5", "usable": True, "problem": "",
                "features": {
                    "recursive_read_only": {"supported": True, "reason": ""},
                    "user_namespaces": {"supported": False, "reason": "not probed"}}}],
            "default_runtime_handler": "runc",
            "features": {"supplemental_groups_policy": True,
                         "user_namespaces_host_network": False},
        }

    serve(tmp_path, scenario)


def test_config_is_the_effective_toml(tmp_path: Path) -> None:
    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        world.config.log_level = "debug"  # a reload changes the shared object
        r = await client.get("/config")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/toml"
        assert from_dict(tomllib.loads(r.text)) == world.config

    serve(tmp_path, scenario)


def test_container_info(tmp_path: Path) -> None:
    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        r = await client.get(f"/containers/{RUNNING_ID[:5]}")  # a unique prefix
        assert r.status_code == 200
        info = r.json()
        run_dir = Path(world.config.runroot) / "containers"
        assert info == {
            "id": RUNNING_ID, "name": "k8s_app-b1_web_default_uid_0", "pid": 4242,
            "image": "127.0.0.1:5000/busybox:latest", "image_ref": "sha256:" + "d" * 64,
            "created_time": 1_700_000_000_000_000_000,
            "labels": {"io.kubernetes.container.name": "app"}, "annotations": {"note": "x"},
            "log_path": "/var/log/pods/web/app/0.log",
            "root": str(run_dir / RUNNING_ID / "rootfs"), "sandbox": POD_ID,
            "ip_addresses": ["10.85.0.7"], "host_network": False, "state": "running",
            "started_time": 5, "finished_time": 0, "exit_code": 0,
        }
        exited = (await client.get(f"/containers/{EXITED_ID}")).json()
        assert (exited["state"], exited["pid"], exited["exit_code"]) == ("exited", 0, 3)
        assert exited["log_path"] == str(run_dir / EXITED_ID / "console.log")
        paused = (await client.get(f"/containers/{PAUSED_ID}")).json()
        assert (paused["state"], paused["pid"]) == ("paused", 4244)

    serve(tmp_path, scenario)


def test_a_pod_id_gives_the_pod_like_crio_infra(tmp_path: Path) -> None:
    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        info = (await client.get(f"/containers/{POD_ID}")).json()
        assert info["name"] == "k8s_web_default_uid_0"
        assert info["sandbox"] == POD_ID
        assert info["pid"] == 4242  # no infra process: a running container's
        assert info["labels"] == {"app": "web"}
        assert info["ip_addresses"] == ["10.85.0.7"]
        assert info["state"] == "ready"

    serve(tmp_path, scenario)


def test_errors_are_json(tmp_path: Path) -> None:
    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        r = await client.get("/containers/ffff")
        assert r.status_code == 404
        assert "not found" in r.json()["error"]
        r = await client.get("/containers/b")  # two containers start with b
        assert r.status_code == 400
        assert "ambiguous" in r.json()["error"]
        for path in ("/", "/nope", "/containers", "/containers/", "/info/x"):
            r = await client.get(path)
            assert r.status_code == 404, path
            assert r.json()["error"].startswith("no such endpoint")
        r = await client.post("/info")
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, HEAD"
        r = await client.get(f"/pause/{RUNNING_ID}")
        assert r.status_code == 405
        assert r.headers["allow"] == "POST"
        assert world.oci.calls == []
        r = await client.head("/info")
        assert r.status_code == 200 and r.content == b""

    serve(tmp_path, scenario)


def test_pause_and_unpause(tmp_path: Path) -> None:
    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        r = await client.post(f"/pause/{RUNNING_ID}")
        assert r.status_code == 200
        assert r.json() == {"id": RUNNING_ID, "state": "paused"}
        assert (await client.get(f"/containers/{RUNNING_ID}")).json()["state"] == "paused"
        r = await client.post(f"/pause/{RUNNING_ID}")
        assert r.status_code == 409
        assert "now is paused" in r.json()["error"]
        r = await client.post(f"/unpause/{RUNNING_ID}")
        assert r.status_code == 200
        assert r.json() == {"id": RUNNING_ID, "state": "running"}
        assert (await client.post(f"/unpause/{RUNNING_ID}")).status_code == 409
        assert (await client.post(f"/pause/{EXITED_ID}")).status_code == 409
        assert (await client.post(f"/unpause/{EXITED_ID}")).status_code == 409
        assert (await client.post("/pause/ffff")).status_code == 404
        assert world.oci.calls == [("pause", RUNNING_ID), ("resume", RUNNING_ID)]

    serve(tmp_path, scenario)


def test_malformed_requests_get_400(tmp_path: Path) -> None:
    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        answer = await raw_exchange(world.path, b"GARBAGE\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        answer = await raw_exchange(world.path, b"GET /info HTTP/1.1\r\nno colon\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        huge = b"GET /info HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        answer = await raw_exchange(world.path, huge)
        assert answer.split(b" ")[1] in (b"400", b"431")
        body = b"x" * 100_000
        answer = await raw_exchange(
            world.path, b"POST /pause/b1 HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert world.oci.calls == []
        assert (await client.get("/info")).status_code == 200

    serve(tmp_path, scenario)


def test_keep_alive_serves_several_requests_on_one_connection(tmp_path: Path) -> None:
    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        request = b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n"
        last = b"GET /config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = await raw_exchange(world.path, request + request + last)
        assert answer.count(b"HTTP/1.1 200 ") == 3
        assert b"application/toml" in answer

    serve(tmp_path, scenario)


# --- the socket ----------------------------------------------------------------------


def test_socket_mode_and_removal(tmp_path: Path) -> None:
    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        st = os.stat(world.path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_uid == os.geteuid()

    world = serve(tmp_path, scenario)
    assert not world.path.exists()


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "sock" / "status.sock"
    path.parent.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # bound, never listening, closed: what a killed daemon leaves
    dead.close()
    assert path.exists()

    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        assert (await client.get("/info")).status_code == 200

    serve(tmp_path, scenario)


def test_a_live_socket_or_another_file_is_an_error(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.path.parent.mkdir()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(world.path))
    live.listen()
    try:
        with pytest.raises(FailedPreconditionError, match="already listening"):
            asyncio.run(world.server.start())
        assert world.path.exists()
    finally:
        live.close()
    world.path.unlink()
    world.path.write_text("precious")
    with pytest.raises(FailedPreconditionError, match="not a socket"):
        asyncio.run(world.server.start())
    assert world.path.read_text() == "precious"


def test_stop_leaves_a_successors_socket(tmp_path: Path) -> None:
    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        world.path.unlink()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(world.path))
        other.close()

    world = serve(tmp_path, scenario)
    assert world.path.exists()


def test_bad_and_slow_clients_do_not_affect_others(tmp_path: Path) -> None:
    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        # A client stuck half-way through its headers, and one that sends garbage.
        _, slow_writer = await asyncio.open_unix_connection(str(world.path))
        slow_writer.write(b"GET /info HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await slow_writer.drain()
        garbage = asyncio.create_task(raw_exchange(world.path, b"\x00\x01\x02\r\n\r\n"))

        async def one(n: int) -> int:
            async with world.client() as c:
                path = "/info" if n % 2 else f"/containers/{RUNNING_ID}"
                return (await c.get(path)).status_code

        codes = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(40))), 10)
        assert codes == [200] * 40
        assert (await garbage).startswith(b"HTTP/1.1 400 ")
        slow_writer.close()

    serve(tmp_path, scenario)


# --- the runtime's pause and resume --------------------------------------------------


def test_oci_runtime_pause_and_resume_run_runc(tmp_path: Path) -> None:
    log = tmp_path / "argv"
    fake = tmp_path / "runc"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'case "$*" in *missing*) echo \'{"level":"error","msg":"container does not exist"}\''
        " >&2; exit 1;; esac\n")
    fake.chmod(0o755)
    oci = OciRuntime(runtime_path=str(fake), conmon_path="conmon", state_dir=tmp_path / "oci")

    async def main() -> None:
        await oci.pause("abc")
        await oci.resume("abc")
        with pytest.raises(NotFoundError, match="runc pause missing"):
            await oci.pause("missing")
        with pytest.raises(InvalidArgumentError):
            await oci.resume("../x")

    asyncio.run(main())
    root = tmp_path / "oci" / "runc"
    assert log.read_text().splitlines()[:2] == [
        f"--root {root} --log-format json pause abc",
        f"--root {root} --log-format json resume abc",
    ]


# --- cripy status --------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cripy")
    status_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        sock = ["status", "--socket", str(world.path)]

        async def cli(*argv: str) -> tuple[int, str, str]:
            code = await asyncio.to_thread(run_cli, [*sock, *argv])
            out, err = capsys.readouterr()
            return code, out, err

        code, out, _ = await cli("info")
        assert code == 0 and json.loads(out)["storage_driver"] == "overlay"
        code, out, _ = await cli("config")
        assert code == 0 and from_dict(tomllib.loads(out)) == world.config
        code, out, _ = await cli("containers", RUNNING_ID[:4])
        assert code == 0 and json.loads(out)["id"] == RUNNING_ID
        code, out, _ = await cli("container", "--id", RUNNING_ID)
        assert code == 0 and json.loads(out)["pid"] == 4242
        code, out, _ = await cli("pause", RUNNING_ID)
        assert code == 0 and json.loads(out)["state"] == "paused"
        code, out, _ = await cli("unpause", RUNNING_ID)
        assert code == 0 and json.loads(out)["state"] == "running"
        code, out, err = await cli("containers", "ffff")
        assert code == 1 and out == ""
        assert err == "cripy status containers: 404: container 'ffff' not found\n"
        code, _, err = await cli("pause")
        assert code == 1 and err == "cripy status pause: a container ID is needed\n"

    serve(tmp_path, scenario)
    code = run_cli(["status", "--socket", str(tmp_path / "none.sock"), "info"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"cripy status info: cannot reach the status API at {tmp_path}")
    assert err.count("\n") == 1


def test_clients_past_the_limit_get_503(tmp_path: Path) -> None:
    async def handler(request: Request) -> Response:
        return json_response({"path": request.path})

    async def main() -> None:
        clients = HTTPConnections(handler, limit=2)
        path = tmp_path / "s.sock"
        server = await asyncio.start_unix_server(clients, path=str(path))
        idle = [await asyncio.open_unix_connection(str(path)) for _ in range(2)]
        await asyncio.sleep(0.05)
        answer = await raw_exchange(path, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ")
        for _, writer in idle:
            writer.close()
        await asyncio.sleep(0.05)
        answer = await raw_exchange(path, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close"
                                          b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"path": "/x"}\n')
        server.close()
        await clients.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_client_too_slow_to_send_its_request_is_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cripy import httpserver

    monkeypatch.setattr(httpserver, "READ_TIMEOUT", 0.3)

    async def scenario(world: World, client: httpx.AsyncClient) -> None:
        reader, writer = await asyncio.open_unix_connection(str(world.path))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            while loop.time() - started < 5:  # a byte now and then never extends the deadline
                writer.write(b"G")
                await writer.drain()
                await asyncio.sleep(0.05)
                if reader.at_eof() or not await _readable_or_open(reader):
                    break
        except ConnectionError:
            pass
        assert loop.time() - started < 2
        writer.close()

    serve(tmp_path, scenario)


async def _readable_or_open(reader: asyncio.StreamReader) -> bool:
    """False once the server closed the connection."""
    try:
        data = await asyncio.wait_for(reader.read(1), 0.01)
    except TimeoutError:
        return True
    return bool(data)
