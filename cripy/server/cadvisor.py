"""The kubelet's cadvisor-style metrics (ListMetricDescriptors, ListPodSandboxMetrics):
cadvisor's metric names, help texts, label keys and types, from the samples
cripy.runtime.usage collects."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cripy.api import api_pb2 as pb
from cripy.runtime.cgroup_metrics import ExtraStats
from cripy.runtime.stats import InterfaceStats
from cripy.runtime.usage import ContainerSample, PodSample

# cadvisor's labels as the kubelet's /metrics/cadvisor shows them.
BASE_LABELS = ("container", "id", "image", "name", "namespace", "pod")
COUNTER, GAUGE = pb.COUNTER, pb.GAUGE
NS_PER_S = 1_000_000_000


def u64(value: int) -> pb.UInt64Value:
    return pb.UInt64Value(value=max(value, 0))


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
_DEV = ("device",)
METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("container_cpu_usage_seconds_total",
               "Cumulative cpu time consumed in seconds.", COUNTER, ("cpu",)),
    MetricSpec("container_cpu_user_seconds_total",
               "Cumulative user cpu time consumed in seconds.", COUNTER),
    MetricSpec("container_cpu_system_seconds_total",
               "Cumulative system cpu time consumed in seconds.", COUNTER),
    MetricSpec("container_cpu_cfs_periods_total",
               "Number of elapsed enforcement period intervals.", COUNTER),
    MetricSpec("container_cpu_cfs_throttled_periods_total",
               "Number of throttled period intervals.", COUNTER),
    MetricSpec("container_cpu_cfs_throttled_seconds_total",
               "Total time duration the container has been throttled.", COUNTER),
    MetricSpec("container_cpu_cfs_burst_periods_total",
               "Number of periods when burst occurs.", COUNTER),
    MetricSpec("container_cpu_cfs_burst_seconds_total",
               "Total time duration the container has been bursted.", COUNTER),
    MetricSpec("container_memory_usage_bytes",
               "Current memory usage in bytes, including all memory regardless of when it "
               "was accessed.", GAUGE),
    MetricSpec("container_memory_max_usage_bytes",
               "Maximum memory usage recorded in bytes", GAUGE),
    MetricSpec("container_memory_working_set_bytes", "Current working set in bytes.", GAUGE),
    MetricSpec("container_memory_rss", "Size of RSS in bytes.", GAUGE),
    MetricSpec("container_memory_cache", "Number of bytes of page cache memory.", GAUGE),
    MetricSpec("container_memory_kernel_usage",
               "Size of kernel memory allocated in bytes.", GAUGE),
    MetricSpec("container_memory_mapped_file",
               "Size of memory mapped files in bytes.", GAUGE),
    MetricSpec("container_memory_total_active_file_bytes",
               "Current total active file in bytes.", GAUGE),
    MetricSpec("container_memory_total_inactive_file_bytes",
               "Current total inactive file in bytes.", GAUGE),
    MetricSpec("container_memory_swap", "Container swap usage in bytes.", GAUGE),
    MetricSpec("container_memory_failcnt", "Number of memory usage hits limits", COUNTER),
    MetricSpec("container_memory_failures_total",
               "Cumulative count of memory allocation failures.", COUNTER,
               ("failure_type", "scope")),
    MetricSpec("container_oom_events_total",
               "Count of out of memory events observed for the container.", COUNTER),
    MetricSpec("container_processes", "Number of processes running inside the container.",
               GAUGE),
    MetricSpec("container_threads", "Number of threads running inside the container.",
               GAUGE),
    MetricSpec("container_threads_max",
               "Maximum number of threads allowed inside the container, infinity if value "
               "is zero", GAUGE),
    MetricSpec("container_file_descriptors",
               "Number of open file descriptors for the container.", GAUGE),
    MetricSpec("container_sockets", "Number of open sockets for the container.", GAUGE),
    MetricSpec("container_ulimits_soft",
               "Soft ulimit values for the container root process. Unlimited if -1, except "
               "priority and nice", GAUGE, ("ulimit",)),
    MetricSpec("container_fs_usage_bytes",
               "Number of bytes that are consumed by the container on this filesystem.",
               GAUGE),
    MetricSpec("container_fs_limit_bytes",
               "Number of bytes that can be consumed by the container on this filesystem.",
               GAUGE),
    MetricSpec("container_fs_inodes_total", "Number of inodes.", GAUGE),
    MetricSpec("container_fs_inodes_free", "Number of available inodes.", GAUGE),
    MetricSpec("container_fs_reads_bytes_total", "Cumulative count of bytes read", COUNTER,
               _DEV),
    MetricSpec("container_fs_reads_total", "Cumulative count of reads completed", COUNTER,
               _DEV),
    MetricSpec("container_fs_writes_bytes_total", "Cumulative count of bytes written",
               COUNTER, _DEV),
    MetricSpec("container_fs_writes_total", "Cumulative count of writes completed", COUNTER,
               _DEV),
    MetricSpec("container_blkio_device_usage_total", "Blkio Device bytes usage", COUNTER,
               ("device", "major", "minor", "operation")),
    MetricSpec("container_spec_memory_limit_bytes", "Memory limit for the container.", GAUGE),
    MetricSpec("container_spec_memory_swap_limit_bytes",
               "Memory swap limit for the container.", GAUGE),
    MetricSpec("container_spec_memory_reservation_limit_bytes",
               "Memory reservation limit for the container.", GAUGE),
    MetricSpec("container_spec_cpu_shares", "CPU share of the container.", GAUGE),
    MetricSpec("container_spec_cpu_quota", "CPU quota of the container.", GAUGE),
    MetricSpec("container_spec_cpu_period", "CPU period of the container.", GAUGE),
    MetricSpec("container_start_time_seconds",
               "Start time of the container since unix epoch in seconds.", GAUGE),
    MetricSpec("container_last_seen", "Last time a container was seen by the exporter.", GAUGE),
    *(MetricSpec(f"container_pressure_{kind}_{what}_seconds_total", text.format(name), COUNTER)
      for kind, name in (("cpu", "CPU"), ("memory", "memory"), ("io", "IO"))
      for what, text in (
          ("stalled", "Total time duration no tasks in the container could make progress "
                      "due to {} congestion."),
          ("waiting", "Total time duration tasks in the container have waited due to {} "
                      "congestion."))),
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

#: (metric, reads bytes or operations, of which operation), as cadvisor fills them
_DISK_FIELDS = (
    ("container_fs_reads_bytes_total", "bytes", "Read"),
    ("container_fs_reads_total", "ios", "Read"),
    ("container_fs_writes_bytes_total", "bytes", "Write"),
    ("container_fs_writes_total", "ios", "Write"),
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
                                    label_values=[*self.labels, *extra], value=u64(value)))


def _extra_metrics(m: _Metrics, extra: ExtraStats, ts: int) -> None:
    m.add("container_cpu_cfs_periods_total", extra.cfs_periods, ts)
    m.add("container_cpu_cfs_throttled_periods_total", extra.cfs_throttled_periods, ts)
    m.add("container_cpu_cfs_throttled_seconds_total", extra.cfs_throttled_ns // NS_PER_S, ts)
    m.add("container_memory_failcnt", extra.memory_failcnt, ts)
    m.add("container_memory_kernel_usage", extra.memory_kernel, ts)
    m.add("container_memory_mapped_file", extra.memory_mapped_file, ts)
    m.add("container_memory_max_usage_bytes", extra.memory_max_usage, ts)
    m.add("container_threads_max", extra.threads_max, ts)
    m.add("container_file_descriptors", extra.file_descriptors, ts)
    m.add("container_sockets", extra.sockets, ts)
    m.add("container_spec_memory_swap_limit_bytes", extra.swap_limit, ts)
    m.add("container_cpu_cfs_burst_periods_total", extra.cfs_bursts, ts)
    m.add("container_cpu_cfs_burst_seconds_total", extra.cfs_burst_ns // NS_PER_S, ts)
    m.add("container_memory_total_active_file_bytes", extra.memory_active_file, ts)
    m.add("container_memory_total_inactive_file_bytes", extra.memory_inactive_file, ts)
    m.add("container_spec_memory_reservation_limit_bytes", extra.memory_reservation, ts)
    if extra.max_open_files is not None:
        m.add("container_ulimits_soft", extra.max_open_files, ts, "max_open_files")
    for dev in extra.io:
        for name, kind, operation in _DISK_FIELDS:
            table = dev.bytes if kind == "bytes" else dev.ios
            if operation in table:
                m.add(name, table[operation], ts, dev.device)
        for operation, value in sorted(dev.bytes.items()):
            m.add("container_blkio_device_usage_total", value, ts, dev.device,
                  str(dev.major), str(dev.minor), operation)


def _container_metrics(sample: ContainerSample, now: int) -> pb.ContainerMetrics:
    ref, stats, layer = sample.ref, sample.cgroup, sample.layer
    m = _Metrics(ref.labels)
    if stats is not None:
        ts = stats.timestamp_ns
        m.add("container_cpu_usage_seconds_total", stats.cpu_usage_ns // NS_PER_S, ts, "total")
        m.add("container_cpu_user_seconds_total", stats.cpu_user_ns // NS_PER_S, ts)
        m.add("container_cpu_system_seconds_total", stats.cpu_system_ns // NS_PER_S, ts)
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
        if sample.extra is not None:
            _extra_metrics(m, sample.extra, ts)
        for kind, pressure in (("cpu", stats.cpu_pressure), ("memory", stats.memory_pressure),
                               ("io", stats.io_pressure)):
            if pressure is None:  # cgroup v1, or no PSI in the kernel
                continue
            m.add(f"container_pressure_{kind}_waiting_seconds_total",
                  pressure.some.total_ns // NS_PER_S, ts)
            if pressure.full is not None:
                m.add(f"container_pressure_{kind}_stalled_seconds_total",
                      pressure.full.total_ns // NS_PER_S, ts)
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
        m.add("container_start_time_seconds", ref.started_at // NS_PER_S, now)
    m.add("container_last_seen", now // NS_PER_S, now)
    return pb.ContainerMetrics(container_id=ref.id, metrics=m.items)


def pod_metrics(sample: PodSample) -> pb.PodSandboxMetrics:
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
