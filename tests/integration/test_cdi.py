"""CDI devices on a real daemon: spec files the tests write (into the node's own spec
directories, never /etc/cdi) expose /dev/null under another path, an env var, a mount
and a group; the container sees them. Unresolvable devices are clear errors."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.integration.test_pods import rpc_error
from tests.support.daemon import Daemon
from tests.support.pods import Node, Pods, bridge_network, container_config
from tests.support.registry import Registry

NULL = os.stat("/dev/null")
GROUP = 4321

WriteSpec = Callable[[str, str, bytes], Path]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
         images: Any) -> Iterator[Node]:
    """The shared node, reading CDI specs from two directories of its own."""
    tmp = tmp_path_factory.mktemp("cdi")
    dirs = [tmp / "etc-cdi", tmp / "run-cdi"]
    for directory in dirs:
        directory.mkdir()
    daemon = Daemon(tmp / "daemon", insecure_registries=[registry.host],
                    extra_config=f"[cdi]\nspec_dirs = {json.dumps([str(d) for d in dirs])}\n")
    with bridge_network(daemon.cni_dir, tmp, 171) as bridge, daemon:
        daemon.pull(images.busybox.ref)
        yield Node(daemon, bridge, images.busybox.ref, tmp)


@pytest.fixture
def write_spec(node: Node) -> Iterator[WriteSpec]:
    """write_spec(dir ("etc-cdi" or "run-cdi"), file name, contents); removed afterwards."""
    written: list[Path] = []

    def write(directory: str, name: str, data: bytes) -> Path:
        path = node.tmp / directory / name
        path.write_bytes(data)
        written.append(path)
        return path

    try:
        yield write
    finally:
        for path in written:
            path.unlink(missing_ok=True)


def cdi_config(pods: Pods, devices: list[str],
               annotations: dict[str, str] | None = None) -> pb.ContainerConfig:
    config = container_config("cdi", pods.node.image, ["sleep", "300"])
    config.CDI_devices.extend(pb.CDIDevice(name=d) for d in devices)
    config.annotations.update(annotations or {})
    return config


def create(pods: Pods, devices: list[str], annotations: dict[str, str] | None = None) -> str:
    return pods.create_from(pods.run(), cdi_config(pods, devices, annotations))


def create_error(pods: Pods, devices: list[str],
                 annotations: dict[str, str] | None = None) -> grpc.RpcError:
    pod_id = pods.run()
    return rpc_error(pods.runtime.CreateContainer, pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=cdi_config(pods, devices, annotations),
        sandbox_config=pods.config(pod_id)))


def out(pods: Pods, cid: str, *cmd: str) -> str:
    result = pods.exec(cid, *cmd)
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode()


def test_a_device_with_node_env_mount_and_group(pods: Pods, node: Node,
                                                write_spec: WriteSpec) -> None:
    share = node.tmp / f"share-{secrets.token_hex(3)}"
    share.mkdir()
    (share / "hello.txt").write_text("from the host\n")
    write_spec("etc-cdi", "null.json", json.dumps({
        "cdiVersion": "0.7.0", "kind": "cripy.test/null",
        "containerEdits": {"env": ["CDI_COMMON=1"]},
        "devices": [{"name": "zero", "containerEdits": {
            # No type or numbers: they come from the host's /dev/null.
            "deviceNodes": [{"path": "/dev/cripy-null", "hostPath": "/dev/null"}],
            "env": ["CDI_DEVICE=zero"],
            "mounts": [{"hostPath": str(share), "containerPath": "/cdi-share",
                        "options": ["ro", "rbind"]}],
            "additionalGids": [GROUP],
        }}],
    }).encode())
    write_spec("run-cdi", "extra.yaml", b"cdiVersion: 0.5.0\nkind: cripy.test/yaml\n"
               b"devices:\n- name: one\n  containerEdits:\n    env: [YAML_DEVICE=one]\n")
    cid = create(pods, ["cripy.test/null=zero"],
                 {"cdi.k8s.io/test_plugin": "cripy.test/yaml=one,cripy.test/null=zero"})

    node_line = out(pods, cid, "stat", "-c", "%F %t %T", "/dev/cripy-null").strip()
    assert node_line == (f"character special file {os.major(NULL.st_rdev):x} "
                         f"{os.minor(NULL.st_rdev):x}")
    assert pods.exec(cid, "sh", "-c", "echo x > /dev/cripy-null").exit_code == 0  # allowed
    env = out(pods, cid, "env").splitlines()
    assert {"CDI_COMMON=1", "CDI_DEVICE=zero", "YAML_DEVICE=one"} <= set(env)
    assert out(pods, cid, "cat", "/cdi-share/hello.txt") == "from the host\n"
    assert pods.exec(cid, "touch", "/cdi-share/new").exit_code != 0  # read-only
    assert str(GROUP) in out(pods, cid, "id", "-G").split()
    assert GROUP in pods.status(cid).status.user.linux.supplemental_groups


def test_a_later_directory_overrides_an_earlier_one(pods: Pods,
                                                    write_spec: WriteSpec) -> None:
    for directory in ("etc-cdi", "run-cdi"):
        write_spec(directory, "over.json", json.dumps({
            "cdiVersion": "0.6.0", "kind": "cripy.test/over",
            "devices": [{"name": "d", "containerEdits": {"env": [f"FROM={directory}"]}}],
        }).encode())
    cid = create(pods, ["cripy.test/over=d"])
    assert "FROM=run-cdi" in out(pods, cid, "env").splitlines()


def test_unresolvable_devices_are_clear_errors(pods: Pods, node: Node,
                                               write_spec: WriteSpec) -> None:
    write_spec("etc-cdi", "known.json", json.dumps({
        "cdiVersion": "0.6.0", "kind": "cripy.test/known",
        "devices": [{"name": "a", "containerEdits": {"env": ["A=1"]}}]}).encode())
    broken = write_spec("run-cdi", "broken.yaml", b"cdiVersion: 0.6.0\nkind: [oops\n")
    dirs = f"{node.tmp / 'etc-cdi'}, {node.tmp / 'run-cdi'}"

    err = create_error(pods, ["cripy.test/known=b"])
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "cripy.test/known=b (not in " in str(err.details())
    assert f"spec dirs searched: {dirs}" in str(err.details())
    assert f"{broken}: not valid YAML" in str(err.details())

    err = create_error(pods, ["cripy.test/unknown=a"])
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "no spec of kind cripy.test/unknown" in str(err.details())

    err = create_error(pods, ["known-a"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "CDI device name 'known-a' is not fully qualified" in str(err.details())

    err = create_error(pods, [], {"cdi.k8s.io/x": "cripy.test/known=a,bad name"})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "annotation cdi.k8s.io/x" in str(err.details())

    write_spec("etc-cdi", "missing-node.json", json.dumps({
        "cdiVersion": "0.6.0", "kind": "cripy.test/gone",
        "devices": [{"name": "a", "containerEdits": {"deviceNodes": [
            {"path": "/dev/gone", "hostPath": "/dev/cripy-no-such-device"}]}}]}).encode())
    err = create_error(pods, ["cripy.test/gone=a"])
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "CDI device cripy.test/gone=a: host device node /dev/cripy-no-such-device" in \
        str(err.details())
    # Nothing was left behind by the failed creates (the pods fixture checks the rest).
    listed = pods.runtime.ListContainers(pb.ListContainersRequest()).containers
    assert [c for c in listed if c.metadata.name == "cdi"] == []

