"""A real `cripy daemon` in its own state directories, driven over its real socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from cripy.api import api_pb2 as pb
from cripy.api import api_pb2_grpc
from cripy.config import from_dict, merge_tables, render

#: Seconds for a started daemon to answer Version on its socket: generous, since a
#: Python daemon under TCG emulation on a busy host once needed more than 30.
START_TIMEOUT = 90.0


class Daemon:
    def __init__(self, workdir: Path, insecure_registries: list[str] | None = None,
                 extra_config: str = "", python: str = "") -> None:
        """`python` runs another cripy: that interpreter's installed one (benchmarks)."""
        self.workdir = workdir
        self.python = python
        self.root = workdir / "root"
        self.runroot = workdir / "run"
        self.socket = self.runroot / "cripy.sock"
        self.endpoint = f"unix://{self.socket}"
        self.cni_dir = workdir / "cni"
        self.cni_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "daemon.log"
        self.config_path = workdir / "cripy.toml"
        settings: dict[str, Any] = {
            "root": str(self.root),
            "runroot": str(self.runroot),
            "listen": self.endpoint,
            "log_level": "debug",
            "network": {"cni_config_dir": str(self.cni_dir)},
            "streaming": {"port": 0},
            "monitoring": {"status_socket": str(self.runroot / "status.sock")},
            # Off unless a test turns it on; never the node's own socket and plugins.
            "nri": {"enable": False, "socket_path": str(self.runroot / "nri.sock"),
                    "plugin_path": str(workdir / "nri-plugins"),
                    "plugin_config_path": str(workdir / "nri-conf")},
            "registries": {host: {"insecure": True} for host in insecure_registries or []},
        }
        merge_tables(settings, tomllib.loads(extra_config))
        self.config_path.write_text(render(from_dict(settings)))
        self.process: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, crash_at: str = "", env: dict[str, str] | None = None) -> Daemon:
        """Start the daemon; `crash_at` names a crash point where it will kill itself;
        `env` adds to its environment."""
        log = self.log_path.open("ab")
        env = {**os.environ, **(env or {}), "CRIPY_CRASH_AT": crash_at}
        self.process = subprocess.Popen(
            [self.python or sys.executable, "-m", "cripy", "daemon", "--config",
             str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
            # Away from this checkout, so `-m cripy` finds that interpreter's cripy.
            cwd=self.workdir if self.python else None,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        error = "no socket yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            if self.socket.exists():
                try:
                    self.runtime.Version(pb.VersionRequest(), timeout=2)
                    return self
                except grpc.RpcError as rpc_error:
                    error = f"Version failed: {rpc_error.code().name}"
                    # A fresh channel for the next try: a failed one waits out its
                    # reconnect backoff (1 s, 1.6 s, 2.6 s, ...) while the socket left
                    # by a killed daemon is still there, and notices the new daemon late.
                    self._close_channel()
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(
            f"daemon did not come up within {START_TIMEOUT:.0f}s: waited for {self.socket} "
            f"to exist and answer a Version call ({error}); killed it. Its log:\n{self.log()}")

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; returns the exit status."""
        self._close_channel()
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self._close_channel()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> Daemon:
        self.stop()
        return self.start()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop()
        finally:
            self.kill()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except FileNotFoundError:
            return ""

    # --- clients ------------------------------------------------------------------------

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.endpoint)
        return self._channel

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def runtime(self) -> api_pb2_grpc.RuntimeServiceStub:
        return api_pb2_grpc.RuntimeServiceStub(self.channel)

    @property
    def images(self) -> api_pb2_grpc.ImageServiceStub:
        return api_pb2_grpc.ImageServiceStub(self.channel)

    def pull(self, image: str, user: str = "", password: str = "") -> str:
        request = pb.PullImageRequest(
            image=pb.ImageSpec(image=image),
            auth=pb.AuthConfig(username=user, password=password),
        )
        return str(self.images.PullImage(request, timeout=120).image_ref)

    def ctl(self, *args: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `cripy ctl` against this daemon (`input` goes to its stdin)."""
        result = subprocess.run(
            [sys.executable, "-m", "cripy", "ctl", "-r", self.endpoint, *args],
            capture_output=True, text=True, timeout=timeout, input=input,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"cripy ctl {' '.join(args)} failed ({result.returncode}): {result.stderr}"
            )
        return result
