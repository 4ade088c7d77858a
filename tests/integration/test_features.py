"""Runtime features on this host (cgroup v1 hybrid, runc 1.1.5, crun unusable): what
Status reports per handler, recursive read-only mounts with runc, and pods asking for a
user namespace (hostUsers: false) refused with the reason or the bad field."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.support.pods import Pods, container_config, pod_config

MAPPING = [pb.IDMapping(host_id=200000, container_id=0, length=65536)]


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def userns_config(pods: Pods, name: str, *, mode: pb.NamespaceMode = pb.POD,
                  uids: list[pb.IDMapping] | None = None,
                  gids: list[pb.IDMapping] | None = None,
                  network: pb.NamespaceMode = pb.POD) -> pb.PodSandboxConfig:
    config = pod_config(name, pods.log_dir, cgroup_parent=pods.cgroup_parent, network=network)
    config.linux.security_context.namespace_options.userns_options.CopyFrom(
        pb.UserNamespace(mode=mode, uids=MAPPING if uids is None else uids,
                         gids=MAPPING if gids is None else gids))
    return config


def run(pods: Pods, config: pb.PodSandboxConfig, handler: str = "") -> str:
    pod_id: str = pods.runtime.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config, runtime_handler=handler),
        timeout=60).pod_sandbox_id
    pods.created.append(pod_id)
    return pod_id


def test_status_lists_every_handler_with_its_features(pods: Pods) -> None:
    status = pods.runtime.Status(pb.StatusRequest(verbose=True))
    found = {h.name: h.features for h in status.runtime_handlers}
    assert list(found) == ["", "crun", "runc"]  # the default first, then by name
    # runc 1.1.5: rro yes (and this kernel has mount_setattr), idmapped mounts no.
    assert found["runc"].recursive_read_only_mounts and not found["runc"].user_namespaces
    assert found[""] == found["runc"]
    # crun cannot run on this hybrid host at all, so it can do neither.
    assert not found["crun"].recursive_read_only_mounts and not found["crun"].user_namespaces
    assert status.features.supplemental_groups_policy
    assert not status.features.user_namespaces_host_network
    ready = {c.type: c for c in status.status.conditions}["RuntimeReady"]
    assert ready.status, ready.message

    reasons = {h["name"]: h["features"] for h in json.loads(status.info["runtime_handlers"])}
    assert "runc 1.1.5" in reasons["runc"]["user_namespaces"]["reason"]
    assert "no idmapped mounts" in reasons["runc"]["user_namespaces"]["reason"]
    assert "hybrid" in reasons["crun"]["recursive_read_only"]["reason"]


def test_the_cli_shows_handlers_and_features(pods: Pods) -> None:
    daemon = pods.node.daemon
    out = json.loads(daemon.ctl("info").stdout)
    assert out["runtimeHandlers"][0] == {"name": "", "features": {
        "recursiveReadOnlyMounts": True, "userNamespaces": False}}
    assert out["features"] == {"supplementalGroupsPolicy": True,
                               "userNamespacesHostNetwork": False}
    status = subprocess.run([sys.executable, "-m", "cripy", "status", "--socket",
                             str(daemon.runroot / "status.sock"), "info"],
                            capture_output=True, text=True, timeout=60, check=True)
    info = json.loads(status.stdout)
    runc = next(h for h in info["runtime_handlers"] if h["name"] == "runc")
    assert runc["features"]["recursive_read_only"] == {"supported": True, "reason": ""}
    assert info["features"]["supplemental_groups_policy"] is True


@pytest.fixture
def with_submount(tmp_path: Path) -> Iterator[Path]:
    """A directory with a tmpfs mounted below it."""
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "t", str(top / "sub")],
                   check=True, timeout=30)
    try:
        yield top
    finally:
        subprocess.run(["umount", "-l", str(top / "sub")], check=False, timeout=30)


@pytest.mark.parametrize("recursive", [False, True])
def test_recursive_read_only_mounts_with_runc(pods: Pods, with_submount: Path,
                                              recursive: bool) -> None:
    pod_id = pods.run("rro")
    mount = pb.Mount(container_path="/data", host_path=str(with_submount), readonly=True,
                     recursive_read_only=recursive)
    config = container_config("rro", pods.node.image, ["sleep", "300"])
    config.mounts.append(mount)
    cid = pods.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pods.config(pod_id)),
        timeout=60).container_id
    pods.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    assert pods.exec(cid, "touch", "/data/x").exit_code != 0  # read-only either way
    below = pods.exec(cid, "touch", "/data/sub/x")
    if recursive:
        assert below.exit_code != 0 and b"Read-only file system" in below.stderr
    else:  # a plain read-only bind leaves submounts writable: why rro exists
        assert below.exit_code == 0


def test_a_user_namespace_pod_on_runc_is_refused_with_the_reason(pods: Pods) -> None:
    for handler in ("", "runc"):
        err = rpc_error(lambda h=handler: run(pods, userns_config(pods, "u-runc"), h))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = err.details() or ""
        assert "runtime handler 'runc' cannot run pods in a user namespace here" in details
        assert "runc 1.1.5" in details and "no idmapped mounts" in details
    assert pods.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []


@pytest.mark.parametrize(("change", "message"), [
    ({"mode": pb.CONTAINER}, "userns_options mode CONTAINER is not supported for a pod"),
    ({"mode": pb.TARGET}, "userns_options mode TARGET is not supported"),
    ({"uids": []}, "mode POD needs uid mappings"),
    ({"gids": [pb.IDMapping(host_id=1, container_id=0, length=0)]},
     "gid mapping 0:1 has length 0"),
    ({"uids": [pb.IDMapping(host_id=200000, container_id=0, length=1000),
               pb.IDMapping(host_id=200500, container_id=1000, length=1000)]},
     "uid mappings overlap in host ids at 200500"),
    ({"uids": [pb.IDMapping(host_id=4294967000, container_id=0, length=65536)]},
     "goes past the largest ID"),
    ({"uids": [pb.IDMapping(host_id=200000, container_id=1, length=10)]},
     "uid mappings do not map uid 0"),
    ({"network": pb.NODE}, "cannot use the node's network namespace"),
])
def test_bad_user_namespace_options_are_invalid(pods: Pods, change: dict[str, Any],
                                                message: str) -> None:
    err = rpc_error(lambda: run(pods, userns_config(pods, "u-bad", **change)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.details() or "")


def test_mode_node_is_the_default(pods: Pods) -> None:
    pod_id = run(pods, userns_config(pods, "u-node", mode=pb.NODE, uids=[], gids=[]))
    cid = pods.create(pod_id, "c", ["sleep", "300"])
    assert pods.exec(cid, "cat", "/proc/self/uid_map").stdout.split() == \
        [b"0", b"0", b"4294967295"]
