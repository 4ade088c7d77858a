"""Container and pod stats and the kubelet's metrics, from a real daemon's real cgroups,
network namespaces and writable layers."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.pods import (
    Pods,
    container_config,
)

T = TypeVar("T")
MiB = 1024 * 1024
# 16 MB held in a shell variable, then one core kept busy.
BURNER = ["sh", "-c", "x=$(yes | head -c 16000000); while :; do :; done"]
SLEEPER = ["sleep", "3600"]
CADVISOR_METRICS = {
    "container_cpu_usage_seconds_total", "container_cpu_user_seconds_total",
    "container_cpu_system_seconds_total", "container_memory_usage_bytes",
    "container_memory_working_set_bytes", "container_memory_rss", "container_memory_cache",
    "container_memory_failures_total", "container_fs_usage_bytes",
    "container_network_receive_bytes_total", "container_network_transmit_bytes_total",
    "container_network_receive_packets_total", "container_network_transmit_packets_total",
    "container_network_receive_errors_total", "container_network_transmit_errors_total",
    "container_processes", "container_threads", "container_last_seen",
    "container_start_time_seconds", "container_spec_memory_limit_bytes",
}


def wait_for(probe: Callable[[], T | None], what: str, within: float = 30) -> T:
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def rpc_error(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=60)
    return info.value


def start(pods: Pods, pod_id: str, name: str, command: list[str],
          labels: dict[str, str] | None = None) -> str:
    config = container_config(name, pods.node.image, command)
    config.labels.update(labels or {})
    cid: str = pods.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pods.config(pod_id)),
        timeout=60).container_id
    pods.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    return cid


def container_stats(daemon: Daemon, cid: str) -> pb.ContainerStats:
    stats: pb.ContainerStats = daemon.runtime.ContainerStats(
        pb.ContainerStatsRequest(container_id=cid), timeout=30).stats
    return stats


def pod_stats(daemon: Daemon, pod_id: str) -> pb.PodSandboxStats:
    stats: pb.PodSandboxStats = daemon.runtime.PodSandboxStats(
        pb.PodSandboxStatsRequest(pod_sandbox_id=pod_id), timeout=30).stats
    return stats


def pod_ip(pods: Pods, pod_id: str) -> str:
    status = pods.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    return str(status.status.network.ip)


def ping(ip: str, count: int = 3, size: int = 1000) -> None:
    subprocess.run(["ping", "-c", str(count), "-i", "0.2", "-s", str(size), "-W", "2", ip],
                   check=True, capture_output=True, timeout=30)


# --- ContainerStats / ListContainerStats --------------------------------------------------


def test_a_busy_container_shows_cpu_memory_processes_and_its_writable_layer(
        pods: Pods) -> None:
    daemon = pods.node.daemon
    pod_id = pods.run("stats-busy")
    cid = start(pods, pod_id, "burner", BURNER, labels={"role": "burner"})

    def allocated() -> pb.ContainerStats | None:
        stats = container_stats(daemon, cid)
        return stats if stats.memory.working_set_bytes.value >= 16_000_000 else None

    wait_for(allocated, "the burner's 16 MB working set")
    first = container_stats(daemon, cid)
    time.sleep(1.5)
    second = container_stats(daemon, cid)
    assert second.attributes.id == cid
    assert second.attributes.metadata.name == "burner"
    assert second.attributes.labels["role"] == "burner"
    assert second.cpu.timestamp > first.cpu.timestamp
    used = second.cpu.usage_core_nano_seconds.value - first.cpu.usage_core_nano_seconds.value
    assert used > 300_000_000, f"only {used} ns of CPU in 1.5 s of a busy loop"
    assert second.cpu.HasField("usage_nano_cores")
    assert second.cpu.usage_nano_cores.value > 200_000_000
    memory = second.memory
    assert memory.timestamp > 0
    assert memory.working_set_bytes.value >= 16_000_000
    assert memory.usage_bytes.value >= memory.working_set_bytes.value
    assert memory.rss_bytes.value > 0
    assert memory.page_faults.value > 0

    # The pod (its own cgroup parent here) holds the container's processes and usage.
    pod = pod_stats(daemon, pod_id).linux
    assert pod.process.process_count.value >= 1
    assert pod.cpu.usage_core_nano_seconds.value >= second.cpu.usage_core_nano_seconds.value
    assert pod.memory.working_set_bytes.value >= 16_000_000
    assert [c.attributes.id for c in pod.containers] == [cid]

    # Writing 1 MiB grows the writable layer (usage is re-measured every few seconds).
    layer = second.writable_layer
    assert layer.fs_id.mountpoint == str(daemon.root / "containers")
    before, inodes = layer.used_bytes.value, layer.inodes_used.value
    result = pods.exec(cid, "dd", "if=/dev/zero", "of=/one-mib", "bs=1048576", "count=1")
    assert result.exit_code == 0, result.stderr

    def grown() -> pb.FilesystemUsage | None:
        now = container_stats(daemon, cid).writable_layer
        return now if now.used_bytes.value >= before + MiB else None

    after = wait_for(grown, "the writable layer to grow by 1 MiB", within=15)
    assert after.inodes_used.value > inodes
    assert after.timestamp > layer.timestamp


def test_list_container_stats_filters(pods: Pods) -> None:
    daemon = pods.node.daemon
    pod_a, pod_b = pods.run("stats-a"), pods.run("stats-b")
    a = start(pods, pod_a, "a", SLEEPER, labels={"app": "a"})
    b = start(pods, pod_b, "b", SLEEPER, labels={"app": "b"})

    def ids(**flt: Any) -> set[str]:
        request = pb.ListContainerStatsRequest(filter=pb.ContainerStatsFilter(**flt))
        stats = daemon.runtime.ListContainerStats(request, timeout=30).stats
        assert all(s.memory.working_set_bytes.value > 0 for s in stats if s.HasField("memory"))
        return {s.attributes.id for s in stats}

    assert {a, b} <= ids()
    assert ids(id=a[:12]) == {a}
    assert ids(pod_sandbox_id=pod_b) == {b}
    assert ids(label_selector={"app": "a"}) == {a}
    assert ids(label_selector={"app": "a"}, pod_sandbox_id=pod_b) == set()
    assert ids(label_selector={"app": "none"}) == set()
    every = daemon.runtime.ListContainerStats(pb.ListContainerStatsRequest(), timeout=30).stats
    assert {a, b} <= {s.attributes.id for s in every}

    # Exited containers are listed, with their writable layer but no cgroup counters.
    pods.runtime.StopContainer(pb.StopContainerRequest(container_id=b, timeout=0))
    stopped = container_stats(daemon, b)
    assert not stopped.HasField("cpu") and not stopped.HasField("memory")
    assert stopped.HasField("writable_layer")

    err = rpc_error(daemon.runtime.ContainerStats,
                    pb.ContainerStatsRequest(container_id="f" * 64))
    assert err.code() == grpc.StatusCode.NOT_FOUND


# --- PodSandboxStats / ListPodSandboxStats ------------------------------------------------


def test_pod_stats_count_network_traffic(pods: Pods) -> None:
    daemon = pods.node.daemon
    pod_id = pods.run("stats-net", labels={"stats": "net"})
    cid = start(pods, pod_id, "sleeper", SLEEPER)
    ip = pod_ip(pods, pod_id)
    assert ip.startswith("10.216.1.")

    before = pod_stats(daemon, pod_id)
    assert before.attributes.id == pod_id
    assert before.attributes.metadata.name == "stats-net"
    assert before.attributes.labels["stats"] == "net"
    ping(ip, count=3, size=1000)
    after = pod_stats(daemon, pod_id)

    network = after.linux.network
    assert network.timestamp > before.linux.network.timestamp
    assert network.default_interface.name == "eth0"
    rx = network.default_interface.rx_bytes.value - \
        before.linux.network.default_interface.rx_bytes.value
    tx = network.default_interface.tx_bytes.value - \
        before.linux.network.default_interface.tx_bytes.value
    assert rx >= 3 * 1000 and tx >= 3 * 1000, (rx, tx)  # the requests in, the replies out
    names = [i.name for i in network.interfaces]
    assert "eth0" in names and "lo" not in names
    assert after.linux.process.process_count.value >= 1
    assert after.linux.memory.working_set_bytes.value > 0
    assert [c.attributes.id for c in after.linux.containers] == [cid]

    def ids(**flt: Any) -> set[str]:
        request = pb.ListPodSandboxStatsRequest(filter=pb.PodSandboxStatsFilter(**flt))
        return {s.attributes.id for s in daemon.runtime.ListPodSandboxStats(request).stats}

    assert pod_id in ids()
    assert ids(id=pod_id[:12]) == {pod_id}
    assert ids(label_selector={"stats": "net"}) == {pod_id}
    assert ids(label_selector={"stats": "none"}) == set()
    listed = daemon.runtime.ListPodSandboxStats(pb.ListPodSandboxStatsRequest()).stats
    mine = next(s for s in listed if s.attributes.id == pod_id)
    assert mine.linux.network.default_interface.rx_bytes.value >= \
        network.default_interface.rx_bytes.value

    err = rpc_error(daemon.runtime.PodSandboxStats,
                    pb.PodSandboxStatsRequest(pod_sandbox_id="f" * 64))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    # A stopped pod still answers, without the counters of what is gone.
    pods.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    stopped = pod_stats(daemon, pod_id)
    assert not stopped.linux.HasField("network") and not stopped.linux.HasField("cpu")


# --- ListMetricDescriptors / ListPodSandboxMetrics ----------------------------------------


def test_metrics_for_the_kubelet(pods: Pods) -> None:
    daemon = pods.node.daemon
    pod_id = pods.run("stats-metrics")
    cid = start(pods, pod_id, "sleeper", SLEEPER)
    ping(pod_ip(pods, pod_id), count=2, size=500)

    descriptors = {d.name: list(d.label_keys) for d in daemon.runtime.ListMetricDescriptors(
        pb.ListMetricDescriptorsRequest(), timeout=30).descriptors}
    assert set(descriptors) >= CADVISOR_METRICS, CADVISOR_METRICS - set(descriptors)
    for keys in descriptors.values():
        assert keys[:6] == ["container", "id", "image", "name", "namespace", "pod"]
    assert descriptors["container_network_receive_bytes_total"][6:] == ["interface"]

    response = daemon.runtime.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest(),
                                                    timeout=30)
    pod = next(m for m in response.pod_metrics if m.pod_sandbox_id == pod_id)
    every = [*pod.metrics, *(m for c in pod.container_metrics for m in c.metrics)]
    for metric in every:  # what the kubelet turns into Prometheus samples
        assert metric.name in descriptors
        assert len(metric.label_values) == len(descriptors[metric.name]), metric.name
        assert metric.timestamp > 0
        assert metric.metric_type in (pb.COUNTER, pb.GAUGE)

    network = {(m.name, m.label_values[6]): m for m in pod.metrics}
    received = network[("container_network_receive_bytes_total", "eth0")]
    assert received.value.value > 0 and received.metric_type == pb.COUNTER
    assert network[("container_network_transmit_bytes_total", "eth0")].value.value > 0
    labels = dict(zip(descriptors[received.name], received.label_values, strict=True))
    assert labels["pod"] == "stats-metrics" and labels["namespace"] == "cripy-test"
    assert labels["id"] == pod_id

    container = next(c for c in pod.container_metrics if c.container_id == cid)
    values = {m.name: m for m in container.metrics}
    assert values["container_memory_working_set_bytes"].value.value > 0
    assert values["container_memory_working_set_bytes"].metric_type == pb.GAUGE
    assert values["container_memory_usage_bytes"].value.value > 0
    assert values["container_threads"].value.value >= 1
    assert values["container_processes"].value.value >= 1
    assert "container_fs_usage_bytes" in values
    assert values["container_start_time_seconds"].value.value > 1_600_000_000
    labels = dict(zip(descriptors["container_memory_rss"],
                      values["container_memory_rss"].label_values, strict=True))
    assert labels["name"].startswith("k8s_sleeper_stats-metrics_cripy-test_")
    del labels["name"]
    assert labels == {"container": "sleeper", "id": cid, "image": pods.node.image,
                      "namespace": "cripy-test", "pod": "stats-metrics"}
