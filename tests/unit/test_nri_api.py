"""The NRI protobuf: generated modules are current, and wire facts match NRI v0.12."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import message as _message

from cripy.nri import api_pb2, ttrpc_pb2
from tests.support.protogen import stale_modules

ROOT = Path(__file__).resolve().parents[2]
NRI_DIR = ROOT / "cripy" / "nri"
GENERATED = ("api_pb2.py", "api_pb2.pyi", "ttrpc_pb2.py", "ttrpc_pb2.pyi")


def _numbers(cls: type[_message.Message]) -> dict[str, int]:
    return {f.name: f.number for f in cls.DESCRIPTOR.fields}


def test_generated_modules_are_current(tmp_path: Path) -> None:
    stale = stale_modules(tmp_path, NRI_DIR, GENERATED, sub="nri")
    assert not stale, f"generated modules out of date, run scripts/gen-proto: {stale}"


def test_package_and_services() -> None:
    assert api_pb2.DESCRIPTOR.package == "nri.pkg.api.v1alpha1"
    runtime = api_pb2.DESCRIPTOR.services_by_name["Runtime"]
    assert runtime.full_name == "nri.pkg.api.v1alpha1.Runtime"
    assert {m.name for m in runtime.methods} == {"RegisterPlugin", "UpdateContainers"}
    plugin = api_pb2.DESCRIPTOR.services_by_name["Plugin"]
    assert {m.name for m in plugin.methods} == {
        "Configure",
        "Synchronize",
        "Shutdown",
        "RunPodSandbox",
        "UpdatePodSandbox",
        "PostUpdatePodSandbox",
        "StopPodSandbox",
        "RemovePodSandbox",
        "CreateContainer",
        "PostCreateContainer",
        "StartContainer",
        "PostStartContainer",
        "UpdateContainer",
        "PostUpdateContainer",
        "StopContainer",
        "RemoveContainer",
        "StateChange",
        "ValidateContainerAdjustment",
    }
    assert plugin.methods_by_name["StateChange"].input_type.name == "StateChangeEvent"
    assert plugin.methods_by_name["Shutdown"].input_type.name == "Empty"
    assert runtime.methods_by_name["RegisterPlugin"].output_type.name == "Empty"


def test_registration_and_configuration_fields() -> None:
    assert _numbers(api_pb2.RegisterPluginRequest) == {
        "plugin_name": 1,
        "plugin_idx": 2,
        "NRI_version": 3,
    }
    assert _numbers(api_pb2.ConfigureRequest) == {
        "config": 1,
        "runtime_name": 2,
        "runtime_version": 3,
        "registration_timeout": 4,
        "request_timeout": 5,
        "NRI_version": 6,
    }
    assert _numbers(api_pb2.ConfigureResponse) == {"events": 2, "request_timeout": 3}
    assert _numbers(api_pb2.SynchronizeRequest) == {"pods": 1, "containers": 2, "more": 3}
    assert _numbers(api_pb2.SynchronizeResponse) == {"update": 1, "more": 2}


def test_event_values() -> None:
    assert api_pb2.Event.Value("RUN_POD_SANDBOX") == 1
    assert api_pb2.Event.Value("CREATE_CONTAINER") == 4
    assert api_pb2.Event.Value("REMOVE_CONTAINER") == 11
    assert api_pb2.Event.Value("UPDATE_POD_SANDBOX") == 12
    assert api_pb2.Event.Value("VALIDATE_CONTAINER_ADJUSTMENT") == 14
    assert api_pb2.Event.Value("LAST") == 15


def test_pod_and_container_fields() -> None:
    assert _numbers(api_pb2.PodSandbox) == {
        "id": 1,
        "name": 2,
        "uid": 3,
        "namespace": 4,
        "labels": 5,
        "annotations": 6,
        "runtime_handler": 7,
        "linux": 8,
        "pid": 9,
        "ips": 10,
    }
    numbers = _numbers(api_pb2.Container)
    assert numbers["state"] == 4
    assert numbers["env"] == 8
    assert numbers["linux"] == 11
    assert numbers["exit_code"] == 17
    assert numbers["CDI_devices"] == 20
    assert numbers["user"] == 21
    assert len(numbers) == 21


def test_adjustment_fields() -> None:
    assert _numbers(api_pb2.ContainerAdjustment) == {
        "annotations": 2,
        "mounts": 3,
        "env": 4,
        "hooks": 5,
        "linux": 6,
        "rlimits": 7,
        "CDI_devices": 8,
        "args": 9,
    }
    linux = _numbers(api_pb2.LinuxContainerAdjustment)
    assert linux["resources"] == 2
    assert linux["oom_score_adj"] == 4
    assert linux["seccomp_policy"] == 6
    assert linux["memory_policy"] == 12
    assert _numbers(api_pb2.LinuxMemory)["limit"] == 1
    assert _numbers(api_pb2.ContainerUpdate) == {"container_id": 1, "linux": 2, "ignore_failure": 3}
    assert _numbers(api_pb2.CreateContainerResponse) == {"adjust": 1, "update": 2, "evict": 3}


def test_ttrpc_envelope_fields() -> None:
    assert _numbers(ttrpc_pb2.Request) == {
        "service": 1,
        "method": 2,
        "payload": 3,
        "timeout_nano": 4,
        "metadata": 5,
    }
    assert _numbers(ttrpc_pb2.Response) == {"status": 1, "payload": 2}
    assert _numbers(ttrpc_pb2.Status) == {"code": 1, "message": 2, "details": 3}


def test_wire_encoding() -> None:
    req = api_pb2.RegisterPluginRequest(plugin_name="a", plugin_idx="10")
    assert req.SerializeToString() == b"\x0a\x01a\x12\x0210"
    # ConfigureResponse.events is field 2, varint: tag 0x10.
    assert api_pb2.ConfigureResponse(events=8).SerializeToString() == b"\x10\x08"
