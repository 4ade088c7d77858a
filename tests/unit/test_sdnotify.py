"""Tests for cripy.sdnotify against real datagram sockets, as systemd listens on them."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cripy.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(5)
    with sock:
        yield sock, str(path)


def test_states_arrive_in_one_datagram(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path)
    assert notifier.enabled
    assert notifier.notify("READY=1", "STATUS=serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    assert notifier.notify("STOPPING=1")
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_namespace_address() -> None:
    name = f"cripy-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert Notifier("@" + name).notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_the_variable_is_taken_out_of_the_environment(
        listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path, "PATH": "/bin"}
    notifier = Notifier.from_environment(env)
    assert env == {"PATH": "/bin"}  # children started later do not see it
    assert notifier.notify("READY=1")
    assert sock.recv(4096) == b"READY=1"


def test_without_systemd_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.notify("READY=1")


def test_unusable_addresses_are_logged_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "cripy.sdnotify")
    assert not Notifier("vsock:2:1234").notify("READY=1")
    assert not Notifier(str(tmp_path / "nobody-listens")).notify("READY=1")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "'vsock:2:1234' is not a unix socket address" in messages
    assert "cannot notify systemd at" in messages and "nobody-listens" in messages
