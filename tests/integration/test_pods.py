"""Pods and containers on real runc, conmon and CNI plugins, through the daemon's socket."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.support.pods import Node, Pods, cgroup_dirs, container_config

CRI_LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) (stdout|stderr) (P|F) (.*)$")


def rpc_error(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=60)
    return info.value


def pod_ip(pods: Pods, pod_id: str) -> str:
    status = pods.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    return str(status.status.network.ip)


# --- pods -----------------------------------------------------------------------------


def test_a_pod_gets_an_ip_on_the_bridge(pods: Pods) -> None:
    pod_id = pods.run("net")
    ip = pod_ip(pods, pod_id)
    assert ip.startswith("10.216.1.")
    subprocess.run(["ping", "-c1", "-W2", ip], check=True, capture_output=True)
    listed = pods.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert pod_id in [p.id for p in listed]


def test_stop_and_remove_are_idempotent_and_names_are_unique(pods: Pods) -> None:
    pod_id = pods.run("unique")
    config = pods.config(pod_id)
    err = rpc_error(pods.runtime.RunPodSandbox, pb.RunPodSandboxRequest(config=config))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert pod_id in (err.details() or "")
    for _ in range(2):
        pods.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    state = pods.runtime.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.state
    assert state == pb.SANDBOX_NOTREADY
    for _ in range(2):
        pods.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    err = rpc_error(pods.runtime.PodSandboxStatus,
                    pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_list_filters_by_state_and_label(pods: Pods) -> None:
    a = pods.run(labels={"app": "a"})
    b = pods.run(labels={"app": "b"})
    pods.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=b))

    def ids(**flt: Any) -> set[str]:
        request = pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(**flt))
        return {p.id for p in pods.runtime.ListPodSandbox(request).items}

    assert ids(label_selector={"app": "a"}) == {a}
    ready = ids(state=pb.PodSandboxStateValue(state=pb.SANDBOX_READY))
    assert a in ready and b not in ready
    assert ids(id=b[:12]) == {b}


def test_containers_share_network_and_ipc_but_not_pid(pods: Pods) -> None:
    pod_id = pods.run("shared")
    one = pods.create(pod_id, "one", ["sleep", "300"])
    two = pods.create(pod_id, "two", ["sleep", "301"])
    net = [pods.exec(c, "readlink", "/proc/self/ns/net").stdout for c in (one, two)]
    ipc = [pods.exec(c, "readlink", "/proc/self/ns/ipc").stdout for c in (one, two)]
    pid = [pods.exec(c, "readlink", "/proc/self/ns/pid").stdout for c in (one, two)]
    assert net[0] == net[1] and ipc[0] == ipc[1]
    assert pid[0] != pid[1]
    assert b"sleep 301" not in pods.exec(one, "ps").stdout
    assert pods.exec(one, "hostname").stdout.strip() == b"shared"


def test_a_shared_pid_namespace_when_the_pod_asks(pods: Pods) -> None:
    pod_id = pods.run("sharedpid", pid=pb.POD)
    one = pods.create(pod_id, "one", ["sleep", "302"])
    pods.create(pod_id, "two", ["sleep", "303"])
    processes = pods.exec(one, "ps").stdout
    assert b"sleep 303" in processes and b"catatonit" in processes


def test_a_port_mapping_is_reachable_from_the_host(pods: Pods) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host_port = probe.getsockname()[1]
    pod_id = pods.run("ports", port_mappings=[
        pb.PortMapping(protocol=pb.TCP, container_port=8080, host_port=host_port)])
    pods.create(pod_id, "server", ["nc", "-ll", "-p", "8080", "-e", "echo", "hello-from-pod"])
    host_ip = _bridge_address(pods.node.bridge)
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection((host_ip, host_port), timeout=2) as conn:
                assert conn.recv(100).strip() == b"hello-from-pod"
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _bridge_address(bridge: str) -> str:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", bridge], capture_output=True,
                         text=True, check=True).stdout
    return out.split()[3].split("/")[0]


# --- containers -----------------------------------------------------------------------


def test_exit_code_times_and_cri_logs(pods: Pods) -> None:
    pod_id = pods.run("logs")
    cid = pods.create(pod_id, "talker",
                      ["sh", "-c", "echo out; echo err >&2; printf partial; exit 3"])
    status = pods.wait_exited(cid)
    assert status.exit_code == 3 and status.reason == "Error"
    assert status.created_at <= status.started_at <= status.finished_at
    log_path = Path(status.log_path)
    assert log_path == pods.log_dir / "talker.log"
    lines = log_path.read_text().splitlines()
    parsed = [CRI_LOG_LINE.match(line) for line in lines]
    assert all(parsed), lines
    entries = [(m.group(2), m.group(3), m.group(4)) for m in parsed if m]
    assert ("stdout", "F", "out") in entries
    assert ("stderr", "F", "err") in entries
    assert ("stdout", "P", "partial") in entries or ("stdout", "F", "partial") in entries


def test_a_completed_container(pods: Pods) -> None:
    cid = pods.create(pods.run(), "ok", ["true"])
    status = pods.wait_exited(cid)
    assert (status.exit_code, status.reason) == (0, "Completed")
    listed = pods.runtime.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
        state=pb.ContainerStateValue(state=pb.CONTAINER_EXITED)))).containers
    assert cid in [c.id for c in listed]


def test_exec_sync_output_exit_code_and_timeout(pods: Pods) -> None:
    cid = pods.create(pods.run(), "exec", ["sleep", "300"])
    result = pods.exec(cid, "sh", "-c", "echo hi; echo there >&2; exit 7")
    assert (result.stdout, result.stderr, result.exit_code) == (b"hi\n", b"there\n", 7)
    err = rpc_error(pods.runtime.ExecSync,
                    pb.ExecSyncRequest(container_id=cid, cmd=["sleep", "30"], timeout=1))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_stop_honours_the_timeout_then_kills(pods: Pods) -> None:
    cid = pods.create(pods.run(), "stubborn",
                      ["sh", "-c", "trap 'echo ignoring' TERM; while true; do sleep 0.1; done"])
    time.sleep(0.5)  # let the trap be installed
    started = time.monotonic()
    pods.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=2), timeout=60)
    elapsed = time.monotonic() - started
    status = pods.status(cid).status
    assert status.state == pb.CONTAINER_EXITED
    assert status.exit_code == 137
    assert 2 <= elapsed < 10
    pods.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=2))


def test_limits_show_up_in_the_cgroup(pods: Pods) -> None:
    resources = pb.LinuxContainerResources(
        memory_limit_in_bytes=64 * 1024 * 1024, cpu_shares=512,
        cpu_quota=50000, cpu_period=100000)
    cid = pods.create(pods.run(), "limited", ["sleep", "300"], resources=resources)
    memory = next(p for p in cgroup_dirs(pods.cgroup_parent) if p.parent.name == "memory")
    cpu = next(p for p in cgroup_dirs(pods.cgroup_parent) if p.parent.name == "cpu")
    (mem_dir,) = [d for d in memory.iterdir() if d.is_dir() and cid in d.name]
    (cpu_dir,) = [d for d in cpu.iterdir() if d.is_dir() and cid in d.name]
    assert int((mem_dir / "memory.limit_in_bytes").read_text()) == 64 * 1024 * 1024
    assert int((cpu_dir / "cpu.shares").read_text()) == 512
    assert int((cpu_dir / "cpu.cfs_quota_us").read_text()) == 50000
    pods.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(
            memory_limit_in_bytes=96 * 1024 * 1024, cpu_shares=256)))
    assert int((mem_dir / "memory.limit_in_bytes").read_text()) == 96 * 1024 * 1024
    assert int((cpu_dir / "cpu.shares").read_text()) == 256


def test_past_the_memory_limit_is_oomkilled(pods: Pods) -> None:
    resources = pb.LinuxContainerResources(memory_limit_in_bytes=16 * 1024 * 1024)
    cid = pods.create(pods.run(), "hog",
                      ["sh", "-c", "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done"],
                      resources=resources)
    status = pods.wait_exited(cid, within=60)
    assert status.reason == "OOMKilled"
    assert status.exit_code == 137


def test_readonly_rootfs_and_user_are_enforced(pods: Pods) -> None:
    security = pb.LinuxContainerSecurityContext(
        readonly_rootfs=True, run_as_user=pb.Int64Value(value=1000),
        run_as_group=pb.Int64Value(value=1000), supplemental_groups=[4242])
    cid = pods.create(pods.run(), "locked", ["sleep", "300"], security_context=security)
    ids = pods.exec(cid, "id").stdout.decode()
    assert "uid=1000" in ids and "gid=1000" in ids and "4242" in ids
    touched = pods.exec(cid, "touch", "/file")
    assert touched.exit_code != 0 and b"Read-only file system" in touched.stderr
    assert pods.exec(cid, "touch", "/tmp/../dev/shm/ok").exit_code == 0


def test_verbose_status_has_pid_and_spec(pods: Pods) -> None:
    cid = pods.create(pods.run(), "verbose", ["sleep", "300"])
    info = json.loads(pods.status(cid, verbose=True).info["info"])
    assert info["pid"] > 0
    assert info["runtimeSpec"]["process"]["args"] == ["sleep", "300"]


def test_remove_kills_a_running_container(pods: Pods) -> None:
    cid = pods.create(pods.run(), "doomed", ["sleep", "300"])
    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    err = rpc_error(pods.runtime.ContainerStatus, pb.ContainerStatusRequest(container_id=cid))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_containers_outlive_the_daemon(pods: Pods, node: Node) -> None:
    cid = pods.create(pods.run(), "survivor", ["sleep", "300"])
    pid = json.loads(pods.status(cid, verbose=True).info["info"])["pid"]
    node.daemon.kill()
    assert Path(f"/proc/{pid}").exists()
    node.daemon.start()
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
    assert pods.exec(cid, "echo", "still here").stdout == b"still here\n"


# --- bad requests ---------------------------------------------------------------------


def test_bad_requests_get_clear_errors(pods: Pods, tmp_path: Path) -> None:
    pod_id = pods.run()
    sandbox = pods.config(pod_id)

    def create_error(config: pb.ContainerConfig, pod: str = pod_id) -> grpc.RpcError:
        return rpc_error(pods.runtime.CreateContainer, pb.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=sandbox))

    image = pods.node.image
    cases = [
        (create_error(container_config("x", image, ["true"]), "0" * 64),
         grpc.StatusCode.NOT_FOUND, "0" * 12),
        (create_error(container_config("x", "127.0.0.1:1/missing:1", ["true"])),
         grpc.StatusCode.NOT_FOUND, "missing"),
        (create_error(container_config("x", image, ["true"], log_path="../../escape.log")),
         grpc.StatusCode.INVALID_ARGUMENT, "escape.log"),
        (create_error(container_config("x", image, ["true"], log_path="/etc/evil.log")),
         grpc.StatusCode.INVALID_ARGUMENT, "evil.log"),
    ]
    bad_mount = container_config("x", image, ["true"])
    bad_mount.mounts.add(container_path="/data/../../etc", host_path=str(tmp_path))
    cases.append((create_error(bad_mount), grpc.StatusCode.INVALID_ARGUMENT, "/data/../../etc"))
    relative = container_config("x", image, ["true"])
    relative.mounts.add(container_path="/data", host_path="relative/dir")
    cases.append((create_error(relative), grpc.StatusCode.INVALID_ARGUMENT, "relative/dir"))
    for err, code, needle in cases:
        assert err.code() == code, err.details()
        assert needle in (err.details() or ""), err.details()
    for call, request in [
        (pods.runtime.StartContainer, pb.StartContainerRequest(container_id="nope")),
        (pods.runtime.ContainerStatus, pb.ContainerStatusRequest(container_id="nope")),
        (pods.runtime.PodSandboxStatus, pb.PodSandboxStatusRequest(pod_sandbox_id="nope")),
        (pods.runtime.ExecSync, pb.ExecSyncRequest(container_id="nope", cmd=["true"])),
    ]:
        assert rpc_error(call, request).code() == grpc.StatusCode.NOT_FOUND
    assert not Path("/etc/evil.log").exists()
    assert not (pods.log_dir.parent.parent / "escape.log").exists()
    listed = pods.runtime.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(pod_sandbox_id=pod_id))).containers
    assert list(listed) == []
