"""AppArmor requests against the host's kernel (here: AppArmor off; the VM guest has it on
and checks enforcement in tests/vm/guest/test_apparmor.py)."""

from __future__ import annotations

import json

import grpc
import pytest

from cripy.api import api_pb2 as pb
from cripy.oci.apparmor import probe
from tests.support.pods import Pods, container_config

SP = pb.SecurityProfile


APPARMOR = probe().enabled


def test_a_localhost_profile_is_refused_with_the_reason(pods: Pods) -> None:
    pod_id = pods.run()
    for security in (
        pb.LinuxContainerSecurityContext(
            apparmor=SP(profile_type=SP.Localhost, localhost_ref="cripy-test-deny")),
        pb.LinuxContainerSecurityContext(apparmor_profile="localhost/cripy-test-deny"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            pods.create(pod_id, "confined", ["sleep", "300"], security_context=security)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        reason = ("'cripy-test-deny' is not loaded on this node" if APPARMOR else
                  "'cripy-test-deny' was requested, but AppArmor is not enabled on this node")
        assert reason in (info.value.details() or "")
    listed = pods.runtime.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(pod_sandbox_id=pod_id))).containers
    assert list(listed) == []


def test_runtime_default_runs_and_unconfined_has_no_profile(pods: Pods) -> None:
    """Without AppArmor on the node the runtime default runs unconfined."""
    pod_id = pods.run()
    default = "cripy-default" if APPARMOR else None
    for name, security, profile in (
        ("default", pb.LinuxContainerSecurityContext(
            apparmor=SP(profile_type=SP.RuntimeDefault)), default),
        ("legacy", pb.LinuxContainerSecurityContext(apparmor_profile="runtime/default"), default),
        ("unset", pb.LinuxContainerSecurityContext(), default),
        ("unconfined", pb.LinuxContainerSecurityContext(
            apparmor=SP(profile_type=SP.Unconfined)), None),
    ):
        cid = pods.create(pod_id, name, ["sleep", "300"], security_context=security)
        status = pods.status(cid, verbose=True)
        assert status.status.state == pb.CONTAINER_RUNNING
        spec = json.loads(status.info["info"])["runtimeSpec"]
        assert spec["process"].get("apparmorProfile") == profile
        assert pods.exec(cid, "echo", "up").stdout == b"up\n"


def test_a_bad_profile_string_is_an_invalid_argument(pods: Pods) -> None:
    config = container_config("bad", pods.node.image, ["true"], security_context=(
        pb.LinuxContainerSecurityContext(apparmor_profile="docker-default")))
    pod_id = pods.run()
    with pytest.raises(grpc.RpcError) as info:
        pods.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pods.config(pod_id)),
            timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "apparmor_profile 'docker-default'" in (info.value.details() or "")
