"""Network stats read inside a real pinned network namespace. Needs root."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from cripy.network.namespaces import pin_namespaces, unpin_namespaces
from cripy.runtime.stats import read_net_dev, read_net_devs


def test_read_net_dev_inside_a_pinned_netns(tmp_path: Path) -> None:
    ns_dir = tmp_path / "ns"
    own = os.readlink("/proc/thread-self/ns/net")
    try:
        pinned = asyncio.run(pin_namespaces(ns_dir, ["net"], None))
        stats = read_net_dev(str(pinned["net"]))
        assert set(stats) == {"lo"}  # a fresh namespace has only loopback
        assert stats["lo"].name == "lo"
        host = read_net_dev("/proc/self/ns/net")
        assert "lo" in host and len(host) >= 1
        # Our own thread never left the daemon's namespace.
        assert os.readlink("/proc/thread-self/ns/net") == own
    finally:
        asyncio.run(unpin_namespaces(ns_dir))


def test_read_net_devs_one_thread_through_several_netns(tmp_path: Path) -> None:
    own = os.readlink("/proc/thread-self/ns/net")
    dirs = [tmp_path / "a", tmp_path / "b"]
    try:
        pinned = [asyncio.run(pin_namespaces(d, ["net"], None))["net"] for d in dirs]
        found = read_net_devs([str(pinned[0]), str(tmp_path / "missing"), str(pinned[1]),
                               "/proc/self/ns/net"])
        assert isinstance(found[0], dict) and set(found[0]) == {"lo"}
        assert isinstance(found[1], FileNotFoundError)
        assert isinstance(found[2], dict) and set(found[2]) == {"lo"}
        assert isinstance(found[3], dict) and "lo" in found[3]
        assert os.readlink("/proc/thread-self/ns/net") == own
    finally:
        for d in dirs:
            asyncio.run(unpin_namespaces(d))
