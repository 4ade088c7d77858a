"""Container and pod stats, and cadvisor-style metrics for the kubelet.

Records are copied into plain snapshots on the event loop; the cgroup, /proc/net/dev and
writable-layer reads then run in one thread per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cripy.api import api_pb2 as pb
from cripy.errors import InvalidArgumentError
from cripy.runtime.container import CREATED, CREATING, RUNNING, Container, ContainerManager
from cripy.runtime.sandbox import READY, Sandbox, SandboxManager
from cripy.runtime.stats import (
    CgroupStats,
    CpuRates,
    InterfaceStats,
    LayerUsage,
    LayerUsageCache,
    combine,
    read_cgroup_stats,
    read_net_dev,
)
from cripy.server.rpc import Context, rpc

log = logging.getLogger(__name__)

DEFAULT_INTERFACE = "eth0"  # what CNI is asked to name the pod's interface
POD_CONTAINER_LABEL = "POD"  # the "container" label of pod-level metrics, as cadvisor's

# Shared by every servicer in the process: ImageFsInfo and the stats RPCs use one cache.
layer_cache = LayerUsageCache()
cpu_rates = CpuRates()


# --- snapshots taken on the event loop ----------------------------------------------------


@dataclass(frozen=True)
class _ContainerRef:
    id: str
    attributes: pb.ContainerAttributes
    cgroup: str | None  # None: no cgroup to read (not running)
    upper: Path
    mountpoint: str
    labels: tuple[str, ...]  # container, id, image, name, namespace, pod
    resources: pb.LinuxContainerResources
    started_at: int


@dataclass(frozen=True)
class _PodRef:
    id: str
    attributes: pb.PodSandboxAttributes
    netns: str | None  # None: host network or not ready
    cgroup: str | None  # the pod's own cgroup parent, when no other pod shares it
    labels: tuple[str, ...]
    containers: list[_ContainerRef]


@dataclass
class _ContainerSample:
    ref: _ContainerRef
    cgroup: CgroupStats | None
    layer: LayerUsage
    fs: os.statvfs_result | None = None


@dataclass
class _PodSample:
    ref: _PodRef
    cgroup: CgroupStats | None
    network: dict[str, InterfaceStats] | None
    network_ts: int
    containers: list[_ContainerSample] = field(default_factory=list)


def _container_ref(c: Container, sandbox: Sandbox | None, containers: ContainerManager
                   ) -> _ContainerRef:
    cgroup = None
    if sandbox is not None and c.state in (CREATED, RUNNING):
        # Where the cgroup driver put it: a directory, or a systemd scope unit's cgroup.
        with contextlib.suppress(InvalidArgumentError):
            cgroup = containers.oci.cgroups.container_dir(sandbox.config.linux.cgroup_parent,
                                                          c.id)
    meta = sandbox.config.metadata if sandbox is not None else pb.PodSandboxMetadata()
    return _ContainerRef(
        id=c.id,
        attributes=pb.ContainerAttributes(id=c.id, metadata=c.config.metadata,
                                          labels=c.config.labels,
                                          annotations=c.config.annotations),
        cgroup=cgroup,
        upper=containers.records.object_dir(c.id) / "upper",
        mountpoint=str(containers.records.directory),
        labels=(c.config.metadata.name, c.id, c.config.image.image, c.name, meta.namespace,
                meta.name),
        resources=c.config.linux.resources,
        started_at=c.started_at,
    )


def _pod_cgroup(sandbox: Sandbox, sandboxes: SandboxManager) -> str | None:
    """The pod's cgroup parent when it is the pod's own (as the kubelet's pod<uid> cgroups
    are); a default or shared parent holds other pods too, so the containers are summed."""
    driver = sandboxes.oci.cgroups
    try:
        parent = driver.pod_dir(sandbox.config.linux.cgroup_parent)
        if parent == driver.pod_dir(""):
            return None  # the driver's default parent
        for other in sandboxes.sandboxes.values():
            if other.id != sandbox.id and \
                    driver.pod_dir(other.config.linux.cgroup_parent) == parent:
                return None
    except InvalidArgumentError:  # a parent of another driver's kind (kept from before)
        return None
    return parent


# --- blocking reads (in a thread) ---------------------------------------------------------


def _sample_container(ref: _ContainerRef, with_fs_info: bool = False) -> _ContainerSample:
    stats = read_cgroup_stats(ref.cgroup) if ref.cgroup else None
    sample = _ContainerSample(ref, stats, layer_cache.get(ref.id, ref.upper))
    if with_fs_info:
        try:
            sample.fs = os.statvfs(ref.mountpoint)
        except OSError:
            sample.fs = None
    return sample


def _sample_pod(ref: _PodRef, with_fs_info: bool = False) -> _PodSample:
    containers = [_sample_container(c, with_fs_info) for c in ref.containers]
    stats = read_cgroup_stats(ref.cgroup) if ref.cgroup else None
    if stats is None:
        stats = combine(s.cgroup for s in containers if s.cgroup is not None)
    network = None
    if ref.netns:
        try:
            network = read_net_dev(ref.netns)
        except OSError as exc:  # the pod was stopped under us
            log.debug("pod %s: reading network stats failed: %s", ref.id[:12], exc)
    return _PodSample(ref, stats, network, time.time_ns(), containers)


# --- CRI messages -------------------------------------------------------------------------


def _u64(value: int) -> pb.UInt64Value:
    return pb.UInt64Value(value=max(value, 0))


def _cpu(key: str, stats: CgroupStats) -> pb.CpuUsage:
    cpu = pb.CpuUsage(timestamp=stats.timestamp_ns,
                      usage_core_nano_seconds=_u64(stats.cpu_usage_ns))
    rate = cpu_rates.update(key, stats.cpu_usage_ns, stats.timestamp_ns)
    if rate is not None:
        cpu.usage_nano_cores.CopyFrom(_u64(rate))
    return cpu


def _memory(stats: CgroupStats) -> pb.MemoryUsage:
    memory = pb.MemoryUsage(
        timestamp=stats.timestamp_ns, working_set_bytes=_u64(stats.memory_working_set),
        usage_bytes=_u64(stats.memory_usage), rss_bytes=_u64(stats.memory_rss),
        page_faults=_u64(stats.page_faults), major_page_faults=_u64(stats.major_page_faults))
    available = stats.memory_available
    if available is not None:
        memory.available_bytes.CopyFrom(_u64(available))
    return memory


def _container_stats(sample: _ContainerSample) -> pb.ContainerStats:
    ref, layer = sample.ref, sample.layer
    out = pb.ContainerStats(
        attributes=ref.attributes,
        writable_layer=pb.FilesystemUsage(
            timestamp=layer.timestamp_ns, fs_id=pb.FilesystemIdentifier(mountpoint=ref.mountpoint),
            used_bytes=_u64(layer.used_bytes), inodes_used=_u64(layer.inodes_used)),
    )
    stats = sample.cgroup
    if stats is not None:
        out.cpu.CopyFrom(_cpu(ref.id, stats))
        out.memory.CopyFrom(_memory(stats))
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


def _pod_stats(sample: _PodSample) -> pb.PodSandboxStats:
    ref = sample.ref
    linux = pb.LinuxPodSandboxStats(containers=[_container_stats(c) for c in sample.containers])
    stats = sample.cgroup
    if stats is not None:
        linux.cpu.CopyFrom(_cpu(f"pod/{ref.id}", stats))
        linux.memory.CopyFrom(_memory(stats))
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


def _container_metrics(sample: _ContainerSample, now: int) -> pb.ContainerMetrics:
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


def _pod_metrics(sample: _PodSample) -> pb.PodSandboxMetrics:
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
    containers: ContainerManager
    sandboxes: SandboxManager

    def _container_ref(self, c: Container) -> _ContainerRef:
        return _container_ref(c, self.sandboxes.sandboxes.get(c.sandbox_id), self.containers)

    def _pod_ref(self, sandbox: Sandbox) -> _PodRef:
        meta = sandbox.config.metadata
        netns = sandbox.namespaces.get("net") if sandbox.state == READY else None
        return _PodRef(
            id=sandbox.id,
            attributes=pb.PodSandboxAttributes(id=sandbox.id, metadata=meta,
                                               labels=sandbox.config.labels,
                                               annotations=sandbox.config.annotations),
            netns=netns,
            cgroup=_pod_cgroup(sandbox, self.sandboxes) if sandbox.state == READY else None,
            labels=(POD_CONTAINER_LABEL, sandbox.id, "", sandbox.name, meta.namespace,
                    meta.name),
            containers=[self._container_ref(c) for c in self.containers.in_sandbox(sandbox.id)
                        if c.state != CREATING],
        )

    def _prune(self) -> None:
        """Forget cached samples of removed containers and pods."""
        live = set(self.containers.containers)
        layer_cache.prune(live)
        cpu_rates.prune(live | {f"pod/{i}" for i in self.sandboxes.sandboxes})

    @rpc
    async def ContainerStats(
        self, request: pb.ContainerStatsRequest, context: Context
    ) -> pb.ContainerStatsResponse:
        ref = self._container_ref(self.containers.get(request.container_id))
        sample = await asyncio.to_thread(_sample_container, ref)
        return pb.ContainerStatsResponse(stats=_container_stats(sample))

    @rpc
    async def ListContainerStats(
        self, request: pb.ListContainerStatsRequest, context: Context
    ) -> pb.ListContainerStatsResponse:
        flt = request.filter
        refs = [self._container_ref(c) for c in self.containers.matching(pb.ContainerFilter(
            id=flt.id, pod_sandbox_id=flt.pod_sandbox_id, label_selector=flt.label_selector))]
        self._prune()
        samples = await asyncio.to_thread(lambda: [_sample_container(r) for r in refs])
        return pb.ListContainerStatsResponse(stats=[_container_stats(s) for s in samples])

    @rpc
    async def PodSandboxStats(
        self, request: pb.PodSandboxStatsRequest, context: Context
    ) -> pb.PodSandboxStatsResponse:
        ref = self._pod_ref(self.sandboxes.get(request.pod_sandbox_id))
        sample = await asyncio.to_thread(_sample_pod, ref)
        return pb.PodSandboxStatsResponse(stats=_pod_stats(sample))

    @rpc
    async def ListPodSandboxStats(
        self, request: pb.ListPodSandboxStatsRequest, context: Context
    ) -> pb.ListPodSandboxStatsResponse:
        flt = request.filter
        refs = self._pod_refs(pb.PodSandboxFilter(id=flt.id, label_selector=flt.label_selector))
        samples = await asyncio.to_thread(lambda: [_sample_pod(r) for r in refs])
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
        refs = self._pod_refs(None)
        samples = await asyncio.to_thread(lambda: [_sample_pod(r, True) for r in refs])
        return pb.ListPodSandboxMetricsResponse(pod_metrics=[_pod_metrics(s) for s in samples])

    def _pod_refs(self, flt: pb.PodSandboxFilter | None) -> list[_PodRef]:
        refs = [self._pod_ref(s) for s in self.sandboxes.matching(flt)]
        self._prune()
        return refs


# --- ImageFsInfo --------------------------------------------------------------------------


async def container_filesystems(containers: ContainerManager) -> list[pb.FilesystemUsage]:
    """ImageFsInfo's container_filesystems: all writable layers, on `<root>/containers`."""
    refs = [(c.id, containers.records.object_dir(c.id) / "upper")
            for c in containers.containers.values()]

    def measure() -> list[LayerUsage]:
        return [layer_cache.get(key, upper) for key, upper in refs]

    usages = await asyncio.to_thread(measure)
    return [pb.FilesystemUsage(
        timestamp=time.time_ns(),
        fs_id=pb.FilesystemIdentifier(mountpoint=str(containers.records.directory)),
        used_bytes=_u64(sum(u.used_bytes for u in usages)),
        inodes_used=_u64(sum(u.inodes_used for u in usages)),
    )]
