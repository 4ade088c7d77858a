"""The tests' own NRI plugin: the plugin side of the real wire protocol (NRI's multiplexer
and ttrpc, as the Go plugin stub speaks them), in Python.

In-process: `NriPlugin(...)`, then `await plugin.connect(socket_path)` (an external
plugin) or `await plugin.attach(sock)` (a pre-connected socket). It registers, answers
Configure with its event subscription and Synchronize, records every call it gets, and
answers with the responses, errors and delays the test sets.

As an executable (a pre-installed plugin cripy starts), `python -m tests.support.nri_plugin
--record FILE [...]`: it uses the socket NRI passes in NRI_PLUGIN_SOCKET (else --socket),
appends one JSON line per call to FILE, and takes its behaviour from a JSON document (the
--behaviour file, and/or the plugin config the runtime sends in ConfigureRequest.config):

    {"events": ["CreateContainer", "StopContainer"] or "all",
     "adjust": {"env": {"K": "V"}, "annotations": {"k": "v"}, "memory_limit": 67108864,
                "mounts": [{"source": "/x", "destination": "/y", "type": "bind",
                            "options": ["bind", "ro"]}],
                "hooks": [{"phase": "prestart", "path": "/bin/true", "args": ["true"]}],
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "oom_score_adj": 500, "cpu_shares": 512, "cpuset_cpus": "0"},
     "update_self": {"UpdateContainer": {"memory_limit": 134217728, "cpu_shares": 512}},
     "errors": {"CreateContainer": "refused by the test"},
     "delays": {"StopContainer": 5.0},
     "exit_on": "CreateContainer"}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from cripy.nri import api_pb2, events, mux
from cripy.nri.connection import (
    PLUGIN_IDX_ENV,
    PLUGIN_NAME_ENV,
    PLUGIN_SERVICE,
    PLUGIN_SOCKET_ENV,
    RUNTIME_SERVICE,
    MuxPeer,
    NriCallError,
)
from cripy.nri.ttrpc import Code

#: Plugin-service methods and their request and response types.
METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "Configure": (api_pb2.ConfigureRequest, api_pb2.ConfigureResponse),
    "Synchronize": (api_pb2.SynchronizeRequest, api_pb2.SynchronizeResponse),
    "Shutdown": (api_pb2.Empty, api_pb2.Empty),
    "StateChange": (api_pb2.StateChangeEvent, api_pb2.Empty),
    **{
        name: (getattr(api_pb2, name + "Request"), getattr(api_pb2, name + "Response"))
        for name in events.METHOD_EVENT
    },
}

CallHandler = Callable[[Message], Awaitable[Message] | Message]


def call_name(method: str, request: Message) -> str:
    """The event name of a call: StateChange calls are named by the event they carry."""
    if method == "StateChange" and isinstance(request, api_pb2.StateChangeEvent):
        return events.EVENT_METHOD.get(request.event, f"StateChange({request.event})")
    return method


class NriPlugin:
    """An NRI plugin for tests. Set the knobs before or while it is connected."""

    def __init__(
        self,
        name: str = "test",
        idx: str = "50",
        *,
        events_mask: int = events.ALL_EVENTS,
        request_timeout_ms: int = 0,
        legacy: bool = False,
    ) -> None:
        self.name = name
        self.idx = idx
        self.events_mask = events_mask
        self.request_timeout_ms = request_timeout_ms
        # legacy: behave like a stub from before v0.12's per-event RPCs (UNIMPLEMENTED).
        self.legacy = legacy
        self.responses: dict[str, Message] = {}
        self.handlers: dict[str, CallHandler] = {}
        self.errors: dict[str, str] = {}
        self.delays: dict[str, float] = {}
        self.calls: list[tuple[str, Message]] = []
        self.configure_request: api_pb2.ConfigureRequest | None = None
        self.configured = asyncio.Event()
        self.synchronized = asyncio.Event()
        self.registered = False
        self.on_call: Callable[[str, Message], Awaitable[None]] | None = None
        self._changed = asyncio.Condition()
        self._peer: MuxPeer | None = None

    # --- connection ------------------------------------------------------------------

    async def connect(self, path: str, timeout: float = 10) -> None:
        """Dial the runtime's NRI socket and register, as an external plugin does."""
        reader, writer = await asyncio.open_unix_connection(path)
        await self._setup(reader, writer, timeout)

    async def attach(self, sock: socket.socket, timeout: float = 10) -> None:
        """Use a pre-connected socket (a pre-installed plugin's) and register."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        await self._setup(reader, writer, timeout)

    async def _setup(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        peer = MuxPeer(
            reader,
            writer,
            serve_conn=mux.PLUGIN_SERVICE_CONN,
            call_conn=mux.RUNTIME_SERVICE_CONN,
            label=f"plugin {self.idx}-{self.name}",
        )
        for method, (request_type, _) in METHODS.items():
            peer.register(PLUGIN_SERVICE, method, request_type, self._handler(method))
        self._peer = peer
        peer.start()
        await peer.call(
            RUNTIME_SERVICE,
            "RegisterPlugin",
            api_pb2.RegisterPluginRequest(plugin_name=self.name, plugin_idx=self.idx),
            api_pb2.Empty,
            timeout,
        )
        self.registered = True

    @property
    def peer(self) -> MuxPeer:
        if self._peer is None:
            raise RuntimeError("plugin not connected")
        return self._peer

    async def update_containers(
        self, req: api_pb2.UpdateContainersRequest, timeout: float = 10
    ) -> api_pb2.UpdateContainersResponse:
        """An unsolicited UpdateContainers call to the runtime."""
        return await self.peer.call(
            RUNTIME_SERVICE, "UpdateContainers", req, api_pb2.UpdateContainersResponse, timeout
        )

    async def close(self) -> None:
        if self._peer is not None:
            await self._peer.close("plugin closed")

    async def wait_closed(self) -> None:
        await self.peer.wait_closed()

    # --- observation -----------------------------------------------------------------

    def event_names(self) -> list[str]:
        return [call_name(m, r) for m, r in self.calls]

    def requests(self, name: str) -> list[Message]:
        """The requests of every call of that event name (see `call_name`)."""
        return [r for m, r in self.calls if call_name(m, r) == name]

    async def wait_for(self, name: str, count: int = 1, timeout: float = 10) -> list[Message]:
        """Wait until `count` calls named `name` (see `call_name`) have arrived."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.requests(name)) >= count)
        return self.requests(name)

    # --- serving ---------------------------------------------------------------------

    def _handler(self, method: str) -> Callable[[Message], Awaitable[Message]]:
        async def handle(request: Message) -> Message:
            return await self._handle(method, request)

        return handle

    async def _handle(self, method: str, request: Message) -> Message:
        if self.legacy and events.METHOD_EVENT.get(method) in events.NOTIFICATION_EVENTS:
            raise NriCallError(Code.UNIMPLEMENTED, f"method {method} not found")
        name = call_name(method, request)
        if isinstance(request, api_pb2.ConfigureRequest):
            self.configure_request = request
        async with self._changed:
            self.calls.append((method, request))
            self._changed.notify_all()
        if self.on_call is not None:
            await self.on_call(name, request)
        delay = self.delays.get(name)
        if delay:
            await asyncio.sleep(delay)
        if name in self.errors:
            raise NriCallError(Code.UNKNOWN, self.errors[name])
        handler = self.handlers.get(name)
        if handler is not None:
            result = handler(request)
            response = await result if isinstance(result, Awaitable) else result
        else:
            response = self._default_response(method, request)
        if method == "Configure":
            self.configured.set()
        elif method == "Synchronize":
            self.synchronized.set()
        return response

    def _default_response(self, method: str, request: Message) -> Message:
        if method == "Configure":
            return api_pb2.ConfigureResponse(
                events=self.events_mask, request_timeout=self.request_timeout_ms
            )
        stored = self.responses.get(method)
        if method == "Synchronize" and isinstance(request, api_pb2.SynchronizeRequest):
            # A plugin that takes the state in several parts echoes `more`, and answers
            # with updates only at the last part.
            rsp = api_pb2.SynchronizeResponse(more=request.more)
            if isinstance(stored, api_pb2.SynchronizeResponse) and not request.more:
                rsp.update.extend(stored.update)
            return rsp
        if stored is not None:
            return stored
        return METHODS[method][1]()


# --- behaviour documents (the executable's configuration) ----------------------------


def resources_from_json(doc: dict[str, Any], res: api_pb2.LinuxResources) -> None:
    """Fill linux resources from the behaviour keys memory_limit, cpu_shares, cpu_quota,
    cpu_period, cpuset_cpus, cpuset_mems."""
    if "memory_limit" in doc:
        res.memory.limit.value = int(doc["memory_limit"])
    if "cpu_shares" in doc:
        res.cpu.shares.value = int(doc["cpu_shares"])
    if "cpu_quota" in doc:
        res.cpu.quota.value = int(doc["cpu_quota"])
    if "cpu_period" in doc:
        res.cpu.period.value = int(doc["cpu_period"])
    if "cpuset_cpus" in doc:
        res.cpu.cpus = str(doc["cpuset_cpus"])
    if "cpuset_mems" in doc:
        res.cpu.mems = str(doc["cpuset_mems"])


def adjustment_from_json(doc: dict[str, Any]) -> api_pb2.ContainerAdjustment:
    adjust = api_pb2.ContainerAdjustment()
    for key, value in doc.get("env", {}).items():
        adjust.env.add(key=key, value=str(value))
    for key, value in doc.get("annotations", {}).items():
        adjust.annotations[key] = str(value)
    for m in doc.get("mounts", []):
        adjust.mounts.add(
            source=m["source"],
            destination=m["destination"],
            type=m.get("type", "bind"),
            options=m.get("options", ["bind"]),
        )
    for h in doc.get("hooks", []):
        # {"phase": "prestart"|"create_runtime"|...|"poststop", "path": ..., "args": [...]}
        getattr(adjust.hooks, h["phase"]).add(
            path=h["path"], args=h.get("args", []), env=h.get("env", [])
        )
    for r in doc.get("rlimits", []):
        adjust.rlimits.add(type=r["type"], hard=int(r["hard"]), soft=int(r["soft"]))
    if "oom_score_adj" in doc:
        adjust.linux.oom_score_adj.value = int(doc["oom_score_adj"])
    resources = api_pb2.LinuxResources()
    resources_from_json(doc, resources)
    if resources.ByteSize():
        adjust.linux.resources.CopyFrom(resources)
    return adjust


def _self_update(doc: dict[str, Any], request: Message) -> api_pb2.ContainerUpdate:
    """An update of the event's own container with the resources of `doc`."""
    container = getattr(request, "container", None)
    update = api_pb2.ContainerUpdate(
        container_id=container.id if isinstance(container, api_pb2.Container) else "",
        ignore_failure=bool(doc.get("ignore_failure", False)),
    )
    resources_from_json(doc, update.linux.resources)
    return update


def apply_behaviour(plugin: NriPlugin, doc: dict[str, Any]) -> None:
    """Set a plugin's knobs from a behaviour document (see the module docstring)."""
    if "events" in doc:
        wanted = doc["events"]
        plugin.events_mask = events.parse_events(
            wanted if isinstance(wanted, str) else ",".join(wanted)
        )
    if "adjust" in doc:
        plugin.responses["CreateContainer"] = api_pb2.CreateContainerResponse(
            adjust=adjustment_from_json(doc["adjust"])
        )
    for method, update_doc in doc.get("update_self", {}).items():
        plugin.handlers[method] = _updating_handler(method, update_doc, plugin)
    plugin.errors.update(doc.get("errors", {}))
    plugin.delays.update({k: float(v) for k, v in doc.get("delays", {}).items()})


def _updating_handler(method: str, doc: dict[str, Any], plugin: NriPlugin) -> CallHandler:
    """A handler for UpdateContainer / StopContainer / CreateContainer that answers with
    an update of the event's own container."""

    def handle(request: Message) -> Message:
        update = _self_update(doc, request)
        if method == "CreateContainer":
            rsp = api_pb2.CreateContainerResponse(update=[update])
            stored = plugin.responses.get("CreateContainer")
            if isinstance(stored, api_pb2.CreateContainerResponse):
                rsp.adjust.CopyFrom(stored.adjust)
            return rsp
        if method == "StopContainer":
            return api_pb2.StopContainerResponse(update=[update])
        if method == "UpdateContainer":
            return api_pb2.UpdateContainerResponse(update=[update])
        raise ValueError(f"update_self: {method} answers with no container updates")

    return handle


def call_record(name: str, request: Message) -> dict[str, Any]:
    """The JSON line the executable records for one call."""
    record: dict[str, Any] = {"event": name, "pid": os.getpid()}
    pod = getattr(request, "pod", None)
    if isinstance(pod, api_pb2.PodSandbox) and request.HasField("pod"):
        record["pod"] = {"id": pod.id, "name": pod.name, "namespace": pod.namespace}
    container = getattr(request, "container", None)
    if isinstance(container, api_pb2.Container) and request.HasField("container"):
        record["container"] = {
            "id": container.id,
            "name": container.name,
            "state": api_pb2.ContainerState.Name(container.state),
            "exit_code": container.exit_code,
        }
    if isinstance(request, api_pb2.ConfigureRequest):
        record["config"] = request.config
        record["runtime_name"] = request.runtime_name
        record["runtime_version"] = request.runtime_version
    if isinstance(request, api_pb2.SynchronizeRequest):
        record["pods"] = [p.id for p in request.pods]
        record["containers"] = [c.id for c in request.containers]
    return record


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


async def _run(args: argparse.Namespace) -> int:
    name = os.environ.get(PLUGIN_NAME_ENV) or args.name
    idx = os.environ.get(PLUGIN_IDX_ENV) or args.idx
    plugin = NriPlugin(name, idx)
    if args.events:
        plugin.events_mask = events.parse_events(args.events)
    exit_on: set[str] = set()

    def configure(doc: dict[str, Any]) -> None:
        apply_behaviour(plugin, doc)
        if "exit_on" in doc:
            exit_on.add(doc["exit_on"])

    if args.behaviour:
        configure(json.loads(Path(args.behaviour).read_text()))
    record_path = Path(args.record) if args.record else None

    async def on_call(name: str, request: Message) -> None:
        if isinstance(request, api_pb2.ConfigureRequest) and request.config.strip():
            configure(json.loads(request.config))
        if record_path is not None:
            await asyncio.to_thread(_append_line, record_path, call_record(name, request))
        if name in exit_on:
            os._exit(1)  # a crash, on purpose: no goodbye on the socket

    plugin.on_call = on_call
    fd = os.environ.get(PLUGIN_SOCKET_ENV)
    if fd:
        sock = socket.socket(fileno=int(fd))
        sock.setblocking(False)
        await plugin.attach(sock)
    elif args.socket:
        await plugin.connect(args.socket)
    else:
        print("nri_plugin: no NRI_PLUGIN_SOCKET and no --socket", file=sys.stderr)
        return 2
    await plugin.wait_closed()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nri_plugin", description="cripy's test NRI plugin")
    parser.add_argument("--socket", help="NRI socket to dial when NRI_PLUGIN_SOCKET is unset")
    parser.add_argument("--name", default="test")
    parser.add_argument("--idx", default="50")
    parser.add_argument("--events", help="comma-separated event names, or all")
    parser.add_argument("--behaviour", help="JSON behaviour document")
    parser.add_argument("--record", help="append one JSON line per call to this file")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
