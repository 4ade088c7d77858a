"""Container and pod stats, and cadvisor-style metrics for the kubelet: the samples
cripy.runtime.usage collects, as CRI messages."""

from __future__ import annotations

import logging
import time

from cripy.api import api_pb2 as pb
from cripy.runtime.stats import CgroupStats, InterfaceStats, Pressure, PressureLine
from cripy.runtime.usage import ContainerSample, PodSample, StatsCollector
from cripy.server.cadvisor import METRICS, pod_metrics
from cripy.server.cadvisor import u64 as _u64
from cripy.server.rpc import Context, rpc

log = logging.getLogger(__name__)

DEFAULT_INTERFACE = "eth0"  # what CNI is asked to name the pod's interface


# --- CRI messages -------------------------------------------------------------------------


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
        return pb.ListPodSandboxMetricsResponse(pod_metrics=[pod_metrics(s) for s in samples])


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
