"""The NRI plugin registry: pre-installed plugins started by cripy, external ones from the
socket, their registration, configuration and calls.

Pre-installed plugins are the executables named `NN-name` in plugin_path (NN: two digits,
the index). Each is started with one end of a socketpair as fd 3 and NRI's environment
(NRI_PLUGIN_NAME, NRI_PLUGIN_IDX, NRI_PLUGIN_SOCKET=3), gets its config from
plugin_config_path (`name.conf`, else `NN-name.conf`), and is started again, with a
growing pause, whenever it exits or is disconnected. External plugins dial socket_path.

A plugin must register within registration_timeout; it is then configured and, through
the `on_ready` callback (the adaptation in hooks.py), synchronized and made active. Calls
to a plugin are bounded by its request timeout: one that times out or loses its
connection is disconnected, and the call goes on without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from cripy.config import NriConfig
from cripy.errors import CripyError, FailedPreconditionError
from cripy.nri import api_pb2 as nri
from cripy.nri import events as nri_events
from cripy.nri.connection import (
    PLUGIN_SOCKET_FD,
    NriCallError,
    NriDisconnected,
    NriError,
    NriTimeout,
    PluginConnection,
    plugin_environment,
    plugin_socketpair,
    start_listener,
)
from cripy.nri.errors import PluginError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

NRI_VERSION = "v0.12.0"  # the NRI API these messages follow
PLUGIN_NAME = re.compile(r"(\d\d)-([^/\x00]+)")
INDEX = re.compile(r"\d\d")
RESTART_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
#: A plugin that ran this long before exiting starts again after the shortest pause.
STABLE_SECONDS = 60.0
SHUTDOWN_SECONDS = 2.0
UNKNOWN = 2  # gRPC status code numbers, as ttrpc carries them
INVALID_ARGUMENT = 3
ALREADY_EXISTS = 6


_TRAMPOLINE = """
import os, sys
fd, target = int(sys.argv[1]), int(sys.argv[2])
if fd != target:
    os.dup2(fd, target)
    os.close(fd)
os.execv(sys.argv[3], sys.argv[3:])
"""


@dataclass(eq=False)
class Plugin:
    """A registered plugin."""

    name: str
    index: str
    conn: PluginConnection
    events: int = 0
    timeout: float = 2.0
    config: str = ""
    launched: bool = False

    @property
    def full_name(self) -> str:
        return f"{self.index}-{self.name}"

    @property
    def order(self) -> tuple[str, str]:
        return (self.index, self.name)

    def subscribed(self, event: int) -> bool:
        return nri_events.is_subscribed(self.events, event)


@dataclass
class _Pending:
    """A connection waiting for its RegisterPlugin."""

    registered: asyncio.Future[nri.RegisterPluginRequest]
    name: str = ""  # for launched plugins: what cripy started it as
    index: str = ""
    config: str = ""


@dataclass
class _Launched:
    """A pre-installed plugin's process, across restarts."""

    name: str
    index: str
    path: Path
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    task: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # first start done


class PluginRegistry:
    """Plugins by name; the active ones (registered, configured, synchronized) in index
    order."""

    def __init__(self, config: NriConfig, runtime_version: str,
                 on_ready: Callable[[Plugin], Awaitable[None]],
                 update_containers: Callable[[Plugin, nri.UpdateContainersRequest],
                                             Awaitable[nri.UpdateContainersResponse]]
                 ) -> None:
        self.config = config
        self.runtime_version = runtime_version
        self._on_ready = on_ready
        self._update_containers = update_containers
        self._pending: dict[PluginConnection, _Pending] = {}
        self._plugins: dict[PluginConnection, Plugin] = {}
        self._active: list[Plugin] = []
        self._launched: dict[str, _Launched] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._stopping = False

    # --- the view the adaptation uses ---------------------------------------------------

    def active(self) -> list[Plugin]:
        """Active plugins in index order."""
        return list(self._active)

    def subscribed(self, event: int) -> list[Plugin]:
        return [p for p in self._active if p.subscribed(event) and not p.conn.closed]

    def activate(self, plugin: Plugin) -> None:
        """Make a synchronized plugin receive events (the adaptation calls this with its
        lock held, so no event falls between the synchronization and this)."""
        if plugin.conn.closed:
            return
        self._active.append(plugin)
        self._active.sort(key=lambda p: p.order)
        log.info("NRI plugin %s is active (events 0x%x)", plugin.full_name, plugin.events)

    def describe(self) -> list[dict[str, object]]:
        return [{"name": p.name, "index": p.index, "events": p.events,
                 "preinstalled": p.launched} for p in self._active]

    # --- calls --------------------------------------------------------------------------

    async def call(self, plugin: Plugin, method: str, request: Message,
                   response_type: type[M]) -> M | None:
        """Call one plugin. None: it timed out or is gone (and is now disconnected).
        PluginError: it answered with an error."""
        try:
            return await plugin.conn.call_plugin(method, request, response_type, plugin.timeout)
        except NriCallError as exc:
            raise PluginError(f"NRI plugin {plugin.full_name} failed {method}: "
                              f"{exc.message}") from None
        except NriTimeout:
            await self.disconnect(plugin, f"no answer to {method} within "
                                          f"{plugin.timeout:g}s")
        except NriDisconnected:
            await self.disconnect(plugin, f"connection lost during {method}")
        return None

    async def event(self, plugin: Plugin, event: int, pod: nri.PodSandbox,
                    container: nri.Container | None) -> None:
        """A pure notification; errors are the plugin's answer (PluginError)."""
        name = nri_events.EVENT_METHOD.get(event, str(event))
        try:
            await plugin.conn.event(event, pod, container, plugin.timeout)
        except NriCallError as exc:
            raise PluginError(f"NRI plugin {plugin.full_name} failed {name}: "
                              f"{exc.message}") from None
        except NriTimeout:
            await self.disconnect(plugin, f"no answer to {name} within {plugin.timeout:g}s")
        except NriDisconnected:
            await self.disconnect(plugin, f"connection lost during {name}")

    async def disconnect(self, plugin: Plugin, reason: str) -> None:
        log.warning("NRI plugin %s disconnected: %s", plugin.full_name, reason)
        await plugin.conn.close(reason)

    # --- start and stop -----------------------------------------------------------------

    async def start(self) -> None:
        if self.config.allow_external_plugins:
            try:
                self._server = await start_listener(self.config.socket_path, self,
                                                    self._on_external)
            except OSError as exc:
                raise FailedPreconditionError(
                    f"cannot serve the NRI socket {self.config.socket_path}: "
                    f"{exc.strerror or exc}") from None
            log.info("NRI: external plugins may connect to %s", self.config.socket_path)
        for name, index, path in await asyncio.to_thread(self._scan_plugin_dir):
            launched = _Launched(name=name, index=index, path=path)
            self._launched[f"{index}-{name}"] = launched
            launched.task = self._spawn(self._keep_running(launched))
        # As NRI does: the pre-installed plugins are in place before the first CRI call
        # (each one bounded by the registration and request timeouts).
        waits = [asyncio.ensure_future(p.ready.wait()) for p in self._launched.values()]
        if waits:
            limit = self.config.registration_timeout + 3 * self.config.request_timeout
            _, late = await asyncio.wait(waits, timeout=limit)
            for wait in late:
                wait.cancel()

    async def stop(self) -> None:
        """Tell every plugin the runtime goes down, then end them."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, self.config.socket_path)
        plugins = list(self._plugins.values())
        await asyncio.gather(*(self._shutdown(p) for p in plugins), return_exceptions=True)
        for conn in [*self._pending, *self._plugins]:
            await conn.close("runtime shutting down")
        for launched in self._launched.values():
            if launched.task is not None:
                launched.task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for launched in self._launched.values():
            await _end_process(launched.process)

    async def _shutdown(self, plugin: Plugin) -> None:
        with contextlib.suppress(NriError):
            await plugin.conn.shutdown(min(plugin.timeout, SHUTDOWN_SECONDS))

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- pre-installed plugins ----------------------------------------------------------

    def _scan_plugin_dir(self) -> list[tuple[str, str, Path]]:
        directory = Path(self.config.plugin_path)
        try:
            entries = sorted(directory.iterdir(), key=lambda p: p.name)
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("NRI: cannot read plugin directory %s: %s", directory, exc.strerror)
            return []
        found = []
        for entry in entries:
            match = PLUGIN_NAME.fullmatch(entry.name)
            if match is None:
                log.warning("NRI: ignoring %s: plugins are named NN-name", entry)
                continue
            if not entry.is_file() or not os.access(entry, os.X_OK):
                log.warning("NRI: ignoring %s: not an executable file", entry)
                continue
            found.append((match.group(2), match.group(1), entry))
        return found

    def _plugin_config(self, name: str, index: str) -> str:
        directory = Path(self.config.plugin_config_path)
        for candidate in (directory / f"{name}.conf", directory / f"{index}-{name}.conf"):
            try:
                return candidate.read_text()
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as exc:
                log.error("NRI: cannot read plugin config %s: %s", candidate, exc)
        return ""

    async def _keep_running(self, launched: _Launched) -> None:
        """Start the plugin; start it again (after a growing pause) whenever it ends."""
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._run_launched(launched)
            except (OSError, NriError, CripyError) as exc:
                log.error("NRI plugin %s-%s could not run: %s", launched.index,
                          launched.name, exc)
            if self._stopping:
                return
            if time.monotonic() - started >= STABLE_SECONDS:
                launched.restarts = 0
            delay = RESTART_DELAYS[min(launched.restarts, len(RESTART_DELAYS) - 1)]
            launched.restarts += 1
            log.warning("NRI plugin %s-%s ended: starting it again in %gs",
                        launched.index, launched.name, delay)
            await asyncio.sleep(delay)

    async def _run_launched(self, launched: _Launched) -> None:
        config = await asyncio.to_thread(self._plugin_config, launched.name, launched.index)
        ours, theirs = plugin_socketpair()
        try:
            fd = theirs.fileno()
            # The plugin gets the socket as the fd NRI's stub expects (3): a small
            # trampoline moves it there and execs the plugin (same process).
            launched.process = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-c", _TRAMPOLINE, str(fd), str(PLUGIN_SOCKET_FD),
                str(launched.path),
                pass_fds=(fd,), stdin=asyncio.subprocess.DEVNULL,
                env=plugin_environment(launched.name, launched.index))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        process = launched.process
        log.info("NRI plugin %s-%s started (pid %d)", launched.index, launched.name,
                 process.pid)
        conn = await PluginConnection.from_socket(
            ours, self, label=f"pre-installed:{launched.index}-{launched.name}")
        exited = asyncio.ensure_future(process.wait())
        try:
            serve = asyncio.ensure_future(self._serve(
                conn, name=launched.name, index=launched.index, config=config,
                ready=launched.ready))
            await asyncio.wait({exited, serve}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                await conn.close(f"plugin process exited with {process.returncode}")
            await serve
        finally:
            launched.ready.set()
            await conn.close("plugin ended")
            await _end_process(process)
            exited.cancel()

    # --- connections --------------------------------------------------------------------

    async def _on_external(self, conn: PluginConnection) -> None:
        await self._serve(conn)

    async def _serve(self, conn: PluginConnection, *, name: str = "", index: str = "",
                     config: str = "", ready: asyncio.Event | None = None) -> None:
        """A connection's life: registration, configuration, synchronization, then
        active until it closes."""
        pending = self._pending_for(conn)
        pending.name, pending.index, pending.config = name, index, config
        if name:  # a connection from the listener is already reading
            conn.start()
        try:
            closed = asyncio.ensure_future(conn.wait_closed())
            either: set[asyncio.Future[Any]] = {pending.registered, closed}
            try:
                await asyncio.wait(either,
                                   timeout=self.config.registration_timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
            if not pending.registered.done():
                if not conn.closed:
                    log.warning("NRI plugin %s did not register within %gs: disconnected",
                                conn.label, self.config.registration_timeout)
                    await conn.close("no registration in time")
                return
            request = pending.registered.result()
            plugin = Plugin(name=name or request.plugin_name,
                            index=index or request.plugin_idx, conn=conn,
                            timeout=self.config.request_timeout, launched=bool(name))
            plugin.config = config
            self._plugins[conn] = plugin
            if not await self._configure(plugin):
                return
            try:
                await self._on_ready(plugin)
            except CripyError as exc:
                await self.disconnect(plugin, f"synchronization failed: {exc}")
                return
            if ready is not None:
                ready.set()
            await conn.wait_closed()
        finally:
            self._pending.pop(conn, None)
            gone = self._plugins.pop(conn, None)
            if gone is not None:
                self._active = [p for p in self._active if p.conn is not conn]
                if not self._stopping:
                    log.info("NRI plugin %s is gone: %s", gone.full_name,
                             conn.close_reason or "closed")

    async def _configure(self, plugin: Plugin) -> bool:
        request = nri.ConfigureRequest(
            config=plugin.config, runtime_name="cripy", runtime_version=self.runtime_version,
            registration_timeout=int(self.config.registration_timeout * 1000),
            request_timeout=int(self.config.request_timeout * 1000), NRI_version=NRI_VERSION)
        try:
            reply = await self.call(plugin, "Configure", request, nri.ConfigureResponse)
        except PluginError as exc:
            await self.disconnect(plugin, str(exc))
            return False
        if reply is None:
            return False
        try:
            plugin.events = nri_events.check_mask(reply.events)
        except ValueError as exc:
            await self.disconnect(plugin, f"bad event subscription: {exc}")
            return False
        if reply.request_timeout > 0:
            plugin.timeout = reply.request_timeout / 1000
        return True

    # --- the Runtime service (the plugin calls us) -------------------------------------

    def _pending_for(self, conn: PluginConnection) -> _Pending:
        """The registration state of a connection (an external plugin may register
        before its connection is handed over)."""
        pending = self._pending.get(conn)
        if pending is None:
            pending = self._pending[conn] = _Pending(
                asyncio.get_running_loop().create_future())
        return pending

    async def register_plugin(self, conn: PluginConnection,
                              req: nri.RegisterPluginRequest) -> None:
        if conn in self._plugins:
            raise NriCallError(ALREADY_EXISTS, "plugin already registered")
        pending = self._pending_for(conn)
        if pending.registered.done():
            raise NriCallError(ALREADY_EXISTS, "plugin already registered")
        name = pending.name or req.plugin_name
        index = pending.index or req.plugin_idx
        if not name or "/" in name:
            raise NriCallError(INVALID_ARGUMENT, f"invalid plugin name {name!r}")
        if not INDEX.fullmatch(index):
            raise NriCallError(INVALID_ARGUMENT,
                               f"invalid plugin index {index!r}: must be two digits")
        taken = [p for p in self._plugins.values() if (p.index, p.name) == (index, name)]
        if taken:
            raise NriCallError(ALREADY_EXISTS, f"plugin {index}-{name} is already connected")
        log.info("NRI plugin %s-%s registered (%s, NRI %s)", index, name, conn.label,
                 req.NRI_version or "unknown")
        pending.registered.set_result(req)

    async def update_containers(self, conn: PluginConnection,
                                req: nri.UpdateContainersRequest
                                ) -> nri.UpdateContainersResponse:
        plugin = self._plugins.get(conn)
        if plugin is None or plugin not in self._active:
            raise NriCallError(UNKNOWN, "plugin is not synchronized yet")
        return await self._update_containers(plugin, req)


async def _end_process(process: asyncio.subprocess.Process | None) -> None:
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), SHUTDOWN_SECONDS)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
