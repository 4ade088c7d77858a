"""Container and pod stats, and cadvisor-style metrics for the kubelet: the samples
cripy.runtime.usage collects, as CRI messages."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cripy.api import api_pb2 as pb
from cripy.runtime.stats import CgroupStats, InterfaceStats, Pressure, PressureLine
from cripy.runtime.usage import ContainerSample, PodSample, StatsCollector
from cripy.server.rpc import Context, rpc

log = logging.getLogger(__name__)

DEFAULT_INTERFACE = "eth0"  # what CNI is asked to name the pod's interface


# --- CRI messages -------------------------------------------------------------------------


def _u64(value: int) -> pb.UInt64Value:
    return pb.UInt64Value(value=max(value, 0))


def _psi_data(line: PressureLine) -> pb.PsiData:
    return pb.PsiData(Total=line.total_ns, Avg10=line.avg10, Avg60=line.avg60,
                      Avg300=line.avg300)


def _psi(pressure: Pressure) -> pb.PsiStats:
    psi = pb.PsiStats(Some=_psi_data(pressure.some))
    if pressure.full is not None:
        psi.Full.CopyFrom(_psi_data(pressure.full))
    return psi


def _cpu(stats: CgroupStats, rate: int | None) -> pb.CpuUsage:
    cpu = pb.CpuUsage(timestamp=stats.timestamp_ns,
                      usage_core_nano_seconds=_u64(stats.cpu_usage_ns))
    if rate is not None:
        cpu.usage_nano_cores.CopyFrom(_u64(rate))
    if stats.cpu_pressure is not None:
        cpu.psi.CopyFrom(_psi(stats.cpu_pressure))
    return cpu


def _io(stats: CgroupStats) -> pb.IoUsage | None:
    if stats.io_pressure is None:
        return None
    return pb.IoUsage(timestamp=stats.timestamp_ns, psi=_psi(stats.io_pressure))


def _memory(stats: CgroupStats) -> pb.MemoryUsage:
    memory = pb.MemoryUsage(
        timestamp=stats.timestamp_ns, working_set_bytes=_u64(stats.memory_working_set),
        usage_bytes=_u64(stats.memory_usage), rss_bytes=_u64(stats.memory_rss),
        page_faults=_u64(stats.page_faults), major_page_faults=_u64(stats.major_page_faults))
    available = stats.memory_available
    if available is not None:
        memory.available_bytes.CopyFrom(_u64(available))
    if stats.memory_pressure is not None:
        memory.psi.CopyFrom(_psi(stats.memory_pressure))
    return memory


def _container_stats(sample: ContainerSample) -> pb.ContainerStats:
    ref, layer = sample.ref, sample.layer
    out = pb.ContainerStats(
        attributes=ref.attributes,
        writable_layer=pb.FilesystemUsage(
            timestamp=layer.timestamp_ns, fs_id=pb.FilesystemIdentifier(mountpoint=ref.mountpoint),
            used_bytes=_u64(layer.used_bytes), inodes_used=_u64(layer.inodes_used)),
    )
    stats = sample.cgroup
    if stats is not None:
        out.cpu.CopyFrom(_cpu(stats, sample.cpu_rate))
        out.memory.CopyFrom(_memory(stats))
        io = _io(stats)
        if io is not None:
            out.io.CopyFrom(io)
        if stats.swap_usage is not None:
            out.swap.timestamp = stats.timestamp_ns
            out.swap.swap_usage_bytes.value = stats.swap_usage
            if stats.swap_limit is not None:
                out.swap.swap_available_bytes.value = max(stats.swap_limit - stats.swap_usage, 0)
    return out


def _interface(stats: InterfaceStats) -> pb.NetworkInterfaceUsage:
    return pb.NetworkInterfaceUsage(
        name=stats.name, rx_bytes=_u64(stats.rx_bytes), rx_errors=_u64(stats.rx_errors),
        tx_bytes=_u64(stats.tx_bytes), tx_errors=_u64(stats.tx_errors))


def _pod_stats(sample: PodSample) -> pb.PodSandboxStats:
    ref = sample.ref
    linux = pb.LinuxPodSandboxStats(containers=[_container_stats(c) for c in sample.containers])
    stats = sample.cgroup
    if stats is not None:
        linux.cpu.CopyFrom(_cpu(stats, sample.cpu_rate))
        linux.memory.CopyFrom(_memory(stats))
        io = _io(stats)
        if io is not None:
            linux.io.CopyFrom(io)
        linux.process.CopyFrom(pb.ProcessUsage(timestamp=stats.timestamp_ns,
                                               process_count=_u64(stats.pids)))
    if sample.network is not None:
        interfaces = [i for name, i in sorted(sample.network.items()) if name != "lo"]
        linux.network.timestamp = sample.network_ts
        linux.network.interfaces.extend(_interface(i) for i in interfaces)
        default = sample.network.get(DEFAULT_INTERFACE) or (interfaces[0] if interfaces
                                                            else None)
        if default is not None:
            linux.network.default_interface.CopyFrom(_interface(default))
    return pb.PodSandboxStats(attributes=ref.attributes, linux=linux)


# --- metrics ------------------------------------------------------------------------------

# cadvisor's labels as the kubelet's /metrics/cadvisor shows them.
BASE_LABELS = ("container", "id", "image", "name", "namespace", "pod")
COUNTER, GAUGE = pb.COUNTER, pb.GAUGE


@dataclass(frozen=True)
class MetricSpec:
    name: str
    help: str
    kind: pb.MetricType
    extra_labels: tuple[str, ...] = ()

    @property
    def descriptor(self) -> pb.MetricDescriptor:
        return pb.MetricDescriptor(name=self.name, help=self.help,
                                   label_keys=[*BASE_LABELS, *self.extra_labels])


_NET = ("interface",)
METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("container_cpu_usage_seconds_total",
               "Cumulative cpu time consumed in seconds.", COUNTER, ("cpu",)),
    MetricSpec("container_cpu_user_seconds_total",
               "Cumulative user cpu time consumed in seconds.", COUNTER),
    MetricSpec("container_cpu_system_seconds_total",
               "Cumulative system cpu time consumed in seconds.", COUNTER),
    MetricSpec("container_memory_usage_bytes",
               "Current memory usage in bytes, including all memory regardless of when it "
               "was accessed.", GAUGE),
    MetricSpec("container_memory_working_set_bytes", "Current working set in bytes.", GAUGE),
    MetricSpec("container_memory_rss", "Size of RSS in bytes.", GAUGE),
    MetricSpec("container_memory_cache", "Number of bytes of page cache memory.", GAUGE),
    MetricSpec("container_memory_swap", "Container swap usage in bytes.", GAUGE),
    MetricSpec("container_memory_failures_total",
               "Cumulative count of memory allocation failures.", COUNTER,
               ("failure_type", "scope")),
    MetricSpec("container_oom_events_total",
               "Count of out of memory events observed for the container.", COUNTER),
    MetricSpec("container_processes", "Number of processes running inside the container.",
               GAUGE),
    MetricSpec("container_threads", "Number of threads running inside the container.",
               GAUGE),
    MetricSpec("container_fs_usage_bytes",
               "Number of bytes that are consumed by the container on this filesystem.",
               GAUGE),
    MetricSpec("container_fs_limit_bytes",
               "Number of bytes that can be consumed by the container on this filesystem.",
               GAUGE),
    MetricSpec("container_fs_inodes_total", "Number of inodes.", GAUGE),
    MetricSpec("container_fs_inodes_free", "Number of available inodes.", GAUGE),
    MetricSpec("container_spec_memory_limit_bytes", "Memory limit for the container.", GAUGE),
    MetricSpec("container_spec_cpu_shares", "CPU share of the container.", GAUGE),
    MetricSpec("container_spec_cpu_quota", "CPU quota of the container.", GAUGE),
    MetricSpec("container_spec_cpu_period", "CPU period of the container.", GAUGE),
    MetricSpec("container_start_time_seconds",
               "Start time of the container since unix epoch in seconds.", GAUGE),
    MetricSpec("container_last_seen", "Last time a container was seen by the exporter.", GAUGE),
    MetricSpec("container_network_receive_bytes_total",
               "Cumulative count of bytes received.", COUNTER, _NET),
    MetricSpec("container_network_receive_packets_total",
               "Cumulative count of packets received.", COUNTER, _NET),
    MetricSpec("container_network_receive_packets_dropped_total",
               "Cumulative count of packets dropped while receiving.", COUNTER, _NET),
    MetricSpec("container_network_receive_errors_total",
               "Cumulative count of errors encountered while receiving.", COUNTER, _NET),
    MetricSpec("container_network_transmit_bytes_total",
               "Cumulative count of bytes transmitted.", COUNTER, _NET),
    MetricSpec("container_network_transmit_packets_total",
               "Cumulative count of packets transmitted.", COUNTER, _NET),
    MetricSpec("container_network_transmit_packets_dropped_total",
               "Cumulative count of packets dropped while transmitting.", COUNTER, _NET),
    MetricSpec("container_network_transmit_errors_total",
               "Cumulative count of errors encountered while transmitting.", COUNTER, _NET),
)}

_NETWORK_FIELDS: tuple[tuple[str, Callable[[InterfaceStats], int]], ...] = (
    ("container_network_receive_bytes_total", lambda i: i.rx_bytes),
    ("container_network_receive_packets_total", lambda i: i.rx_packets),
    ("container_network_receive_packets_dropped_total", lambda i: i.rx_dropped),
    ("container_network_receive_errors_total", lambda i: i.rx_errors),
    ("container_network_transmit_bytes_total", lambda i: i.tx_bytes),
    ("container_network_transmit_packets_total", lambda i: i.tx_packets),
    ("container_network_transmit_packets_dropped_total", lambda i: i.tx_dropped),
    ("container_network_transmit_errors_total", lambda i: i.tx_errors),
)


class _Metrics:
    """Collects Metric messages for one object, checking names and label counts."""

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.items: list[pb.Metric] = []

    def add(self, name: str, value: int, timestamp: int, *extra: str) -> None:
        spec = METRICS[name]
        assert len(extra) == len(spec.extra_labels), name
        self.items.append(pb.Metric(name=name, timestamp=timestamp, metric_type=spec.kind,
                                    label_values=[*self.labels, *extra], value=_u64(value)))


def _container_metrics(sample: ContainerSample, now: int) -> pb.ContainerMetrics:
    ref, stats, layer = sample.ref, sample.cgroup, sample.layer
    m = _Metrics(ref.labels)
    if stats is not None:
        ts = stats.timestamp_ns
        m.add("container_cpu_usage_seconds_total", stats.cpu_usage_ns // 10**9, ts, "total")
        m.add("container_cpu_user_seconds_total", stats.cpu_user_ns // 10**9, ts)
        m.add("container_cpu_system_seconds_total", stats.cpu_system_ns // 10**9, ts)
        m.add("container_memory_usage_bytes", stats.memory_usage, ts)
        m.add("container_memory_working_set_bytes", stats.memory_working_set, ts)
        m.add("container_memory_rss", stats.memory_rss, ts)
        m.add("container_memory_cache", stats.memory_cache, ts)
        if stats.swap_usage is not None:
            m.add("container_memory_swap", stats.swap_usage, ts)
        for kind, value in (("pgfault", stats.page_faults),
                            ("pgmajfault", stats.major_page_faults)):
            for scope in ("container", "hierarchy"):
                m.add("container_memory_failures_total", value, ts, kind, scope)
        m.add("container_oom_events_total", stats.oom_kills, ts)
        m.add("container_processes", stats.processes, ts)
        m.add("container_threads", stats.pids, ts)
    m.add("container_fs_usage_bytes", layer.used_bytes, layer.timestamp_ns)
    if sample.fs is not None:
        fs = sample.fs
        m.add("container_fs_limit_bytes", fs.f_blocks * fs.f_frsize, now)
        m.add("container_fs_inodes_total", fs.f_files, now)
        m.add("container_fs_inodes_free", fs.f_ffree, now)
    res = ref.resources
    m.add("container_spec_memory_limit_bytes", res.memory_limit_in_bytes, now)
    m.add("container_spec_cpu_shares", res.cpu_shares, now)
    m.add("container_spec_cpu_quota", res.cpu_quota, now)
    m.add("container_spec_cpu_period", res.cpu_period, now)
    if ref.started_at:
        m.add("container_start_time_seconds", ref.started_at // 10**9, now)
    m.add("container_last_seen", now // 10**9, now)
    return pb.ContainerMetrics(container_id=ref.id, metrics=m.items)


def _pod_metrics(sample: PodSample) -> pb.PodSandboxMetrics:
    now = time.time_ns()
    m = _Metrics(sample.ref.labels)
    for name, stats in sorted((sample.network or {}).items()):
        if name == "lo":  # cadvisor leaves loopback out too
            continue
        for metric, value in _NETWORK_FIELDS:
            m.add(metric, value(stats), sample.network_ts, name)
    return pb.PodSandboxMetrics(
        pod_sandbox_id=sample.ref.id, metrics=m.items,
        # cadvisor shows only live containers: those with a cgroup
        container_metrics=[_container_metrics(c, now) for c in sample.containers
                           if c.cgroup is not None])


# --- the RPCs -----------------------------------------------------------------------------


class StatsRpcs:
    stats: StatsCollector

    @rpc
    async def ContainerStats(
        self, request: pb.ContainerStatsRequest, context: Context
    ) -> pb.ContainerStatsResponse:
        sample = await self.stats.container(request.container_id)
        return pb.ContainerStatsResponse(stats=_container_stats(sample))

    @rpc
    async def ListContainerStats(
        self, request: pb.ListContainerStatsRequest, context: Context
    ) -> pb.ListContainerStatsResponse:
        flt = request.filter
        samples = await self.stats.containers_matching(pb.ContainerFilter(
            id=flt.id, pod_sandbox_id=flt.pod_sandbox_id, label_selector=flt.label_selector))
        return pb.ListContainerStatsResponse(stats=[_container_stats(s) for s in samples])

    @rpc
    async def PodSandboxStats(
        self, request: pb.PodSandboxStatsRequest, context: Context
    ) -> pb.PodSandboxStatsResponse:
        sample = await self.stats.pod(request.pod_sandbox_id)
        return pb.PodSandboxStatsResponse(stats=_pod_stats(sample))

    @rpc
    async def ListPodSandboxStats(
        self, request: pb.ListPodSandboxStatsRequest, context: Context
    ) -> pb.ListPodSandboxStatsResponse:
        flt = request.filter
        samples = await self.stats.pods_matching(
            pb.PodSandboxFilter(id=flt.id, label_selector=flt.label_selector))
        return pb.ListPodSandboxStatsResponse(stats=[_pod_stats(s) for s in samples])

    @rpc
    async def ListMetricDescriptors(
        self, request: pb.ListMetricDescriptorsRequest, context: Context
    ) -> pb.ListMetricDescriptorsResponse:
        return pb.ListMetricDescriptorsResponse(
            descriptors=[m.descriptor for m in METRICS.values()])

    @rpc
    async def ListPodSandboxMetrics(
        self, request: pb.ListPodSandboxMetricsRequest, context: Context
    ) -> pb.ListPodSandboxMetricsResponse:
        samples = await self.stats.pods_matching(None, with_fs_info=True)
        return pb.ListPodSandboxMetricsResponse(pod_metrics=[_pod_metrics(s) for s in samples])


# --- ImageFsInfo --------------------------------------------------------------------------


async def container_filesystems(stats: StatsCollector) -> list[pb.FilesystemUsage]:
    """ImageFsInfo's container_filesystems: all writable layers, on `<root>/containers`."""
    usages = await stats.writable_layers()
    return [pb.FilesystemUsage(
        timestamp=time.time_ns(),
        fs_id=pb.FilesystemIdentifier(mountpoint=str(stats.containers.layers_root)),
        used_bytes=_u64(sum(u.used_bytes for u in usages)),
        inodes_used=_u64(sum(u.inodes_used for u in usages)),
    )]
