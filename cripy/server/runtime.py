"""RuntimeService: Version, Status, pods and containers; every RPC not built yet answers
UNIMPLEMENTED with its name."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

from cripy import __version__
from cripy.api import api_pb2 as pb
from cripy.config import Config
from cripy.network.readiness import Readiness, check_network
from cripy.oci.features import RUNTIME_FEATURES
from cripy.oci.handlers import RuntimeHandler
from cripy.runtime.container import ContainerManager
from cripy.runtime.sandbox import SandboxManager
from cripy.runtime.usage import StatsCollector
from cripy.server.container import ContainerRpcs
from cripy.server.events import EventRpcs
from cripy.server.rpc import Context, rpc, unimplemented_stubs
from cripy.server.sandbox import SandboxRpcs
from cripy.server.stats import StatsRpcs
from cripy.server.streaming import StreamingRpcs
from cripy.streaming.server import StreamingServer

RUNTIME_NAME = "cripy"
RUNTIME_API_VERSION = "v1"
KUBE_API_VERSION = "0.1.0"  # the CRI's own version string, as other runtimes answer

if TYPE_CHECKING:
    _RuntimeStubs = object
else:  # every RPC answers UNIMPLEMENTED until RuntimeServicer defines it
    _RuntimeStubs = type(
        "_RuntimeStubs", (), unimplemented_stubs(pb.DESCRIPTOR.services_by_name["RuntimeService"])
    )


def check_runtime(default: RuntimeHandler | None) -> Readiness:
    """The default handler as probed at start: its binaries run, and it works here."""
    if default is None:
        return Readiness(False, "RuntimeHandlerMissing", "the default handler is not set up")
    if default.binary_problem:
        return Readiness(False, "RuntimeBinaryMissing",
                         f"runtime handler {default.name!r}: {default.binary_problem}")
    if default.problem:
        return Readiness(False, "RuntimeHandlerUnusable",
                         f"runtime handler {default.name!r}: {default.problem}")
    return Readiness(True)


def _handler_message(name: str, handler: RuntimeHandler) -> pb.RuntimeHandler:
    features = handler.features
    return pb.RuntimeHandler(name=name, features=pb.RuntimeHandlerFeatures(
        recursive_read_only_mounts=features.recursive_read_only.supported,
        user_namespaces=features.user_namespaces.supported))


def _condition(kind: str, readiness: Readiness) -> pb.RuntimeCondition:
    return pb.RuntimeCondition(
        type=kind, status=readiness.ready, reason=readiness.reason, message=readiness.message
    )


class RuntimeServicer(SandboxRpcs, ContainerRpcs, EventRpcs, StatsRpcs, StreamingRpcs,
                      _RuntimeStubs):
    def __init__(self, config: Config, sandboxes: SandboxManager,
                 containers: ContainerManager, streaming: StreamingServer,
                 stats: StatsCollector) -> None:
        self.config = config
        self.sandboxes = sandboxes
        self.containers = containers
        self.streaming = streaming
        self.stats = stats
        self.events = containers.events

    @rpc
    async def Version(
        self, request: pb.VersionRequest, context: Context
    ) -> pb.VersionResponse:
        return pb.VersionResponse(
            version=KUBE_API_VERSION,
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=RUNTIME_API_VERSION,
        )

    @rpc
    async def Status(
        self, request: pb.StatusRequest, context: Context
    ) -> pb.StatusResponse:
        network = self.config.network
        default = self.containers.default_handler()
        status = pb.RuntimeStatus(
            conditions=[
                _condition("RuntimeReady", check_runtime(default)),
                _condition(
                    "NetworkReady", check_network(network.cni_config_dir, network.cni_plugin_dirs)
                ),
            ]
        )
        info = {}
        if request.verbose:
            info["config"] = json.dumps(dataclasses.asdict(self.config))
            info["runtime_handlers"] = json.dumps(self.containers.runtime_handlers())
            info["nri_plugins"] = json.dumps(self.containers.nri.describe())
            info["checkpoint_restore"] = json.dumps(
                (await self.containers.checkpoints.support()).report())
        # The default handler first under "" (the CRI's name for it), then each by name.
        handlers = [_handler_message("", default)] if default is not None else []
        handlers += [_handler_message(h.name, h) for h in
                     sorted(self.containers.handlers(), key=lambda h: h.name)]
        return pb.StatusResponse(
            status=status, info=info, runtime_handlers=handlers,
            features=pb.RuntimeFeatures(**RUNTIME_FEATURES))

    @rpc
    async def RuntimeConfig(
        self, request: pb.RuntimeConfigRequest, context: Context
    ) -> pb.RuntimeConfigResponse:
        driver = (pb.SYSTEMD if self.config.runtime.cgroup_manager == "systemd"
                  else pb.CGROUPFS)
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver))

    @rpc
    async def UpdateRuntimeConfig(
        self, request: pb.UpdateRuntimeConfigRequest, context: Context
    ) -> pb.UpdateRuntimeConfigResponse:
        cidr = request.runtime_config.network_config.pod_cidr
        if cidr:
            await self.sandboxes.set_pod_cidr(cidr)
        return pb.UpdateRuntimeConfigResponse()
