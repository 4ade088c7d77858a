"""The CRI v1 protobuf: generated modules are current, and wire facts match upstream."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message

from cripy.api import api_pb2, api_pb2_grpc
from tests.support.protogen import stale_modules

ROOT = Path(__file__).resolve().parents[2]
API_DIR = ROOT / "cripy" / "api"
GENERATED = ("api_pb2.py", "api_pb2_grpc.py", "api_pb2.pyi")

RUNTIME_RPCS = {
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "StreamPodSandboxes",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "StreamContainers",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "PortForward",
    "ContainerStats",
    "ListContainerStats",
    "StreamContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "StreamPodSandboxStats",
    "UpdateRuntimeConfig",
    "Status",
    "CheckpointContainer",
    "GetContainerEvents",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "StreamPodSandboxMetrics",
    "RuntimeConfig",
    "UpdatePodSandboxResources",
}

IMAGE_RPCS = {
    "ListImages",
    "StreamImages",
    "ImageStatus",
    "PullImage",
    "RemoveImage",
    "ImageFsInfo",
}

# RPCs whose responses are server streams; every other RPC is unary-unary.
SERVER_STREAMING = {
    "RuntimeService": {
        "GetContainerEvents",
        "StreamPodSandboxes",
        "StreamContainers",
        "StreamContainerStats",
        "StreamPodSandboxStats",
        "StreamPodSandboxMetrics",
    },
    "ImageService": {"StreamImages"},
}


def _service(name: str) -> _descriptor.ServiceDescriptor:
    return api_pb2.DESCRIPTOR.services_by_name[name]


def _numbers(cls: type[_message.Message]) -> dict[str, int]:
    return {f.name: f.number for f in cls.DESCRIPTOR.fields}


def _assert_fields(cls: type[_message.Message], expected: dict[str, int]) -> None:
    actual = _numbers(cls)
    subset = {name: actual.get(name) for name in expected}
    assert subset == expected, cls.DESCRIPTOR.full_name


# --- generated modules ------------------------------------------------------


def test_generated_modules_are_current(tmp_path: Path) -> None:
    stale = stale_modules(tmp_path, API_DIR, GENERATED)
    assert not stale, f"generated modules out of date, run scripts/gen-proto: {stale}"


def test_grpc_module_imports_package_qualified() -> None:
    source = (API_DIR / "api_pb2_grpc.py").read_text()
    assert "from cripy.api import api_pb2" in source


def test_package_and_file_name() -> None:
    assert api_pb2.DESCRIPTOR.package == "runtime.v1"
    assert api_pb2.DESCRIPTOR.name == "cripy/api/api.proto"


# --- services ---------------------------------------------------------------


def test_runtime_service_rpcs() -> None:
    assert {m.name for m in _service("RuntimeService").methods} == RUNTIME_RPCS


def test_image_service_rpcs() -> None:
    assert {m.name for m in _service("ImageService").methods} == IMAGE_RPCS


@pytest.mark.parametrize("service", ["RuntimeService", "ImageService"])
def test_streaming_shape(service: str) -> None:
    streaming = {m.name for m in _service(service).methods if m.server_streaming}
    assert streaming == SERVER_STREAMING[service]
    assert not any(m.client_streaming for m in _service(service).methods)


def test_get_container_events_is_server_streaming() -> None:
    method = _service("RuntimeService").methods_by_name["GetContainerEvents"]
    assert method.server_streaming
    assert not method.client_streaming
    assert method.input_type.full_name == "runtime.v1.GetEventsRequest"
    assert method.output_type.full_name == "runtime.v1.ContainerEventResponse"


def test_rpc_message_types() -> None:
    rs = _service("RuntimeService").methods_by_name
    assert rs["Version"].input_type.name == "VersionRequest"
    assert rs["ListPodSandbox"].output_type.name == "ListPodSandboxResponse"
    assert rs["RuntimeConfig"].input_type.name == "RuntimeConfigRequest"
    assert rs["RuntimeConfig"].output_type.name == "RuntimeConfigResponse"
    ims = _service("ImageService").methods_by_name
    assert ims["ImageFsInfo"].output_type.name == "ImageFsInfoResponse"


class _FakeServer:
    def __init__(self) -> None:
        self.handlers: list[Any] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        pass


def test_grpc_servicer_registration() -> None:
    server = _FakeServer()
    add_runtime = cast(Any, api_pb2_grpc).add_RuntimeServiceServicer_to_server
    add_image = cast(Any, api_pb2_grpc).add_ImageServiceServicer_to_server
    add_runtime(cast(Any, api_pb2_grpc).RuntimeServiceServicer(), server)
    add_image(cast(Any, api_pb2_grpc).ImageServiceServicer(), server)
    names = {h.service_name() for h in server.handlers}
    assert names == {"runtime.v1.RuntimeService", "runtime.v1.ImageService"}


# --- field numbers ----------------------------------------------------------


def test_version_messages() -> None:
    _assert_fields(api_pb2.VersionRequest, {"version": 1})
    _assert_fields(
        api_pb2.VersionResponse,
        {"version": 1, "runtime_name": 2, "runtime_version": 3, "runtime_api_version": 4},
    )


def test_pull_image_request() -> None:
    _assert_fields(api_pb2.PullImageRequest, {"image": 1, "auth": 2, "sandbox_config": 3})
    _assert_fields(api_pb2.PullImageResponse, {"image_ref": 1})
    _assert_fields(
        api_pb2.AuthConfig,
        {
            "username": 1,
            "password": 2,
            "auth": 3,
            "server_address": 4,
            "identity_token": 5,
            "registry_token": 6,
        },
    )


def test_image_spec() -> None:
    assert _numbers(api_pb2.ImageSpec) == {
        "image": 1,
        "annotations": 2,
        "user_specified_image": 18,
        "runtime_handler": 19,
        "image_ref": 20,
    }


def test_image() -> None:
    _assert_fields(
        api_pb2.Image,
        {"id": 1, "repo_tags": 2, "repo_digests": 3, "size": 4, "uid": 5, "spec": 7, "pinned": 8},
    )


def test_container_config() -> None:
    _assert_fields(
        api_pb2.ContainerConfig,
        {
            "metadata": 1,
            "image": 2,
            "command": 3,
            "args": 4,
            "working_dir": 5,
            "envs": 6,
            "mounts": 7,
            "devices": 8,
            "labels": 9,
            "annotations": 10,
            "log_path": 11,
            "stdin": 12,
            "stdin_once": 13,
            "tty": 14,
            "linux": 15,
            "windows": 16,
            "CDI_devices": 17,
            "stop_signal": 18,
        },
    )


def test_pod_sandbox_config() -> None:
    assert _numbers(api_pb2.PodSandboxConfig) == {
        "metadata": 1,
        "hostname": 2,
        "log_directory": 3,
        "dns_config": 4,
        "port_mappings": 5,
        "labels": 6,
        "annotations": 7,
        "linux": 8,
        "windows": 9,
    }
    _assert_fields(api_pb2.RunPodSandboxRequest, {"config": 1, "runtime_handler": 2})


def test_linux_container_resources() -> None:
    assert _numbers(api_pb2.LinuxContainerResources) == {
        "cpu_period": 1,
        "cpu_quota": 2,
        "cpu_shares": 3,
        "memory_limit_in_bytes": 4,
        "oom_score_adj": 5,
        "cpuset_cpus": 6,
        "cpuset_mems": 7,
        "hugepage_limits": 8,
        "unified": 9,
        "memory_swap_limit_in_bytes": 10,
    }


def test_security_contexts() -> None:
    _assert_fields(
        api_pb2.LinuxSandboxSecurityContext,
        {"run_as_user": 3, "run_as_group": 8, "supplemental_groups_policy": 11, "seccomp": 9},
    )
    _assert_fields(
        api_pb2.LinuxContainerSecurityContext,
        {
            "capabilities": 1,
            "privileged": 2,
            "run_as_group": 12,
            "no_new_privs": 11,
            "masked_paths": 13,
            "readonly_paths": 14,
            "seccomp": 15,
            "apparmor": 16,
            "supplemental_groups_policy": 17,
        },
    )


def test_mount() -> None:
    _assert_fields(
        api_pb2.Mount,
        {
            "container_path": 1,
            "host_path": 2,
            "propagation": 5,
            "uidMappings": 6,
            "gidMappings": 7,
            "recursive_read_only": 8,
            "image": 9,
            "image_sub_path": 10,
        },
    )


def test_container_status() -> None:
    _assert_fields(
        api_pb2.ContainerStatus,
        {
            "id": 1,
            "state": 3,
            "exit_code": 7,
            "reason": 10,
            "mounts": 14,
            "log_path": 15,
            "resources": 16,
            "image_id": 17,
            "user": 18,
            "stop_signal": 19,
        },
    )


def test_container_event_response() -> None:
    assert _numbers(api_pb2.ContainerEventResponse) == {
        "container_id": 1,
        "container_event_type": 2,
        "created_at": 3,
        "pod_sandbox_status": 4,
        "containers_statuses": 5,
    }


def test_exec_attach_audit_ids() -> None:
    _assert_fields(api_pb2.ExecRequest, {"container_id": 1, "cmd": 2, "audit_request_id": 7})
    _assert_fields(api_pb2.AttachRequest, {"container_id": 1, "audit_request_id": 6})


def test_stats_messages() -> None:
    _assert_fields(
        api_pb2.ContainerStats,
        {"attributes": 1, "cpu": 2, "memory": 3, "writable_layer": 4, "swap": 5, "io": 6},
    )
    _assert_fields(api_pb2.PsiStats, {"Full": 1, "Some": 2})
    _assert_fields(api_pb2.PsiData, {"Total": 1, "Avg10": 2, "Avg60": 3, "Avg300": 4})
    _assert_fields(api_pb2.MemoryUsage, {"working_set_bytes": 2, "psi": 8})


# --- enums ------------------------------------------------------------------


def test_enum_values() -> None:
    assert api_pb2.ContainerState.Value("CONTAINER_UNKNOWN") == 3
    assert api_pb2.PodSandboxState.Value("SANDBOX_NOTREADY") == 1
    assert api_pb2.NamespaceMode.Value("TARGET") == 3
    assert api_pb2.MountPropagation.Value("PROPAGATION_BIDIRECTIONAL") == 2
    assert api_pb2.ContainerEventType.Value("CONTAINER_DELETED_EVENT") == 3
    assert api_pb2.CgroupDriver.Value("CGROUPFS") == 1
    assert api_pb2.Signal.Value("SIGKILL") == 13
    assert api_pb2.Signal.Value("SIGTERM") == 23
    assert api_pb2.Signal.Value("SIGRTMAX") == 65
    assert api_pb2.SecurityProfile.ProfileType.Value("Localhost") == 2


# --- wire bytes -------------------------------------------------------------


def test_wire_encoding() -> None:
    # Field 1, wire type 2 (length-delimited): tag byte 0x0a.
    assert api_pb2.VersionRequest(version="v1").SerializeToString() == b"\x0a\x02v1"
    # ImageSpec.user_specified_image is field 18: tag (18 << 3 | 2) = 0x92 0x01.
    spec = api_pb2.ImageSpec(user_specified_image="a")
    assert spec.SerializeToString() == b"\x92\x01\x01a"
    decoded = api_pb2.PullImageRequest.FromString(b"\x0a\x03\x0a\x01x")
    assert decoded.image.image == "x"
