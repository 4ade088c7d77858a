"""ListPodSandboxMetrics on this host's cgroup v1: every cadvisor measure of a container
that does direct I/O, is CPU-throttled, hits its memory limit and holds files and a
socket open (tests/support/podmetrics.py)."""

from __future__ import annotations

import json
from pathlib import Path

from cripy.api import api_pb2 as pb
from tests.support.podmetrics import (
    PIDS_MAX,
    SWAP_LIMIT,
    check_metrics,
    container_metrics,
    device_numbers,
    exercise,
    loop_device,
    start_busy_container,
)
from tests.support.pods import Pods

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Those the kubelet's cadvisor set has and cripy once lacked.
NEW_METRICS = {
    "container_blkio_device_usage_total", "container_cpu_cfs_periods_total",
    "container_cpu_cfs_throttled_periods_total", "container_cpu_cfs_throttled_seconds_total",
    "container_file_descriptors", "container_fs_reads_bytes_total", "container_fs_reads_total",
    "container_fs_writes_bytes_total", "container_fs_writes_total", "container_memory_failcnt",
    "container_memory_kernel_usage", "container_memory_mapped_file",
    "container_memory_max_usage_bytes", "container_sockets",
    "container_spec_memory_swap_limit_bytes", "container_threads_max",
}


def v1_dir(pid: int, controller: str) -> Path:
    """The process's cgroup of a v1 controller, as /proc/PID/cgroup tells."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return CGROUP_ROOT / controllers / path.lstrip("/")
    raise AssertionError(f"process {pid} has no {controller} cgroup")


def test_every_cadvisor_measure_of_a_busy_container(pods: Pods, tmp_path: Path) -> None:
    with loop_device(tmp_path) as loop:
        pod_id = pods.run("metrics-busy")
        try:
            cid = start_busy_container(pods, pod_id, loop)
            pid = int(json.loads(pods.status(cid, verbose=True).info["info"])["pid"])
            # The kubelet sets pids.max on pod cgroups; here the container's own.
            (v1_dir(pid, "pids") / "pids.max").write_text(f"{PIDS_MAX}\n")
            # Kernels since 6.9 keep v1 blkio throttle counters only for devices that had a
            # throttle rule: a limit no I/O here reaches turns them on for the loop device.
            major, minor = device_numbers(loop)
            (v1_dir(pid, "blkio") / "blkio.throttle.read_bps_device").write_text(
                f"{major}:{minor} {1 << 40}\n")
            exercise(pods, cid)
            values = container_metrics(pods.runtime, pod_id, cid)
            assert {key[0] for key in values} >= NEW_METRICS
            check_metrics(values, loop, swap_limit=SWAP_LIMIT,  # memsw: memory + swap
                          cgroup_v2=False)
        finally:
            pods.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                        timeout=60)
