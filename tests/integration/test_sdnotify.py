"""The daemon under a Type=notify service manager: READY=1 once the CRI socket serves,
RELOADING=1/READY=1 around a SIGHUP, STOPPING=1 at shutdown, and NOTIFY_SOCKET kept
from conmon and runc (runc would otherwise hand the socket to the container)."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.pods import Node, Pods, bridge_network, leftovers, remove_cgroup
from tests.support.registry import Registry


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """What systemd listens on; the daemon started next inherits NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    with sock:
        yield sock


def states(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_readiness_reload_and_stop_are_notified(
        notify_socket: socket.socket, tmp_path: Path, registry: Registry, images: Any) -> None:
    daemon = Daemon(tmp_path / "daemon", insecure_registries=[registry.host])
    with bridge_network(daemon.cni_dir, tmp_path, 41) as bridge, daemon:
        ready = states(notify_socket)
        assert ready[0] == "READY=1"
        assert ready[1] == f"STATUS=serving on unix://{daemon.socket}"

        daemon.pull(images.busybox.ref)
        pods = Pods(Node(daemon, bridge, images.busybox.ref, tmp_path), tmp_path / "logs")
        try:
            cid = pods.create(pods.run("notify"), "env", ["sleep", "300"])
            pid = json.loads(pods.status(cid, verbose=True).info["info"])["pid"]
            conmon = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert "conmon" in Path(f"/proc/{conmon}/cmdline").read_text()
            environ = Path(f"/proc/{conmon}/environ").read_bytes().split(b"\0")
            assert not any(e.startswith(b"NOTIFY_SOCKET=") for e in environ)
            assert pods.exec(cid, "true").exit_code == 0

            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGHUP)
            assert states(notify_socket) == ["RELOADING=1"]
            assert states(notify_socket) == ["READY=1"]
        finally:
            pods.cleanup()
            leaks = leftovers(daemon, bridge, pods.cgroup_parent)
            remove_cgroup(pods.cgroup_parent)
        assert leaks == []
        assert daemon.stop() == 0
        assert states(notify_socket) == ["STOPPING=1"]
