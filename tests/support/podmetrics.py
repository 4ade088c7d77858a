"""A container that does what every cadvisor metric measures, for the host's (cgroup v1)
and the VM's (cgroup v2) metrics checks: direct I/O on a loop device of its own, CPU
throttled by a quota, page cache beyond its memory limit, a private mapped binary, open
files and a listening socket."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cripy.api import api_pb2 as pb
from tests.support.pods import Pods, container_config

MiB = 1024 * 1024
MEMORY_LIMIT = 32 * MiB
SWAP_LIMIT = 64 * MiB  # the CRI's memory + swap
CPU_QUOTA, CPU_PERIOD = 20_000, 100_000  # a fifth of a core
DISK = "/dev/testdisk"
PIDS_MAX = 100
#: A private copy of busybox (its pages are this container's), sleeping with two files
#: open besides stdio, and nc listening on a TCP socket.
RESOURCES = pb.LinuxContainerResources(
    memory_limit_in_bytes=MEMORY_LIMIT, memory_swap_limit_in_bytes=SWAP_LIMIT,
    cpu_quota=CPU_QUOTA, cpu_period=CPU_PERIOD)
COMMAND = ["sh", "-c", "cp /bin/busybox /busybox && exec /busybox sh -c 'exec 3</etc/hostname "
           "4</etc/hostname; /busybox nc -l -p 8080 & exec /busybox sleep 3600'"]


@contextmanager
def loop_device(directory: Path, size: int = 64 * MiB) -> Iterator[str]:
    """A loop device over a file in `directory`; detached afterwards."""
    backing = directory / "loop.img"
    with backing.open("wb") as f:
        f.truncate(size)
    device = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                            capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=30)
        backing.unlink()


def device_numbers(device: str) -> tuple[int, int]:
    major, minor = Path(f"/sys/class/block/{Path(device).name}/dev").read_text().split(":")
    return int(major), int(minor)


def start_busy_container(pods: Pods, pod_id: str, loop: str) -> str:
    """The busy container in `pod_id`, with `loop` as /dev/testdisk; started."""
    config = container_config("busy", pods.node.image, COMMAND, resources=RESOURCES)
    config.devices.append(pb.Device(container_path=DISK, host_path=loop, permissions="rw"))
    cid: str = pods.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pods.config(pod_id)),
        timeout=60).container_id
    pods.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    return cid


def exercise(pods: Pods, cid: str) -> None:
    """Direct I/O of 4 MiB each way, 48 MiB of page cache against the 32 MiB limit, 3 s of
    a busy loop under the quota."""
    listening = ("for i in $(seq 100); do netstat -ltn | grep -q :8080 && exit 0; "
                 "usleep 100000; done; exit 1")
    for cmd in (["sh", "-c", listening],
                ["dd", "if=/dev/zero", f"of={DISK}", "bs=1048576", "count=4", "oflag=direct"],
                ["dd", f"if={DISK}", "of=/dev/null", "bs=1048576", "count=4", "iflag=direct"],
                # buffered: the device's page cache, clean and reclaimable (a file in the
                # writable layer would be shmem where the layers are on tmpfs, as in the VM)
                ["dd", f"if={DISK}", "of=/dev/null", "bs=1048576", "count=48"],
                ["timeout", "3", "sh", "-c", "while :; do :; done"]):
        result = pods.exec(cid, *cmd, timeout=30)
        busy_loop_ended = cmd[0] == "timeout" and result.exit_code in (124, 143)
        assert result.exit_code == 0 or busy_loop_ended, (cmd, result.stderr)


def container_metrics(runtime: Any, pod_id: str, cid: str) -> dict[tuple[str, ...], int]:
    """(name, *extra label values) -> value of the container's metrics, checked against
    the descriptors (label counts, metric types)."""
    descriptors = {d.name: d for d in runtime.ListMetricDescriptors(
        pb.ListMetricDescriptorsRequest(), timeout=30).descriptors}
    response = runtime.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest(), timeout=30)
    pod = next(p for p in response.pod_metrics if p.pod_sandbox_id == pod_id)
    container = next(c for c in pod.container_metrics if c.container_id == cid)
    values: dict[tuple[str, ...], int] = {}
    for metric in container.metrics:
        keys = list(descriptors[metric.name].label_keys)
        assert len(metric.label_values) == len(keys), metric.name
        assert metric.label_values[1] == cid
        values[(metric.name, *metric.label_values[6:])] = metric.value.value
    return values


def check_metrics(values: dict[tuple[str, ...], int], loop: str, *,
                  swap_limit: int, cgroup_v2: bool) -> None:
    """What the busy container's metrics must show after exercise()."""
    disk = f"/dev/{Path(loop).name}"
    assert values[("container_fs_writes_bytes_total", disk)] >= 4 * MiB
    assert values[("container_fs_reads_bytes_total", disk)] >= 4 * MiB
    assert values[("container_fs_writes_total", disk)] >= 1
    assert values[("container_fs_reads_total", disk)] >= 1
    major, minor = device_numbers(loop)
    usage = {op: v for (name, *labels), v in values.items()
             if name == "container_blkio_device_usage_total"
             and labels[:3] == [disk, str(major), str(minor)] for op in labels[3:]}
    assert usage["Write"] >= 4 * MiB and usage["Read"] >= 4 * MiB
    assert values[("container_cpu_cfs_periods_total",)] >= 10
    assert values[("container_cpu_cfs_throttled_periods_total",)] >= 5
    assert values[("container_cpu_cfs_throttled_seconds_total",)] >= 1
    assert values[("container_memory_failcnt",)] > 0  # the page cache hit the limit
    assert 16 * MiB <= values[("container_memory_max_usage_bytes",)] <= MEMORY_LIMIT
    assert values[("container_memory_kernel_usage",)] > 0
    assert values[("container_memory_mapped_file",)] > 0  # /busybox
    assert values[("container_file_descriptors",)] >= 2 * 3 + 2  # sleep's and nc's
    assert values[("container_sockets",)] >= 1
    assert values[("container_threads_max",)] == PIDS_MAX
    assert values[("container_spec_memory_swap_limit_bytes",)] == swap_limit
    assert values[("container_spec_memory_reservation_limit_bytes",)] == 0  # none asked
    assert values[("container_ulimits_soft", "max_open_files")] >= 1024
    file_pages = values[("container_memory_total_active_file_bytes",)] + \
        values[("container_memory_total_inactive_file_bytes",)]
    # The copied busybox and the device's cache. In the VM the copy is on tmpfs (shmem) and
    # the cache was found reclaimed by the time of reading: only v1 is sure to have some.
    assert file_pages > 0 or cgroup_v2
    assert ("container_cpu_cfs_burst_periods_total",) in values
    pressure = {name for name, *_ in values if name.startswith("container_pressure_")}
    if cgroup_v2:  # PSI: the guest kernel has it on
        assert pressure >= {f"container_pressure_{kind}_waiting_seconds_total"
                            for kind in ("cpu", "memory", "io")}
        assert values[("container_pressure_cpu_waiting_seconds_total",)] >= 0
    else:
        assert pressure == set()  # cgroup v1 has no pressure files
