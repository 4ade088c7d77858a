"""Waiting for a process to end through its pidfd (conmon at a container's delete)."""

from __future__ import annotations

import asyncio
import subprocess
import time

from cripy.oci.runtime import _wait_gone


def test_wakes_as_soon_as_the_process_exits() -> None:
    proc = subprocess.Popen(["sleep", "0.2"])
    try:
        started = time.monotonic()
        assert asyncio.run(_wait_gone(proc.pid, 5.0)) is True
        took = time.monotonic() - started
        # Well before the timeout, and with no 20 ms polling step behind the exit.
        assert 0.15 < took < 1.0
    finally:
        proc.kill()
        proc.wait()


def test_times_out_while_the_process_runs() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert asyncio.run(_wait_gone(proc.pid, 0.1)) is False
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_zombie_or_a_gone_pid_counts_as_gone() -> None:
    proc = subprocess.Popen(["true"])
    time.sleep(0.2)  # exited, not reaped: a zombie
    assert asyncio.run(_wait_gone(proc.pid, 1.0)) is True
    proc.wait()  # reaped: the pid is gone
    assert asyncio.run(_wait_gone(proc.pid, 1.0)) is True
