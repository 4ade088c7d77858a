"""Runtime handlers and cgroup drivers on this host (cgroup v1 hybrid, no systemd).

A daemon with the built-in handlers (runc, crun) plus a second runc handler with its own
state directory; pods pick one with RunPodSandbox's runtime_handler.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cripy.api import api_pb2 as pb
from cripy.oci.cgroups import probe_host
from tests.support.daemon import Daemon
from tests.support.pods import Node, Pods, bridge_network, pod_config
from tests.support.registry import Registry

ALT = "runc-alt"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
         images: Any) -> Iterator[Node]:
    """The shared node, with a second runc handler (conftest's `pods` uses this one)."""
    tmp = tmp_path_factory.mktemp("handlers")
    daemon = Daemon(tmp / "daemon", insecure_registries=[registry.host], extra_config=(
        f'[runtime.handlers.{ALT}]\nruntime_path = "runc"\n'
        f'runtime_root = "{tmp / "alt-root"}"\n'))
    with bridge_network(daemon.cni_dir, tmp, 150) as bridge, daemon:
        daemon.pull(images.busybox.ref)
        yield Node(daemon, bridge, images.busybox.ref, tmp)


def run_pod(pods: Pods, handler: str, cgroup_parent: str | None = None) -> str:
    config = pod_config("h-" + secrets.token_hex(3), pods.log_dir,
                        cgroup_parent=pods.cgroup_parent if cgroup_parent is None
                        else cgroup_parent)
    pod_id: str = pods.runtime.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config, runtime_handler=handler),
        timeout=60).pod_sandbox_id
    pods.created.append(pod_id)
    return pod_id


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def runc_ids(root: Path) -> set[str]:
    out = subprocess.run(["runc", "--root", str(root), "list", "--format", "json"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return {c["id"] for c in json.loads(out or "[]") or []}


def pod_list(pods: Pods) -> list[str]:
    return [p.id for p in pods.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items]


@pytest.mark.parametrize("handler", ["", "runc"])
def test_the_default_handler(pods: Pods, handler: str) -> None:
    pod_id = run_pod(pods, handler)
    cid = pods.create(pod_id, "c", ["sleep", "300"])
    assert pods.exec(cid, "echo", "hi").stdout == b"hi\n"
    status = pods.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    assert status.status.runtime_handler == handler
    assert cid in runc_ids(pods.node.daemon.runroot / "oci" / "runc")


def test_a_second_handler_keeps_its_root_across_a_restart(pods: Pods) -> None:
    pod_id = run_pod(pods, ALT)
    cid = pods.create(pod_id, "c", ["sleep", "300"])
    alt_root = pods.node.tmp / "alt-root"
    assert cid in runc_ids(alt_root)
    assert cid not in runc_ids(pods.node.daemon.runroot / "oci" / "runc")
    # A crash and a restart: the container is found again through its handler's root.
    pods.node.daemon.kill()
    pods.node.daemon.start()
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
    assert pods.exec(cid, "echo", "still").stdout == b"still\n"
    pods.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0),
                               timeout=60)
    assert pods.status(cid).status.exit_code == 137
    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    assert cid not in runc_ids(alt_root)


def test_an_unknown_handler_is_refused_naming_the_configured_ones(pods: Pods) -> None:
    before = pod_list(pods)
    err = rpc_error(lambda: run_pod(pods, "kata"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert "unknown runtime handler 'kata'" in details
    assert f"configured are crun, runc, {ALT}" in details
    assert pod_list(pods) == before


def test_crun_is_refused_on_this_host_with_the_reason(pods: Pods) -> None:
    host = probe_host()
    assert host.mode == "hybrid" and host.v2_controllers, "this test needs the hybrid host"
    err = rpc_error(lambda: run_pod(pods, "crun"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.details() or ""
    assert "runtime handler 'crun' cannot run containers on this host" in details
    assert "hybrid" in details and " ".join(host.v2_controllers) in details
    assert "runtime handler crun is unusable" in pods.node.daemon.log_path.read_text()
    # and Status (verbose) reports it as unusable here, with the same reason
    info = pods.runtime.Status(pb.StatusRequest(verbose=True)).info
    handlers = {h["name"]: h for h in json.loads(info["runtime_handlers"])}
    assert handlers["crun"]["usable"] is False and "hybrid" in handlers["crun"]["problem"]
    assert handlers["runc"]["usable"] is True and handlers["runc"]["flavor"] == "runc"
    assert handlers[ALT]["usable"] is True


@pytest.mark.parametrize("parent", [
    "kubepods-burstable-pod1.slice",
    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice",
])
def test_a_slice_parent_with_the_cgroupfs_driver_is_refused(pods: Pods, parent: str) -> None:
    err = rpc_error(lambda: run_pod(pods, "", cgroup_parent=parent))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert parent in details and "cgroup driver is cgroupfs" in details
    cfg = pods.runtime.RuntimeConfig(pb.RuntimeConfigRequest())
    assert cfg.linux.cgroup_driver == pb.CGROUPFS


def test_the_systemd_driver_is_refused_at_start_without_systemd(tmp_path: Path) -> None:
    assert not Path("/run/systemd/system").exists(), "this test needs a host without systemd"
    daemon = Daemon(tmp_path / "d", extra_config='[runtime]\ncgroup_manager = "systemd"\n')
    result = subprocess.run(
        [sys.executable, "-m", "cripy", "daemon", "--config", str(daemon.config_path)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert 'cgroup_manager = "systemd" needs systemd as PID 1' in result.stderr
    assert "/run/systemd/system is missing" in result.stderr
    assert not daemon.socket.exists()


def test_cripy_config_prints_the_handler_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[runtime.handlers.kata]\nruntime_path = "/opt/kata"\n')
    out = subprocess.run([sys.executable, "-m", "cripy", "config", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for table in ("runc", "crun", "kata"):
        assert f'[runtime.handlers."{table}"]' in out
    assert 'runtime_path = "/opt/kata"' in out and 'default_handler = "runc"' in out
