"""What cgroup v2 gives a container, checked where an operator would look: stats from
the v2 files, OOM kills from memory.events, pause through cgroup.freeze, a private cgroup
namespace, and /sys/fs/cgroup read-only unless the container is privileged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from cripy.api import api_pb2 as pb
from tests.vm.guest.node import (
    GuestPods,
    cgroup_file,
    flat_keyed,
    oom_killed_container,
    wait_for,
)

MiB = 1024 * 1024
#: Holds 24 MiB in /dev/shm (charged to the container's memory), then keeps a CPU busy.
BUSY_WITH_MEMORY = ["sh", "-c", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=24 2>/dev/null;"
                    " sleep 300 & sleep 301 & while :; do :; done"]


def status_api(pods: GuestPods, method: str, path: str) -> Any:
    socket = str(pods.node.daemon.runroot / "status.sock")
    with httpx.Client(transport=httpx.HTTPTransport(uds=socket), timeout=30) as client:
        response = client.request(method, f"http://cripy{path}")
    assert response.status_code == 200, response.text
    return response.json()


def _some_total_ns(cgroup: Path, name: str) -> int:
    """The "some" stall total of a *.pressure file, in nanoseconds."""
    some = cgroup_file(cgroup, name).splitlines()[0].split()
    assert some[0] == "some"
    return int(dict(f.split("=") for f in some[1:])["total"]) * 1000


def test_container_and_pod_stats_come_from_the_v2_files(pods: GuestPods) -> None:
    pod_id = pods.run("stats")
    cid = pods.create(pod_id, "busy", BUSY_WITH_MEMORY)
    cg = pods.cgroup_dir(cid)
    wait_for("24 MiB charged", lambda: int(cgroup_file(cg, "memory.current")) > 24 * MiB)
    wait_for("a second of CPU", lambda: flat_keyed(cg, "cpu.stat")["usage_usec"] > 1_000_000)

    cpu_before = flat_keyed(cg, "cpu.stat")["usage_usec"] * 1000
    stall_before = _some_total_ns(cg, "cpu.pressure")
    stats = pods.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats
    cpu_after = flat_keyed(cg, "cpu.stat")["usage_usec"] * 1000
    stall_after = _some_total_ns(cg, "cpu.pressure")
    current = int(cgroup_file(cg, "memory.current"))
    inactive_file = flat_keyed(cg, "memory.stat")["inactive_file"]
    assert stats.attributes.id == cid
    assert cpu_before <= stats.cpu.usage_core_nano_seconds.value <= cpu_after
    assert stats.memory.usage_bytes.value > 24 * MiB
    working_set = stats.memory.working_set_bytes.value
    assert 24 * MiB < working_set <= stats.memory.usage_bytes.value
    # the working set is usage minus inactive file pages, as the kubelet computes it
    assert abs(working_set - (current - inactive_file)) < 4 * MiB
    # pressure stall information from cpu/memory/io.pressure (Debian's kernel has PSI on)
    assert stall_before <= stats.cpu.psi.Some.Total <= stall_after
    assert stats.memory.HasField("psi") and stats.io.HasField("psi")
    assert stats.io.timestamp > 0

    pod = pods.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod_id)).stats
    assert pod.linux.process.process_count.value == int(
        cgroup_file(pods.pod_dir(pod_id), "pids.current"))
    assert pod.linux.process.process_count.value >= 3  # sh and its two sleeps
    assert pod.linux.memory.working_set_bytes.value >= working_set - 4 * MiB
    assert [c.attributes.id for c in pod.linux.containers] == [cid]


# On cgroupfs here: test_systemd_driver's OOM check is this one and more, on systemd.
@pytest.mark.drivers("cgroupfs")
def test_past_memory_max_is_oomkilled(pods: GuestPods) -> None:
    oom_killed_container(pods)


# One driver: runc freezes through the container's cgroup.freeze with either driver (the
# driver only decides where that cgroup is, which test_lifecycle checks on both).
@pytest.mark.drivers("systemd")
def test_pause_and_unpause_freeze_the_cgroup(pods: GuestPods) -> None:
    cid = pods.create(pods.run("pause"), "frozen", ["sleep", "300"])
    cg = pods.cgroup_dir(cid)
    assert status_api(pods, "POST", f"/pause/{cid}")["state"] == "paused"
    assert cgroup_file(cg, "cgroup.freeze") == "1"
    wait_for("frozen", lambda: flat_keyed(cg, "cgroup.events")["frozen"] == 1)
    assert status_api(pods, "GET", f"/containers/{cid}")["state"] == "paused"
    status_api(pods, "POST", f"/unpause/{cid}")
    assert cgroup_file(cg, "cgroup.freeze") == "0"
    assert flat_keyed(cg, "cgroup.events")["frozen"] == 0
    assert pods.exec(cid, "echo", "thawed").stdout == b"thawed\n"


# One driver: the namespace's root is the container's cgroup, wherever the driver put it
# (test_crun checks that root with crun on both drivers).
@pytest.mark.drivers("systemd")
def test_a_private_cgroup_namespace(pods: GuestPods) -> None:
    cid = pods.create(pods.run("cgns"), "cgns", ["sleep", "300"])
    assert pods.exec(cid, "cat", "/proc/self/cgroup").stdout == b"0::/\n"
    # its own cgroup is the root it sees: the same limits as outside
    pods.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(memory_limit_in_bytes=48 * MiB)))
    assert pods.exec(cid, "cat", "/sys/fs/cgroup/memory.max").stdout == b"%d\n" % (48 * MiB)


# One driver: the mount's options come from the spec, not from the driver.
@pytest.mark.drivers("cgroupfs")
def test_sys_fs_cgroup_is_read_only_unless_privileged(pods: GuestPods) -> None:
    plain = pods.create(pods.run("plain"), "plain", ["sleep", "300"])
    mounts = pods.exec(plain, "grep", " /sys/fs/cgroup ", "/proc/mounts").stdout.split()
    assert mounts[2] == b"cgroup2" and mounts[3].split(b",")[0] == b"ro"
    denied = pods.exec(plain, "mkdir", "/sys/fs/cgroup/escape")
    assert denied.exit_code != 0 and b"Read-only file system" in denied.stderr

    security = pb.LinuxContainerSecurityContext(privileged=True)
    privileged = pods.create(pods.run("priv", privileged=True), "priv", ["sleep", "300"],
                             security_context=security)
    mounts = pods.exec(privileged, "grep", " /sys/fs/cgroup ", "/proc/mounts").stdout.split()
    assert mounts[2] == b"cgroup2" and mounts[3].split(b",")[0] == b"rw"
