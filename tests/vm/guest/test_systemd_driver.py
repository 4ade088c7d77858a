"""The systemd cgroup driver on a systemd + cgroup v2 node: containers in cripy-<id>.scope
units in the kubelet's pod slice, conmon in cripy-conmon-<id>.scope beside them, stats
from the scope's cgroup, and no unit left after a remove. (After a daemon crash too: the
crash check of test_events_recovery runs on this driver as well, and its pods fixture
fails it for any cripy-*.scope left.)"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.support.pods import pod_config
from tests.vm.guest.node import (
    CGROUP_ROOT,
    GuestPods,
    cgroup_file,
    oom_killed_container,
    systemctl,
)

pytestmark = pytest.mark.drivers("systemd")  # the driver is the subject

MIB = 1 << 20


def unit(name: str) -> dict[str, str]:
    out = systemctl("show", "--property=LoadState,ActiveState,Slice,ControlGroup", name)
    return dict(line.partition("=")[::2] for line in out.splitlines() if line)


def unit_gone(name: str) -> bool:
    return unit(name)["LoadState"] == "not-found"


def procs(directory: Path) -> list[int]:
    return [int(p) for p in cgroup_file(directory, "cgroup.procs").split()]


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_a_container_runs_in_its_scope_in_the_pod_slice(pods: GuestPods) -> None:
    resources = pb.LinuxContainerResources(memory_limit_in_bytes=64 * MIB,
                                           cpu_quota=50000, cpu_period=100000)
    pod_id = pods.run("scoped")
    cid = pods.create(pod_id, "app", ["sleep", "300"], resources=resources)
    pod_slice = pods.pod_dir(pod_id).name
    scope = unit(f"cripy-{cid}.scope")
    assert scope["ActiveState"] == "active" and scope["Slice"] == pod_slice
    directory = pods.cgroup_dir(cid)
    assert directory == pods.expected_dir(pod_id, cid)
    assert scope["ControlGroup"] == "/" + str(directory.relative_to(CGROUP_ROOT))
    assert cgroup_file(directory, "memory.max") == str(64 * MIB)
    assert cgroup_file(directory, "cpu.max") == "50000 100000"
    # In-place resize reaches the scope's cgroup.
    pods.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(memory_limit_in_bytes=96 * MIB)))
    assert cgroup_file(directory, "memory.max") == str(96 * MIB)

    # conmon has a scope of its own in the pod's slice, not the daemon's cgroup.
    monitor = unit(f"cripy-conmon-{cid}.scope")
    assert monitor["ActiveState"] == "active" and monitor["Slice"] == pod_slice
    conmon_dir = CGROUP_ROOT / monitor["ControlGroup"].lstrip("/")
    assert [comm(p) for p in procs(conmon_dir)] == ["conmon"]

    # Stats are read from the scope's cgroup.
    stats = pods.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats
    current = int(cgroup_file(directory, "memory.current"))
    assert stats.memory.usage_bytes.value > 0
    assert abs(stats.memory.usage_bytes.value - current) < 4 * MIB
    assert stats.cpu.usage_core_nano_seconds.value > 0

    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    assert unit_gone(f"cripy-{cid}.scope") and unit_gone(f"cripy-conmon-{cid}.scope")
    assert not directory.exists()


def test_an_infra_process_gets_a_scope_too(pods: GuestPods) -> None:
    pod_id = pods.run("sharedpid", pid=pb.POD)
    cid = pods.create(pod_id, "app", ["sleep", "300"])
    infra = unit(f"cripy-{pod_id}.scope")
    assert infra["ActiveState"] == "active" and infra["Slice"] == pods.pod_dir(pod_id).name
    assert pods.exec(cid, "cat", "/proc/1/cmdline").stdout.startswith(b"/catatonit")
    pods.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    assert unit_gone(f"cripy-{pod_id}.scope") and unit_gone(f"cripy-conmon-{pod_id}.scope")


def test_a_killed_container_leaves_no_unit(pods: GuestPods) -> None:
    """The container and its conmon die behind the daemon's back (kill -9)."""
    pod_id = pods.run("killed")
    cid = pods.create(pod_id, "app", ["sleep", "300"])
    conmon_dir = CGROUP_ROOT / unit(f"cripy-conmon-{cid}.scope")["ControlGroup"].lstrip("/")
    for pid in [*procs(conmon_dir), pods.pid(cid)]:
        os.kill(pid, 9)
    pods.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0), timeout=60)
    assert pods.status(cid).status.state == pb.CONTAINER_EXITED
    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    assert unit_gone(f"cripy-{cid}.scope") and unit_gone(f"cripy-conmon-{cid}.scope")


def test_parents_that_do_not_suit_the_driver(pods: GuestPods) -> None:
    driver = pods.runtime.RuntimeConfig(pb.RuntimeConfigRequest()).linux.cgroup_driver
    assert driver == pb.SYSTEMD
    for parent in ("/kubepods/burstable/pod" + secrets.token_hex(4), "/a/b"):
        config = pod_config("bad", pods.log_dir, cgroup_parent=parent)
        with pytest.raises(grpc.RpcError) as info:
            pods.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details() or ""
        assert parent in details and "cgroup driver is systemd" in details


def test_the_kubelets_expanded_slice_form(pods: GuestPods) -> None:
    """The kubelet sends the slice's full path; the container still lands in the slice."""
    pod_id = pods.run("expanded")
    expanded = "/" + str(pods.pod_dir(pod_id).relative_to(CGROUP_ROOT))
    config = pod_config("expanded2", pods.log_dir, cgroup_parent=expanded)
    config.metadata.uid = pods.uids[pod_id] + "x"
    second: str = pods.runtime.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    pods.created.append(second)
    cid = pods.create(second, "app", ["sleep", "300"])
    assert pods.cgroup_dir(cid) == pods.pod_dir(pod_id) / f"cripy-{cid}.scope"


def test_an_oom_kill_is_reported_although_systemd_removed_the_scope(pods: GuestPods) -> None:
    cid = oom_killed_container(pods)
    assert unit(f"cripy-{cid}.scope")["ActiveState"] != "active"
    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    assert unit_gone(f"cripy-{cid}.scope") and unit_gone(f"cripy-conmon-{cid}.scope")
