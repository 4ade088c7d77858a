"""The NRI plugin registry: registration rules and timeouts, configuration, index order,
the pre-installed plugins' directory and config lookup (the tests' plugin, real sockets)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cripy.config import NriConfig
from cripy.nri import api_pb2 as nri
from cripy.nri import events
from cripy.nri.connection import NriCallError
from cripy.nri.plugins import Plugin, PluginRegistry
from tests.support.nri_plugin import NriPlugin

T = 5.0


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    async def guarded() -> None:
        await asyncio.wait_for(coro_fn(), 30)

    asyncio.run(guarded())


class Harness:
    def __init__(self, tmp: Path, **settings: object) -> None:
        self.config = NriConfig(socket_path=str(tmp / "nri.sock"),
                                plugin_path=str(tmp / "plugins"),
                                plugin_config_path=str(tmp / "conf"),
                                registration_timeout=0.5, request_timeout=1.0)
        for key, value in settings.items():
            setattr(self.config, key, value)
        self.ready: list[Plugin] = []
        self.registry = PluginRegistry(self.config, "9.9", self._ready, self._updates)

    async def _ready(self, plugin: Plugin) -> None:
        self.ready.append(plugin)
        self.registry.activate(plugin)

    async def _updates(self, plugin: Plugin, request: nri.UpdateContainersRequest
                       ) -> nri.UpdateContainersResponse:
        return nri.UpdateContainersResponse(failed=list(request.update))

    async def wait_active(self, count: int) -> None:
        while len(self.registry.active()) < count:
            await asyncio.sleep(0.01)


def test_plugins_are_configured_and_kept_in_index_order(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        await h.registry.start()
        late = NriPlugin("zeta", "90", events_mask=events.event_mask(nri.CREATE_CONTAINER))
        early = NriPlugin("alpha", "05", request_timeout_ms=250)
        try:
            await late.connect(h.config.socket_path)
            await early.connect(h.config.socket_path)
            await h.wait_active(2)
            assert [p.full_name for p in h.registry.active()] == ["05-alpha", "90-zeta"]
            assert [p.full_name for p in h.registry.subscribed(nri.CREATE_CONTAINER)] == \
                ["05-alpha", "90-zeta"]
            assert [p.full_name for p in h.registry.subscribed(nri.STOP_CONTAINER)] == \
                ["05-alpha"]
            assert h.registry.active()[0].timeout == 0.25  # the plugin's own ask
            request = early.configure_request
            assert request is not None
            assert (request.runtime_name, request.runtime_version) == ("cripy", "9.9")
            assert (request.registration_timeout, request.request_timeout) == (500, 1000)
            rsp = await early.update_containers(nri.UpdateContainersRequest(
                update=[nri.ContainerUpdate(container_id="x")]))
            assert [u.container_id for u in rsp.failed] == ["x"]
        finally:
            await late.close()
            await early.close()
            await h.registry.stop()
        assert not os.path.exists(h.config.socket_path)

    run(main)


@pytest.mark.parametrize(("name", "idx", "message"), [
    ("ok", "5", "must be two digits"),
    ("ok", "abc", "must be two digits"),
    ("", "10", "invalid plugin name"),
])
def test_a_bad_registration_is_refused(tmp_path: Path, name: str, idx: str,
                                       message: str) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        await h.registry.start()
        plugin = NriPlugin(name, idx)
        try:
            with pytest.raises(NriCallError, match=message):
                await plugin.connect(h.config.socket_path)
        finally:
            await plugin.close()
            await h.registry.stop()

    run(main)


def test_the_same_plugin_twice_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        await h.registry.start()
        first, second = NriPlugin("twin", "10"), NriPlugin("twin", "10")
        try:
            await first.connect(h.config.socket_path)
            with pytest.raises(NriCallError, match="already connected"):
                await second.connect(h.config.socket_path)
        finally:
            await first.close()
            await second.close()
            await h.registry.stop()

    run(main)


def test_a_connection_that_never_registers_is_closed(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        await h.registry.start()
        try:
            reader, writer = await asyncio.open_unix_connection(h.config.socket_path)
            assert await asyncio.wait_for(reader.read(), T) == b""  # closed on us
            writer.close()
            assert h.registry.active() == []
        finally:
            await h.registry.stop()

    run(main)


def test_a_plugin_that_does_not_answer_configure_is_disconnected(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, request_timeout=0.2)
        await h.registry.start()
        plugin = NriPlugin("mute", "10")
        plugin.delays["Configure"] = 2.0
        try:
            await plugin.connect(h.config.socket_path)
            await asyncio.wait_for(plugin.wait_closed(), T)
            assert h.ready == []
        finally:
            await plugin.close()
            await h.registry.stop()

    run(main)


def test_external_plugins_can_be_refused(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, allow_external_plugins=False)
        await h.registry.start()
        try:
            assert not os.path.exists(h.config.socket_path)
        finally:
            await h.registry.stop()

    run(main)


def test_the_plugin_directory_and_config_lookup(tmp_path: Path) -> None:
    plugins, conf = tmp_path / "plugins", tmp_path / "conf"
    plugins.mkdir()
    conf.mkdir()
    for name, mode in (("10-good", 0o755), ("20-not-executable", 0o644), ("bad", 0o755),
                       ("3-short", 0o755)):
        (plugins / name).write_text("#!/bin/sh\n")
        (plugins / name).chmod(mode)
    (conf / "good.conf").write_text("by name")
    (conf / "10-good.conf").write_text("by index and name")
    (conf / "30-other.conf").write_text("by index and name only")
    h = Harness(tmp_path)
    found = h.registry._scan_plugin_dir()
    assert [(name, index) for name, index, _ in found] == [("good", "10")]
    assert h.registry._plugin_config("good", "10") == "by name"
    assert h.registry._plugin_config("other", "30") == "by index and name only"
    assert h.registry._plugin_config("none", "40") == ""
