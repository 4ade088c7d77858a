"""The daemon: builds the services from the config, serves them, shuts down on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import grpc

from cripy import __version__
from cripy.api import api_pb2_grpc
from cripy.config import Config
from cripy.errors import CripyError, FailedPreconditionError
from cripy.image.registry import RegistryClient
from cripy.image.service import ImageManager
from cripy.image.store import ImageStore
from cripy.logs import set_level
from cripy.metrics import MetricsServer
from cripy.network.cni import CNIManager
from cripy.nri.hooks import Nri
from cripy.oci.apparmor import prepare_host
from cripy.oci.cgroups import make_driver, probe_host
from cripy.oci.features import probe_kernel
from cripy.oci.handlers import probe_handlers
from cripy.oci.runtime import OciRuntime
from cripy.runtime.container import ContainerManager
from cripy.runtime.events import EventBus
from cripy.runtime.exits import ExitWatcher
from cripy.runtime.sandbox import SandboxManager
from cripy.runtime.usage import StatsCollector
from cripy.sdnotify import Notifier
from cripy.server.image import ImageServicer
from cripy.server.runtime import RuntimeServicer
from cripy.server.stats import container_filesystems
from cripy.settle import after_startup
from cripy.statusapi import StatusServer
from cripy.streaming.backend import RuntimeStreamBackend
from cripy.streaming.server import StreamingServer

log = logging.getLogger("cripy.daemon")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the kubelet's own limit
SHUTDOWN_GRACE_SECONDS = 5
#: In asyncio debug mode (PYTHONASYNCIODEBUG=1), callbacks that hold the event loop
#: longer than this are logged ("Executing ... took"): blocking I/O that belongs in a thread.
SLOW_CALLBACK_SECONDS = 0.05


class Daemon:
    def __init__(self, config: Config,
                 reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reload_config = reload_config
        self.root = Path(config.root)
        self.runroot = Path(config.runroot)
        self.socket_path = config.socket_path
        self.images = ImageManager(config, ImageStore(self.root), RegistryClient(config))
        # Start-up: the host's facts and the handlers are probed once, here.
        self.host = probe_host()
        log.info("host: %s", self.host.describe())
        cgroups = make_driver(config.runtime.cgroup_manager, self.host,
                              conmon_cgroup=config.runtime.conmon_cgroup)
        state_dir = self.runroot / "oci"
        kernel = probe_kernel(self.root)
        oci = OciRuntime(state_dir=state_dir, log_level=config.log_level,
                         handlers=probe_handlers(config.runtime, state_dir, self.host, kernel),
                         default_handler=config.runtime.default_handler, cgroups=cgroups)
        cni = CNIManager(config.network.cni_config_dir, config.network.cni_plugin_dirs,
                         cache_dir=self.root / "cni-cache",
                         timeout=config.network.plugin_timeout)
        self.events = EventBus()
        self.oci = oci
        self.sandboxes = SandboxManager(config, oci, cni, self.events)
        self.containers = ContainerManager(config, oci, self.images, self.sandboxes,
                                           self.events)
        self.sandboxes.containers = self.containers
        self.nri = self.sandboxes.nri = self.containers.nri = Nri()
        self.stats = StatsCollector(self.containers, self.sandboxes)
        self.images.layers_in_use = self.containers.layers_in_use
        self.images.image_volume_users = self.containers.image_volume_users
        self.streaming = StreamingServer(
            config.streaming, RuntimeStreamBackend(self.containers, self.sandboxes, oci))
        self._stop = asyncio.Event()
        # Taken out of the environment before any child (conmon, runc) is started.
        self.notifier = Notifier.from_environment()
        self._reloads: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.get_debug():
            loop.slow_callback_duration = SLOW_CALLBACK_SECONDS
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        self.runroot.mkdir(parents=True, exist_ok=True, mode=0o711)
        lock_fd = self._take_lock()
        server = None
        status_api: StatusServer | None = None
        metrics: MetricsServer | None = None
        exits = ExitWatcher(self.oci.exit_dir, self.containers.notice_exits)
        try:
            self.containers.checkpoints.start_probe(self.config.runtime.enable_criu_support)
            self.sandboxes.apparmor = await asyncio.to_thread(prepare_host)
            await self.images.start()
            await self.sandboxes.recover()
            await self.containers.recover()
            await exits.start()  # then one scan: what exited since the recovery looked
            await self.images.collect_garbage()
            if self.config.nri.enable:  # after recovery: plugins are synchronized with it
                await self.nri.start(self.config.nri, __version__, self.sandboxes,
                                     self.containers, self.events)
            await self.streaming.start()
            server = await self._start_server()
            monitoring = self.config.monitoring
            status_api = StatusServer(Path(monitoring.status_socket), self.config,
                                      self.containers, self.sandboxes, self.oci)
            await status_api.start()
            if monitoring.metrics_port:
                metrics = MetricsServer(monitoring.metrics_address, monitoring.metrics_port,
                                        self.containers, self.sandboxes)
                try:
                    await metrics.start()
                except OSError as exc:
                    raise FailedPreconditionError(
                        f"cannot serve metrics on {monitoring.metrics_address}:"
                        f"{monitoring.metrics_port}: {exc.strerror}") from None
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._reload_soon)
            log.info("cripy serving on unix://%s (root %s, runroot %s)",
                     self.socket_path, self.root, self.runroot)
            after_startup()
            await asyncio.to_thread(self.notifier.notify, "READY=1",
                                    f"STATUS=serving on unix://{self.socket_path}")
            await self._stop.wait()
            log.info("shutting down")
            await asyncio.to_thread(self.notifier.notify, "STOPPING=1")
        finally:
            if server is not None:
                await server.stop(SHUTDOWN_GRACE_SECONDS)
            await exits.close()
            await self.nri.stop()
            await self.streaming.stop()
            if metrics is not None:
                await metrics.stop()
            if status_api is not None:
                await status_api.stop()
            await self.images.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            os.close(lock_fd)

    def stop(self) -> None:
        self._stop.set()

    def _reload_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> None:
        """SIGHUP: re-read the config files and apply what can change without a restart.

        The files are read in a thread. The components share this Config object, so
        updating it in place reaches them. A bad file is logged and changes nothing.
        """
        if self.reload_config is None:
            return
        await asyncio.to_thread(self.notifier.notify, "RELOADING=1")
        try:
            new = await asyncio.to_thread(self.reload_config)
        except CripyError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        finally:
            await asyncio.to_thread(self.notifier.notify, "READY=1")
        self.apply(new)

    def apply(self, new: Config) -> None:
        """Take over the settings of `new` that apply to a running daemon."""
        current = self.config
        current.log_level = new.log_level
        set_level(new.log_level)
        current.registries = new.registries
        current.runtime.seccomp_profile = new.runtime.seccomp_profile
        current.network.cni_config_dir = new.network.cni_config_dir
        self.sandboxes.cni.config_dir = new.network.cni_config_dir
        untouched = [name for name in ("root", "runroot", "listen")
                     if getattr(new, name) != getattr(current, name)]
        if untouched:
            log.warning("reload: %s change only on restart", ", ".join(untouched))
        log.info("configuration reloaded", extra={"log_level": new.log_level,
                                                  "cni_config_dir": new.network.cni_config_dir,
                                                  "registries": sorted(new.registries)})

    def _take_lock(self) -> int:
        """One daemon per root: a second one would corrupt the first one's state."""
        fd = os.open(self.root / "cripy.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPreconditionError(
                f"another cripy daemon is using {self.root}"
            ) from None
        return fd

    async def _start_server(self) -> grpc.aio.Server:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        _remove_stale_socket(self.socket_path)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        api_pb2_grpc.add_RuntimeServiceServicer_to_server(
            RuntimeServicer(self.config, self.sandboxes, self.containers, self.streaming,
                            self.stats),
            server)
        api_pb2_grpc.add_ImageServiceServicer_to_server(
            ImageServicer(self.images, lambda: container_filesystems(self.stats)), server)
        # Created with the right mode from the start: no moment where others may connect.
        old_umask = os.umask(0o117)
        try:
            server.add_insecure_port(f"unix:{self.socket_path}")
            await server.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o660)
        return server


def _remove_stale_socket(path: Path) -> None:
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: a leftover of a killed daemon
        return
    finally:
        probe.close()
    raise FailedPreconditionError(f"something is already listening on {path}")


async def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> None:
    await Daemon(config, reload_config).run()
