"""Property-based fuzzing of a running daemon with malformed and hostile CRI requests.

Every request must be answered, with success or a gRPC error that has a proper code and
a message; the daemon must keep serving; nothing may appear outside its own directories.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.pods import Node, bridge_network, leftovers, remove_cgroup
from tests.support.registry import Registry

# Codes a well-behaved runtime answers bad input with; UNKNOWN and INTERNAL mean a bug.
ACCEPTABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OUT_OF_RANGE,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS,
              grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED}
MARKER = "cripy-fuzz-escape"
FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

hostile_paths = st.sampled_from([
    "", ".", "..", "/", "../../../../tmp/" + MARKER, "/tmp/" + MARKER, "a/../../" + MARKER,
    "/etc/" + MARKER, "\x00", "a" * 5000, "/proc/self/root/tmp/" + MARKER, "//", "./x",
    "/dev/null", "/sys/kernel", "relative/path", "/tmp/../tmp/" + MARKER,
])
huge = st.integers(min_value=3000, max_value=70000).map(lambda n: "A/" * (n // 2))
text = st.one_of(hostile_paths, st.text(max_size=100), huge)
ids = st.one_of(st.just(""), st.text(max_size=80), st.just("0" * 64), st.just("../" * 20))
numbers = st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1),
                    st.sampled_from([-1, 0, 1, 2**31, -(2**31)]))
modes = st.integers(min_value=-5, max_value=10)  # includes unknown enum values


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
              images: Any) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("fuzz")
    daemon = Daemon(tmp / "daemon", insecure_registries=[registry.host])
    with bridge_network(daemon.cni_dir, tmp, 95) as bridge, daemon:
        daemon.pull(images.busybox.ref)
        node = Node(daemon, bridge, images.busybox.ref, tmp)
        try:
            yield node
        finally:
            for pod in daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
                daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.id))
                daemon.runtime.RemovePodSandbox(
                    pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
            leaks = leftovers(daemon, bridge, "/cripy-fuzz")
            remove_cgroup("/cripy-fuzz")
            assert leaks == []


def call(node: Node, method: str, request: Any) -> Any:
    """The response, or None after an acceptable error; fails on anything else."""
    daemon = node.daemon
    stub = daemon.images if method in ("PullImage", "ImageStatus", "RemoveImage",
                                       "ListImages") else daemon.runtime
    try:
        return getattr(stub, method)(request, timeout=60)
    except grpc.RpcError as err:
        assert err.code() in ACCEPTABLE, f"{method}: {err.code()}: {err.details()}"
        assert err.details(), f"{method}: {err.code()} without a message"
        return None
    finally:
        assert daemon.process is not None and daemon.process.poll() is None, \
            f"the daemon died on {method}"


def no_escape() -> None:
    for place in ("/tmp", "/etc", "/"):
        assert not (Path(place) / MARKER).exists(), f"a request wrote {place}/{MARKER}"


@FUZZ
@given(name=text, namespace=text, uid=text, hostname=text, log_dir=text,
       cgroup=text, sysctl_key=text, sysctl_value=text, network=modes, pid=modes, ipc=modes,
       port=numbers, dns=text)
def test_run_pod_sandbox(fuzz_node: Node, name: str, namespace: str, uid: str,
                         hostname: str, log_dir: str, cgroup: str, sysctl_key: str,
                         sysctl_value: str, network: int, pid: int, ipc: int, port: int,
                         dns: str) -> None:
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uid),
        hostname=hostname, log_directory=log_dir,
        dns_config=pb.DNSConfig(servers=[dns], searches=[dns]),
        port_mappings=[pb.PortMapping(container_port=max(-(2**31), min(port, 2**31 - 1)),
                                      host_port=0)],
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=cgroup, sysctls={sysctl_key: sysctl_value},
            security_context=pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(
                network=network, pid=pid, ipc=ipc))),  # type: ignore[arg-type]
    )
    response = call(fuzz_node, "RunPodSandbox", pb.RunPodSandboxRequest(config=config))
    if response is not None:
        call(fuzz_node, "StopPodSandbox",
             pb.StopPodSandboxRequest(pod_sandbox_id=response.pod_sandbox_id))
        call(fuzz_node, "RemovePodSandbox",
             pb.RemovePodSandboxRequest(pod_sandbox_id=response.pod_sandbox_id))
    no_escape()


@pytest.fixture(scope="module")
def fuzz_pod(fuzz_node: Node) -> tuple[str, pb.PodSandboxConfig]:
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="target", namespace="fuzz", uid=secrets.token_hex(4)),
        log_directory=str(fuzz_node.tmp / "logs"),
        linux=pb.LinuxPodSandboxConfig(cgroup_parent="/cripy-fuzz"))
    pod_id = fuzz_node.daemon.runtime.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
    return pod_id, config


@FUZZ
@given(name=text, log_path=text, working_dir=text, mount_host=text, mount_container=text,
       seccomp_ref=text, seccomp_kind=modes, cmd=st.lists(text, max_size=3), env_key=text,
       memory=numbers, shares=numbers, quota=numbers, user=numbers, device=text,
       propagation=modes, cap=text)
def test_create_container(fuzz_node: Node, fuzz_pod: tuple[str, pb.PodSandboxConfig],
                          name: str, log_path: str, working_dir: str, mount_host: str,
                          mount_container: str, seccomp_ref: str, seccomp_kind: int,
                          cmd: list[str], env_key: str, memory: int, shares: int, quota: int,
                          user: int, device: str, propagation: int, cap: str) -> None:
    pod_id, pod_config = fuzz_pod
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name),
        image=pb.ImageSpec(image=fuzz_node.image),
        command=cmd or ["true"], working_dir=working_dir, log_path=log_path,
        envs=[pb.KeyValue(key=env_key, value="v")],
        mounts=[pb.Mount(container_path=mount_container, host_path=mount_host,
                         propagation=propagation)],  # type: ignore[arg-type]
        devices=[pb.Device(container_path=device, host_path=device, permissions="rwm")],
        linux=pb.LinuxContainerConfig(
            resources=pb.LinuxContainerResources(memory_limit_in_bytes=memory,
                                                 cpu_shares=shares, cpu_quota=quota),
            security_context=pb.LinuxContainerSecurityContext(
                run_as_user=pb.Int64Value(value=user),
                capabilities=pb.Capability(add_capabilities=[cap]),
                seccomp=pb.SecurityProfile(profile_type=seccomp_kind,  # type: ignore[arg-type]
                                           localhost_ref=seccomp_ref))),
    )
    response = call(fuzz_node, "CreateContainer", pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config))
    if response is not None:
        call(fuzz_node, "RemoveContainer",
             pb.RemoveContainerRequest(container_id=response.container_id))
    no_escape()


@FUZZ
@given(container_id=ids, pod_id=ids, image=text, cmd=st.lists(text, max_size=3),
       timeout=numbers, memory=numbers)
def test_lookups_and_operations(fuzz_node: Node, container_id: str, pod_id: str, image: str,
                                cmd: list[str], timeout: int, memory: int) -> None:
    bounded = max(-(2**63), min(timeout, 2**63 - 1)) % 5
    for method, request in [
        ("ContainerStatus", pb.ContainerStatusRequest(container_id=container_id, verbose=True)),
        ("StartContainer", pb.StartContainerRequest(container_id=container_id)),
        ("StopContainer", pb.StopContainerRequest(container_id=container_id, timeout=bounded)),
        ("ExecSync", pb.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=bounded)),
        ("UpdateContainerResources", pb.UpdateContainerResourcesRequest(
            container_id=container_id,
            linux=pb.LinuxContainerResources(memory_limit_in_bytes=memory))),
        ("ReopenContainerLog", pb.ReopenContainerLogRequest(container_id=container_id)),
        ("PodSandboxStatus", pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)),
        ("ListContainers", pb.ListContainersRequest(filter=pb.ContainerFilter(
            id=container_id, pod_sandbox_id=pod_id, label_selector={image: image}))),
        ("ImageStatus", pb.ImageStatusRequest(image=pb.ImageSpec(image=image))),
        ("PullImage", pb.PullImageRequest(image=pb.ImageSpec(image=image))),
        ("RemoveImage", pb.RemoveImageRequest(image=pb.ImageSpec(image=image + "x"))),
    ]:
        call(fuzz_node, method, request)
    no_escape()
    assert fuzz_node.daemon.runtime.Version(pb.VersionRequest()).runtime_name == "cripy"
